"""Benchmark the fibre length map in atlas space: length kept and time added to the stage.

A simulated fibre block (``ketamap.simulate.fibres``, 4 x 2 x 2 µm, three regions of
1500, 600 and 200 mm/mm³, autofluorescence channel) is segmented as the census' fibres
stage does it (``segment_fibres`` on Dask chunks, ``write_fibre_outputs``, the skeleton
read back), and its skeleton lengths are mapped onto a 25 µm atlas grid by
``fibre_density_atlas`` under three registrations: the identity, an affine (20° about
the atlas' first axis, scale 0.9, a translation) and that affine composed with a smooth
B-spline (displacements of about ``--warp-um``). Recorded per registration: the length
the map holds over the skeleton's length (the map's sum times the voxel volume), the
length lost outside the atlas volume, and the map's time (mapping plus writing it as
OME-Zarr); once: the time of the segmentation with the writing of its two images, and of
the separate pass that summed the skeleton's length before (which the map's pass now
replaces in the stage). Other work may share the cores: compare times within one run.

With ``--study DIR``: the simulated census of ``tests/test_pipeline.py`` (phantom atlas
at 100 µm, 2 mice per group, 60 µm voxels) with ``[fibres]`` is made in DIR (or reused,
its stages skipped when up to date) and run; per mouse: the fibres stage's time (its
``provenance.json``), the length the map holds over the skeleton's, and the map's length
in the brain (atlas id > 0) over the sample space region table's (``fibre_regions``,
root), and per level-5 region with over 1 % of the length, the map's length over the
table's.

Prints and saves JSON (``benchmarks/results/bench_fibre_atlas_map.json``).

Usage::

    .venv/bin/python benchmarks/bench_fibre_atlas_map.py [--block 64 384 384] [--seed 1]
        [--chunks 32 192 192] [--warp-um 15] [--study DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
VOXEL_UM = (4.0, 2.0, 2.0)
ATLAS_UM = 25.0


def _registrations(shape, warp_um: float, seed: int):
    import SimpleITK as sitk

    from ketamap.wholebrain.register import Registration

    extent = np.asarray(shape) * VOXEL_UM  # µm (z, y, x)
    atlas_shape = tuple(int(math.ceil(e * 1.6 / ATLAS_UM)) + 4 for e in extent)
    centre = (extent / 2)[::-1]  # ITK (x, y, z)
    shift = ((np.asarray(atlas_shape) * ATLAS_UM - extent) / 2)[::-1]  # the block in the middle

    def reg(transform):
        return Registration(transform, tuple(shape), VOXEL_UM, "asr", atlas_shape,
                            (ATLAS_UM,) * 3, "asr", qc={})  # fmt: skip

    identity = sitk.TranslationTransform(3, [float(s) for s in shift])
    affine = sitk.AffineTransform(3)
    affine.SetCenter([float(c) for c in centre])
    angle = math.radians(20.0)
    c, s = math.cos(angle), math.sin(angle)
    # rotation about the atlas' first (z) axis: in ITK order (x, y, z) it turns x and y
    affine.SetMatrix([0.9 * c, -0.9 * s, 0, 0.9 * s, 0.9 * c, 0, 0, 0, 0.9])
    affine.SetTranslation([float(v) for v in shift])
    domain = sitk.Image([int(math.ceil(e / ATLAS_UM)) for e in extent[::-1]], sitk.sitkFloat32)
    domain.SetSpacing([ATLAS_UM] * 3)
    bspline = sitk.BSplineTransformInitializer(domain, [4, 4, 4])
    rng = np.random.default_rng(seed)
    params = rng.normal(0.0, warp_um, len(bspline.GetParameters()))
    bspline.SetParameters([float(p) for p in params])
    warped = sitk.CompositeTransform([affine, bspline])
    return {"identity": reg(identity), "affine": reg(affine), "affine_bspline": reg(warped)}


def study_agreement(root: Path) -> dict:
    """Run (or reuse) the simulated census with [fibres]; the map against the region table."""
    import pandas as pd

    from ketamap.atlas import load_atlas
    from ketamap.io.volumes import open_volume
    from ketamap.pipelines.census import run_study
    from ketamap.simulate import BrainParams, simulate_census

    manifest = root / "study.toml"
    if not manifest.exists():
        params = BrainParams(voxel_size_um=(60.0, 60.0, 60.0), orientation="psl")
        simulate_census(root, atlas="phantom:100", scenario="ketamine-10day", n_per_group=2,
                        params=params, seed=3)  # fmt: skip
        manifest.write_text(manifest.read_text() + "\n[fibres]\nthreshold_snr = 5.0\n")
    run_study(manifest)
    atlas = load_atlas("phantom:100")
    ann = atlas.annotation.astype(np.int64).ravel()
    vox_mm3 = float(np.prod(atlas.resolution_um)) * 1e-9
    pairs = atlas.ontology.ancestor_pairs()
    out = {}
    for s in sorted((root / "subjects").iterdir()):
        qc = json.loads((s / "fibres" / "fibre_qc.json").read_text())
        stage_s = json.loads((s / "fibres" / "provenance.json").read_text()).get("seconds")
        d = np.asarray(open_volume(s / "fibres" / "fibre_density_atlas.ome.zarr").compute())
        length_um = d.astype(np.float64).ravel() * vox_mm3 * 1e3  # mm/mm³ x mm³ = mm -> µm
        leaf = pd.DataFrame({"id": ann, "um": length_um})
        leaf = leaf[leaf["id"] > 0].groupby("id", as_index=False)["um"].sum()
        rolled = leaf.merge(pairs, on="id").groupby("ancestor_id")["um"].sum()
        table = pd.read_parquet(s / "fibres" / "fibre_regions.parquet").set_index("region_id")
        both = table[["acronym", "level", "length_um"]].join(rolled.rename("atlas_um"))
        both = both.fillna({"atlas_um": 0.0})
        root_row = both[both["acronym"] == "root"].iloc[0]
        big = both[(both["level"] == 5) & (both["length_um"] > 0.01 * root_row["length_um"])]
        ratio = big["atlas_um"] / big["length_um"]
        out[s.name] = {
            "stage_s": stage_s,
            "map_length_over_skeleton_length": qc["atlas_length_mm"] / qc["total_length_mm"],
            "in_brain_map_over_region_table": root_row["atlas_um"] / root_row["length_um"],
            "map_share_outside_brain": 1 - root_row["atlas_um"] / length_um.sum(),
            "level5_regions": len(big),
            "level5_map_over_table_min": float(ratio.min()),
            "level5_map_over_table_max": float(ratio.max()),
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, nargs=3, default=[64, 384, 384])
    ap.add_argument("--chunks", type=int, nargs=3, default=[32, 192, 192])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warp-um", type=float, default=15.0)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/bench_fibre_atlas_map.json"
    )
    ap.add_argument("--study", type=Path, default=None)
    args = ap.parse_args(argv)

    import dask
    import dask.array as da

    from ketamap.io.volumes import open_volume, write_ome_zarr
    from ketamap.simulate.fibres import region_slabs, simulate_fibres
    from ketamap.wholebrain.fibres import (
        FibreParams,
        fibre_density_atlas,
        segment_fibres,
        skeleton_lengths,
        write_fibre_outputs,
    )

    dask.config.set(scheduler="threads", num_workers=2)
    shape = tuple(args.block)
    labels, _ = region_slabs(shape, (1, 2, 3))
    sim = simulate_fibres(labels, densities_mm_per_mm3={1: 1500.0, 2: 600.0, 3: 200.0},
                          seed=args.seed)  # fmt: skip
    params = FibreParams(chunk_size_vox=tuple(args.chunks), tissue_mask=False)
    chunks = tuple(args.chunks)
    out = {"block_vox": list(shape), "chunks_vox": list(chunks), "voxel_um": list(VOXEL_UM),
           "atlas_um": ATLAS_UM, "load_average_start": os.getloadavg()[0],
           "machine": platform.platform(), "cpus": os.cpu_count()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        mask, skeleton, _ = segment_fibres(
            da.from_array(sim.signal, chunks=chunks, name=False), voxel_size_um=VOXEL_UM,
            background=da.from_array(sim.background, chunks=chunks, name=False), params=params,
        )  # fmt: skip
        paths = write_fibre_outputs(mask, skeleton, tmp, voxel_size_um=VOXEL_UM)
        out["segment_and_write_s"] = time.perf_counter() - t
        skeleton = open_volume(paths["skeleton"])
        lengths = skeleton_lengths(skeleton, VOXEL_UM, smoothing=params.length_smoothing)
        t = time.perf_counter()
        total_um = float(lengths.sum().compute())
        out["total_length_pass_s"] = time.perf_counter() - t
        out["skeleton_length_um"] = total_um
        out["skeleton_voxels"] = int(skeleton.sum().compute())
        out["registrations"] = {}
        for name, reg in _registrations(shape, args.warp_um, args.seed).items():
            t = time.perf_counter()
            found = fibre_density_atlas(lengths, reg)
            write_ome_zarr(found.density_mm_per_mm3, Path(tmp) / f"{name}.ome.zarr",
                           voxel_size_um=found.voxel_size_um)  # fmt: skip
            seconds = time.perf_counter() - t
            d = found.density_mm_per_mm3.astype(np.float64)
            held_um = float(d.sum()) * ATLAS_UM**3 * 1e-9 * 1e3
            out["registrations"][name] = {
                "map_and_write_s": seconds,
                "map_over_segment": seconds / out["segment_and_write_s"],
                "map_length_over_skeleton_length": held_um / total_um,
                "length_outside_atlas_um": found.length_um - found.length_in_atlas_um,
                "atlas_voxels_with_fibre": int((d > 0).sum()),
                "atlas_shape": list(d.shape),
            }
    if args.study is not None:
        out["study"] = study_agreement(args.study)
    out["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(out, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
