"""Speed of registering a whole brain to the Allen CCFv3 at 25 µm, stage by stage, on 2 threads.

Input: the real brain ``brainreg_brain/brain`` (270 x 193 x 271 planes, psl,
50 x 40 x 40 µm). Atlas: the Allen 2017 annotation at 25 µm
(528 x 320 x 456). The shared data has no 25 µm intensity template, so the
reference is ``brain_in_ccf_100um.tiff`` (the same brain in CCF space at
100 µm) upsampled 4x by trilinear interpolation to the 25 µm grid: it has
the right size and the 25 µm cost, but only 100 µm of detail.

Timed (wall clock, ITK limited to 2 threads): loading the atlas (not
counted in the target), ``register_to_reference`` split into its stages
(``prepare``: reorient + resample the sample to 25 µm; ``preprocess``:
normalise, masks, flattening, work grid; ``register``: affine + deformable;
``qc``), then the outputs the pipeline writes from it: the annotation
warped into the sample (``warp_labels_to_sample``) and 10^5 cells mapped to
the atlas (``cells_to_atlas``). The target is <= 3 minutes for registration
plus outputs. The same at 50 and 100 µm shows how the cost scales.

Run::

    python benchmarks/bench_registration_25um.py [--engine simpleitk] [--resolutions 25 50 100]

Results go to ``benchmarks/results/registration_25um.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TARGET_S = 180.0


def load(resolution_um: float):
    """The Allen atlas at ``resolution_um`` with the real brain (upsampled) as reference."""
    from ketamap.atlas import load_allen

    a = SHARED / "allen_ccf_2017"
    atlas = load_allen(
        a / "ABA_25um_2017_annotation.tif.lzma",
        a / "structure_tree_safe_2017.csv",
        hemispheres_path=a / "ABA_25um_2017_hemispheres.tif.lzma",
        resolution_um=resolution_um,
    )
    ref100 = tifffile.imread(SHARED / "brainreg_brain" / "brain_in_ccf_100um.tiff")
    zoom = np.asarray(atlas.annotation.shape) / np.asarray(ref100.shape)
    reference = ndi.zoom(ref100.astype(np.float32), zoom, order=1, grid_mode=True, mode="nearest")
    return atlas, reference


def run(resolution_um: float, engine: str) -> dict:
    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.register import (
        RegistrationParams,
        cells_to_atlas,
        register_to_reference,
        warp_labels_to_sample,
    )

    t = time.perf_counter()
    atlas, reference = load(resolution_um)
    load_s = time.perf_counter() - t
    image = open_volume(SHARED / "brainreg_brain" / "brain")
    t0 = time.perf_counter()
    reg = register_to_reference(
        image,
        reference,
        voxel_size_um=(50, 40, 40),
        orientation="psl",
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_labels=atlas.annotation,
        params=RegistrationParams(engine=engine, n_threads=2),
    )
    t1 = time.perf_counter()
    labels = warp_labels_to_sample(reg, atlas.annotation)
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    cells = rng.uniform(0, 1, (100_000, 3)) * (np.asarray(image.shape) - 1)
    cells_to_atlas(reg, cells)
    t3 = time.perf_counter()
    voxel_mm3 = float(np.prod(atlas.resolution_um)) / 1e9
    return {
        "resolution_um": resolution_um,
        "engine": engine,
        "atlas_shape": list(atlas.annotation.shape),
        "prepared_shape": list(reg.prepared_shape_vox),
        "load_atlas_s": round(load_s, 1),
        "stage_seconds": reg.qc["stage_seconds"],
        "register_to_atlas_s": round(t1 - t0, 1),
        "warp_labels_s": round(t2 - t1, 1),
        "cells_to_atlas_100k_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 1),
        "meets_3_min": bool(t3 - t0 <= TARGET_S),
        "qc": {k: reg.qc[k] for k in ("correlation_after", "dice_brain_mask", "flagged")},
        "brain_volume_mm3": round(float((labels > 0).sum()) * voxel_mm3, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="simpleitk", choices=("simpleitk", "antspyx"))
    ap.add_argument("--resolutions", nargs="+", type=float, default=[25.0, 50.0, 100.0])
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "registration_25um.json")
    )
    args = ap.parse_args()
    rows = []
    for res in args.resolutions:
        row = run(res, args.engine)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {
        "machine": f"{os.cpu_count()} cores visible, ITK limited to 2 threads",
        "target_s": TARGET_S,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
