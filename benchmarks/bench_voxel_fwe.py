"""Family-wise error and detection of the voxel-wise density test (issue 5's yardstick).

Density maps are drawn directly on the phantom atlas grid, not from full
simulated brains: each mouse gets a baseline density per leaf region (the
same for all mice of a cohort, log-uniform 20-2000 cells/mm³), a per-mouse
factor (log-sd 0.05) and a per-mouse, per-region factor (log-sd 0.13) — the
between-mouse variability of the region-level calibration benchmark —, then
Poisson cell counts per voxel smoothed by :func:`ketamap.stats.voxels.density_map`
(Gaussian, 150 µm). Groups are compared on ``log(density + 1)`` with
:func:`ketamap.stats.voxels.voxel_test`, as the stats stage does.

* FWE under the null: fraction of null cohorts with any voxel at p_fwe < 0.05,
  with its exact (Clopper-Pearson) 95 % interval.
* Detection: cohorts with VTA × 0.5 and ZI × 2 planted in group b; a region
  counts as detected when a voxel inside it has p_fwe < 0.05 and t of the
  right sign; voxels called outside any planted region (and its 150 µm halo)
  are counted as false-positive cohorts.

Run:  python benchmarks/bench_voxel_fwe.py [--null 100 --planted 20 --perms 200 --n 6]
          [--method cluster_mass --resolution-um 100]
Adds an entry ``<method>_<res>um`` to benchmarks/results/voxel_fwe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from ketamap.atlas import make_phantom
from ketamap.stats.voxels import VoxelParams, density_map, voxel_test

RESULTS = Path(__file__).resolve().parent / "results"
RADIUS_UM = 150.0
PLANTED = {"VTA": 0.5, "ZI": 2.0}


def cohort_maps(rng, atlas, base, n_per_group, planted_ids):
    """Log-density maps of two groups, shape (2 * n, z, y, x)."""
    labels = atlas.annotation
    leaf_index = np.searchsorted(base["ids"], labels)
    res = atlas.resolution_um
    voxel_mm3 = float(np.prod(res)) * 1e-9
    maps = []
    for g in range(2):
        for _ in range(n_per_group):
            factor = np.exp(rng.normal(0, 0.05) + rng.normal(0, 0.13, base["ids"].size))
            if g == 1:
                for rid, fold in planted_ids.items():
                    factor[np.searchsorted(base["ids"], rid)] *= fold
            lam = np.where(labels > 0, base["density"][leaf_index] * factor[leaf_index], 0.0)
            counts = rng.poisson(lam * voxel_mm3)
            pts = np.repeat(np.argwhere(counts > 0), counts[counts > 0], axis=0) * np.asarray(res)
            d = density_map(pts, labels.shape, voxel_size_um=res, radius_um=RADIUS_UM)
            maps.append(np.log(d + 1.0))
    return np.stack(maps)


def run(args) -> dict:
    atlas = make_phantom(resolution_um=args.resolution_um)
    mask = atlas.annotation > 0
    rng = np.random.default_rng(args.seed)
    ids = np.unique(atlas.annotation[mask])
    base = {"ids": ids, "density": np.exp(rng.uniform(np.log(20), np.log(2000), ids.size))}
    onto = atlas.ontology
    planted_ids = {}
    region_masks = {}
    for acr, fold in PLANTED.items():
        rid = onto.lookup(acr)
        leaves = [r for r in onto.descendants(rid, include_self=True) if r in set(ids.tolist())]
        for leaf in leaves:
            planted_ids[int(leaf)] = fold
        region_masks[acr] = np.isin(atlas.annotation, leaves)
    halo = ndimage.binary_dilation(
        np.any(list(region_masks.values()), axis=0),
        iterations=int(np.ceil(2 * RADIUS_UM / min(atlas.resolution_um))),
    )

    def vp(seed: int) -> VoxelParams:
        return VoxelParams(
            n_permutations=args.perms, method=args.method, tfce_steps=args.tfce_steps, seed=seed
        )

    kw = dict(mask=mask, voxel_size_um=atlas.resolution_um)
    n = args.n
    t0 = time.perf_counter()
    null_hits, null_min_p = 0, []
    for rep in range(args.null):
        maps = cohort_maps(rng, atlas, base, n, {})
        res = voxel_test(maps[:n], maps[n:], params=vp(rep), **kw)
        null_min_p.append(float(res.p_fwe.min()))
        null_hits += bool((res.p_fwe < args.alpha).any())
        if (rep + 1) % 10 == 0:
            print(f"null {rep + 1}/{args.null}: FWE so far {null_hits / (rep + 1):.3f}", flush=True)
    t_null = time.perf_counter() - t0
    detected = {acr: 0 for acr in PLANTED}
    outside = 0
    for rep in range(args.planted):
        maps = cohort_maps(rng, atlas, base, n, planted_ids)
        res = voxel_test(maps[:n], maps[n:], params=vp(10_000 + rep), **kw)
        called = res.p_fwe < args.alpha
        for acr, fold in PLANTED.items():
            right = res.t * np.sign(np.log(fold)) > 0
            detected[acr] += bool((called & right & region_masks[acr]).any())
        outside += bool((called & ~halo).any())
    lo, hi = stats.binomtest(null_hits, args.null).proportion_ci(0.95, method="exact")
    return {
        "method": args.method,
        "resolution_um": args.resolution_um,
        "kernel_radius_um": RADIUS_UM,
        "mice_per_group": n,
        "permutations": args.perms,
        "tfce_steps": args.tfce_steps if args.method == "tfce" else None,
        "alpha": args.alpha,
        "n_voxels_tested": int(mask.sum()),
        "null_replicates": args.null,
        "fwe_rate": null_hits / args.null,
        "fwe_ci95": [round(float(lo), 4), round(float(hi), 4)],
        "fwe_ok": bool(null_hits / args.null <= 0.05),
        "planted": {k: float(v) for k, v in PLANTED.items()},
        "planted_replicates": args.planted,
        "detection_rate": {k: v / max(args.planted, 1) for k, v in detected.items()},
        "planted_cohorts_with_calls_outside_effect": outside,
        "seconds_per_replicate": round(t_null / max(args.null, 1), 2),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--null", type=int, default=100)
    ap.add_argument("--planted", type=int, default=20)
    ap.add_argument("--perms", type=int, default=200)
    ap.add_argument("--n", type=int, default=6, help="mice per group")
    ap.add_argument("--method", default="cluster_mass", choices=("cluster_mass", "tfce"))
    ap.add_argument("--tfce-steps", type=int, default=25)
    ap.add_argument("--resolution-um", type=float, default=100.0)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="result file (default under results/)")
    args = ap.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    path = Path(args.out) if args.out else RESULTS / "voxel_fwe.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[f"{args.method}_{args.resolution_um:g}um"] = result
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
