"""Registration bake-off: SimpleITK (ketamap's path) vs antspyx vs itk-elastix.

Every engine gets the same inputs: the sample *prepared* by ketamap
(reoriented to asr and resampled to the atlas resolution), the atlas
reference and the atlas annotation (ketamap uses its regions, the others
its brain mask). Each returns a dense map: for every
prepared voxel, the atlas voxel coordinate it corresponds to (3, Z, Y, X).
The map is obtained by warping coordinate ramps of the atlas grid with each
engine's own resampler, so no transform-direction convention is involved.

Scored on
* simulated brains (``ketamap.simulate.simulate_brain`` on the Allen 100 µm
  atlas with ``brain_in_ccf_100um.tiff`` as tissue contrast; random pose +
  smooth deformation + light-sheet artefacts): median target registration
  error of the true cells (atlas voxels) and the % of cells mapped into their
  true leaf region and true major division;
* the real brain ``brainreg_brain/brain`` (psl, 50 40 40 µm): QC
  (correlation of sample and warped reference, brain-mask Dice), per-division
  local correlation, division Dice against antspyx SyN, total brain volume.

Each engine runs in its own process (time and peak RSS are its own). antspyx
and itk-elastix are not ketamap dependencies: install them into a separate
venv and pass its python with ``--bake-python``::

    python3 -m venv bake-venv && bake-venv/bin/pip install antspyx itk-elastix
    .venv/bin/python benchmarks/bench_registration.py --bake-python bake-venv/bin/python

Results go to ``benchmarks/results/registration_bakeoff.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DIVISIONS = ("Isocortex", "OLF", "HPF", "CNU", "TH", "HY", "MB", "P", "MY", "CB")


# --------------------------------------------------------------------------- engines (child)


def _ramps(shape):
    return [
        np.broadcast_to(
            np.arange(n, dtype=np.float32).reshape([-1 if a == ax else 1 for a in range(3)]), shape
        ).copy()
        for ax, n in enumerate(shape)
    ]


def engine_sitk(fixed, moving, labels, res):
    from ketamap.wholebrain.register import register_to_reference
    from ketamap.wholebrain.transforms import dense_atlas_vox

    reg = register_to_reference(
        fixed,
        moving,
        voxel_size_um=res,
        orientation="asr",
        atlas_resolution_um=res,
        atlas_labels=labels,
    )
    return dense_atlas_vox(reg.sample_to_atlas, fixed.shape, (res,) * 3)


def engine_ants(fixed, moving, labels, res):
    import ants

    f = ants.from_numpy(fixed.astype(np.float32), spacing=(res,) * 3)
    m = ants.from_numpy(moving.astype(np.float32), spacing=(res,) * 3)
    mm = ants.from_numpy((labels > 0).astype(np.float32), spacing=(res,) * 3)
    out = ants.registration(f, m, type_of_transform="SyN", moving_mask=mm, random_seed=1)
    coords = []
    for ramp in _ramps(moving.shape):
        r = ants.from_numpy(ramp, spacing=(res,) * 3)
        w = ants.apply_transforms(
            f, r, out["fwdtransforms"], interpolator="linear", defaultvalue=-1e4
        )
        coords.append(w.numpy())
    return np.stack(coords).astype(np.float32)


def engine_elastix(fixed, moving, labels, res):
    import itk

    f = itk.image_from_array(np.ascontiguousarray(fixed.astype(np.float32)))
    m = itk.image_from_array(np.ascontiguousarray(moving.astype(np.float32)))
    for im in (f, m):
        im.SetSpacing([res] * 3)
    mm = itk.image_from_array(np.ascontiguousarray((labels > 0).astype(np.uint8)))
    mm.SetSpacing([res] * 3)
    po = itk.ParameterObject.New()
    affine = po.GetDefaultParameterMap("affine")
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    po.AddParameterMap(affine)
    bs = po.GetDefaultParameterMap("bspline")
    bs["FinalGridSpacingInPhysicalUnits"] = ["1000"]
    po.AddParameterMap(bs)
    # A moving mask makes elastix stop with "too many samples map outside moving image
    # buffer" at the coarsest level on these inputs, so elastix runs unmasked.
    del mm
    result, params = itk.elastix_registration_method(
        f, m, parameter_object=po, log_to_console=False
    )
    coords = []
    for ramp in _ramps(moving.shape):
        r = itk.image_from_array(ramp)
        r.SetSpacing([res] * 3)
        for i in range(params.GetNumberOfParameterMaps()):
            params.SetParameter(i, "FinalBSplineInterpolationOrder", "1")
            params.SetParameter(i, "DefaultPixelValue", "-10000")
        w = itk.transformix_filter(r, params)
        coords.append(itk.array_from_image(w))
    return np.stack(coords).astype(np.float32)


ENGINES = {"simpleitk": engine_sitk, "antspyx": engine_ants, "itk-elastix": engine_elastix}


def child(args):
    data = np.load(args.inputs)
    t0 = time.perf_counter()
    coords = ENGINES[args.child](data["fixed"], data["moving"], data["labels"], float(data["res"]))
    seconds = time.perf_counter() - t0
    coords = np.where(coords < -1000, np.nan, coords)
    np.save(args.output, coords.astype(np.float32))
    # VmHWM (peak RSS of this process image); ru_maxrss would keep the parent's peak
    # across fork + exec on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak)}))


# --------------------------------------------------------------------------- scoring (parent)


def run_engine(engine, fixed, atlas, res, python):
    """Register ``fixed`` to the atlas reference (with the annotation) with one engine."""
    moving = atlas.reference.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in.npz"
        np.savez(inputs, fixed=fixed, moving=moving, labels=atlas.annotation, res=res)
        out = Path(tmp) / "coords.npy"
        env = dict(
            os.environ,
            OMP_NUM_THREADS="2",
            ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2",
            PYTHONPATH=str(ROOT / "src"),
        )
        proc = subprocess.run(
            [python, __file__, "--child", engine, "--inputs", str(inputs), "--output", str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            return None, {"error": proc.stderr.strip().splitlines()[-1][:300]}
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
        return np.load(out), stats


def sample_coords(coords, j):
    from scipy import ndimage as ndi

    return np.stack(
        [
            ndi.map_coordinates(np.nan_to_num(c, nan=-1e4), j.T, order=1, mode="nearest")
            for c in coords
        ],
        axis=1,
    )


def labels_through(coords, annotation):
    from scipy import ndimage as ndi

    return ndi.map_coordinates(
        annotation,
        np.nan_to_num(coords, nan=-1e4),
        order=0,
        mode="constant",
        cval=0,
        output=annotation.dtype,
    )


def division_map(atlas, labels):
    onto = atlas.ontology
    out = np.zeros(labels.shape, np.int32)
    for k, acr in enumerate(DIVISIONS, start=1):
        ids = np.asarray(onto.descendants(onto.lookup(acr), include_self=True))
        out[np.isin(labels, ids)] = k
    return out


def load_atlas_100():
    from ketamap.atlas import load_allen

    a = SHARED / "allen_ccf_2017"
    return load_allen(
        a / "ABA_25um_2017_annotation.tif.lzma",
        a / "structure_tree_safe_2017.csv",
        hemispheres_path=a / "ABA_25um_2017_hemispheres.tif.lzma",
        reference_path=SHARED / "brainreg_brain" / "brain_in_ccf_100um.tiff",
        resolution_um=100,
    )


def bench_simulated(atlas, engines, pythons, seeds):
    from ketamap.simulate import BrainParams, simulate_brain
    from ketamap.wholebrain.register import prepare_sample
    from ketamap.wholebrain.transforms import raw_to_prepared_vox

    rows = []
    divisions = division_map(atlas, atlas.annotation)
    for seed in seeds:
        params = BrainParams(voxel_size_um=(50.0, 40.0, 40.0), orientation="psl")
        brain = simulate_brain(
            atlas, fold_changes={}, densities={}, default_density=20.0, params=params, seed=seed
        )
        res = float(atlas.resolution_um[0])
        fixed = prepare_sample(
            brain.background,
            voxel_size_um=brain.voxel_size_um,
            orientation=brain.orientation,
            atlas_orientation="asr",
            atlas_resolution_um=res,
        )
        cells = brain.cells
        j = raw_to_prepared_vox(
            cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float),
            shape_vox=brain.background.shape,
            voxel_size_um=brain.voxel_size_um,
            orientation=brain.orientation,
            atlas_orientation="asr",
            atlas_resolution_um=res,
        )
        true = cells[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy(float)
        true_div = labels_through(true.T, divisions)
        for engine in engines:
            coords, stats = run_engine(engine, fixed, atlas, res, pythons[engine])
            row = {"brain": f"simulated seed {seed}", "engine": engine, **stats}
            if coords is not None:
                found = sample_coords(coords, j)
                err = np.linalg.norm(found - true, axis=1)
                lab, _ = atlas.labels_at(found)
                row.update(
                    n_cells=len(cells),
                    median_tre_vox=round(float(np.median(err)), 3),
                    p95_tre_vox=round(float(np.percentile(err, 95)), 3),
                    pct_true_leaf=round(100 * float(np.mean(lab == cells["region_id"])), 1),
                    pct_true_division=round(
                        100 * float(np.mean(labels_through(found.T, divisions) == true_div)), 1
                    ),
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_real(atlas, engines, pythons):
    from scipy import ndimage as ndi

    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.register import prepare_sample
    from ketamap.wholebrain.transforms import brain_mask, dice, ncc, normalise_intensity

    res = float(atlas.resolution_um[0])
    fixed = prepare_sample(
        open_volume(SHARED / "brainreg_brain" / "brain"),
        voxel_size_um=(50, 40, 40),
        orientation="psl",
        atlas_orientation="asr",
        atlas_resolution_um=res,
    )
    fixed_n = normalise_intensity(fixed, "sample")
    ref_n = normalise_intensity(atlas.reference, "reference")
    fixed_brain, ref_brain = brain_mask(fixed_n), brain_mask(ref_n)
    divisions = division_map(atlas, atlas.annotation)
    ccf_mm3 = float((atlas.annotation > 0).sum()) * (res / 1000) ** 3
    results, maps = [], {}
    for engine in engines:
        coords, stats = run_engine(engine, fixed, atlas, res, pythons[engine])
        row = {"brain": "real brainreg brain", "engine": engine, **stats}
        if coords is not None:
            c = np.nan_to_num(coords, nan=-1e4)
            warped = ndi.map_coordinates(ref_n, c, order=1, mode="constant", cval=0)
            warped_brain = ndi.map_coordinates(ref_brain.astype(np.uint8), c, order=0) > 0
            div = labels_through(coords, divisions)
            maps[engine] = div
            union = fixed_brain | warped_brain
            row.update(
                correlation=round(ncc(fixed_n, warped, union), 4),
                dice_brain_mask=round(dice(fixed_brain, warped_brain), 4),
                brain_volume_mm3=round(
                    float((labels_through(coords, atlas.annotation) > 0).sum()) * (res / 1000) ** 3,
                    1,
                ),
                ccf_brain_volume_mm3=round(ccf_mm3, 1),
                division_correlation={
                    d: round(ncc(fixed_n, warped, div == k), 3)
                    for k, d in enumerate(DIVISIONS, start=1)
                },
            )
        print(json.dumps(row), flush=True)
        results.append(row)
    if "antspyx" in maps:
        for row in results:
            if row["engine"] in maps:
                row["division_dice_vs_antspyx"] = {
                    d: round(dice(maps[row["engine"]] == k, maps["antspyx"] == k), 3)
                    for k, d in enumerate(DIVISIONS, start=1)
                }
    return results


def install_mb(python, packages):
    code = (
        "import importlib.metadata as m, os, sys\n"
        "for p in sys.argv[1:]:\n"
        "  try: d = m.distribution(p)\n"
        "  except m.PackageNotFoundError: print(p, -1); continue\n"
        "  s = sum(os.path.getsize(d.locate_file(f)) for f in d.files or [] "
        "if os.path.exists(d.locate_file(f)))\n"
        "  print(p, round(s / 2**20))\n"
    )
    out = subprocess.run([python, "-c", code, *packages], capture_output=True, text=True).stdout
    return {p: int(v) for p, v in (line.split() for line in out.splitlines())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=sorted(ENGINES))
    ap.add_argument("--inputs")
    ap.add_argument("--output")
    ap.add_argument("--bake-python", default=sys.executable)
    ap.add_argument("--engines", nargs="+", default=["simpleitk", "antspyx", "itk-elastix"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[11, 12])
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "registration_bakeoff.json")
    )
    args = ap.parse_args()
    if args.child:
        return child(args)
    pythons = {e: (sys.executable if e == "simpleitk" else args.bake_python) for e in ENGINES}
    atlas = load_atlas_100()
    report = {
        "machine": f"{os.cpu_count()} cores visible, engines limited to 2 threads",
        "install_mb": {
            **install_mb(sys.executable, ["SimpleITK"]),
            **install_mb(
                args.bake_python,
                [
                    "antspyx",
                    "itk-elastix",
                    "itk-core",
                    "itk-registration",
                    "itk-filtering",
                    "itk-numerics",
                    "itk-io",
                    "itk-segmentation",
                    "itk",
                ],
            ),
        },
        "simulated": bench_simulated(atlas, args.engines, pythons, args.seeds),
    }
    if not args.skip_real:
        report["real"] = bench_real(atlas, args.engines, pythons)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
