"""Calibration and power of the region-level count model (issue 5's yardstick).

Simulates region count tables the way the census simulator does (baseline
density × volume × a per-mouse factor × a per-region, per-mouse factor, then
Poisson; between-mouse CV of regional counts about 15-20 %), fits
``ketamap.stats.compare_regions`` and reports:

* the false-positive rate per region test at alpha = 0.05 over null cohorts;
* the false discovery proportion at q < 0.05 when 10 % of regions carry an effect;
* power against mice per group and fold change.

Run:  python benchmarks/bench_stats_calibration.py [--null 500 --fdp 500 --reps 20]
Writes benchmarks/results/stats_calibration.json and stats_power.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.stats import compare_regions

RESULTS = Path(__file__).resolve().parent / "results"
N_REGIONS = 150


def cohort(rng, *, n_per_group, folds, groups=(("saline", 0.0), ("ket30", 30.0), ("ket100", 100.0))):
    """One cohort's long count table and subject table; ``folds[g]`` is a per-region array."""
    base = np.exp(rng.uniform(np.log(20), np.log(500), N_REGIONS))
    volume = np.exp(rng.uniform(np.log(0.1), np.log(10), N_REGIONS))
    rows, subjects = [], []
    for g, dose in groups:
        for i in range(n_per_group):
            sid = f"{g}-{i}"
            subjects.append((sid, g, dose))
            scale = np.exp(rng.normal(0, 0.05) + rng.normal(0, 0.13, N_REGIONS))
            vol = volume * np.exp(rng.normal(0, 0.03))
            counts = rng.poisson(base * folds.get(g, 1.0) * scale * vol / volume)
            rows.append(pd.DataFrame({
                "subject": sid, "region_id": np.arange(N_REGIONS, dtype=np.int64) + 1000,
                "acronym": [f"R{k}" for k in range(N_REGIONS)], "level": 5,
                "count": counts, "volume_mm3": vol}))
    return (pd.concat(rows, ignore_index=True),
            pd.DataFrame(subjects, columns=["subject", "group", "dose_mg_per_kg"]))


def null_rates(n_cohorts, seed=0):
    rng = np.random.default_rng(seed)
    hits = {}
    for _ in range(n_cohorts):
        counts, subjects = cohort(rng, n_per_group=4, folds={})
        res = compare_regions(counts, subjects, reference_group="saline")
        for contrast, grp in res.groupby("contrast"):
            p = grp["p"].dropna().to_numpy()
            h = hits.setdefault(contrast, [0, 0])
            h[0] += int((p < 0.05).sum())
            h[1] += len(p)
    return {c: {"false_positive_rate": a / b, "tests": b} for c, (a, b) in hits.items()}


def fdp(n_cohorts, seed=1):
    rng = np.random.default_rng(seed)
    fdps, powers = [], []
    for _ in range(n_cohorts):
        effect = np.zeros(N_REGIONS, bool)
        effect[rng.choice(N_REGIONS, N_REGIONS // 10, replace=False)] = True
        fold = np.where(effect, rng.choice([0.5, 2.0], N_REGIONS), 1.0)
        counts, subjects = cohort(rng, n_per_group=4, folds={"ket100": fold})
        res = compare_regions(counts, subjects, reference_group="saline")
        r = res[res["contrast"] == "ket100_vs_saline"]
        called = r["q"].to_numpy() < 0.05
        truth = effect[r["region_id"].to_numpy() - 1000]
        fdps.append((called & ~truth).sum() / max(called.sum(), 1))
        powers.append((called & truth).sum() / truth.sum())
    return {"mean_fdp": float(np.mean(fdps)), "mean_power_at_2fold": float(np.mean(powers)),
            "cohorts": n_cohorts}


def power_curves(reps, seed=2, ns=(3, 4, 5, 6, 8, 10), folds=(1.2, 1.5, 2.0, 2.5, 3.0)):
    rng = np.random.default_rng(seed)
    out = []
    for n in ns:
        for f in folds:
            found = total = 0
            for _ in range(reps):
                effect = np.zeros(N_REGIONS, bool)
                effect[rng.choice(N_REGIONS, N_REGIONS // 10, replace=False)] = True
                fold = np.where(effect, f, 1.0)
                counts, subjects = cohort(rng, n_per_group=n, folds={"ket": fold},
                                          groups=(("saline", 0.0), ("ket", 30.0)))
                res = compare_regions(counts, subjects, reference_group="saline")
                r = res[res["contrast"] == "ket_vs_saline"]
                called = r["q"].to_numpy() < 0.05
                truth = effect[r["region_id"].to_numpy() - 1000]
                found += int((called & truth).sum())
                total += int(truth.sum())
            out.append({"n_per_group": n, "fold_change": f, "power": found / total})
            print(f"  n={n:2d} fold={f:.1f} power={found / total:.2f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--null", type=int, default=500)
    ap.add_argument("--fdp", type=int, default=500)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"regions_per_cohort": N_REGIONS, "mice_per_group": 4}
    result["null"] = null_rates(args.null)
    print("false-positive rate at 0.05:", json.dumps(result["null"]), flush=True)
    result["fdp_10pct_effects"] = fdp(args.fdp)
    print("FDP at q < 0.05 with 10% effects:", json.dumps(result["fdp_10pct_effects"]), flush=True)
    result["power"] = power_curves(args.reps)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stats_calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    power = pd.DataFrame(result["power"])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for f, grp in power.groupby("fold_change"):
        ax.plot(grp["n_per_group"], grp["power"], marker="o", label=f"{f:g}x")
    ax.set_xlabel("mice per group")
    ax.set_ylabel("power at q < 0.05")
    ax.set_ylim(0, 1.02)
    ax.legend(title="fold change", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "stats_power.png")
    print(f"done in {result['seconds']} s")


if __name__ == "__main__":
    main()
