"""Calibration and power of the continuous-density model (``ketamap.stats.compare_densities``).

Simulates per-region fibre densities across mice (log-normal between mice, a
region-specific variance drawn from a scaled inverse chi-square), fits
``compare_densities`` with and without empirical-Bayes moderation, and reports:

* the false-positive rate per region test at alpha = 0.05 over null cohorts
  (3 groups x 4, 5 or 6 mice; 100 or 300 regions), per contrast (two group
  contrasts and the dose trend), with its binomial 95 % interval;
* power at q < 0.05 and the false discovery proportion when 10 % of regions carry a
  fold change of 1.2-2 (two groups of 4, 6 or 8 mice).

Scenarios:

* ``inv_chisq``: ``log d = log base + sigma_r * N(0, 1)``, ``sigma_r² ~ s0² d0 /
  chi²(d0)`` with ``s0 = 0.2`` (a between-mouse CV of about 20 %) and ``d0 = 8``:
  the model's own assumptions;
* ``heavy_tailed``: the same with Student-t (4 df) errors scaled to the same variance
  and a wider spread of region variances (``d0 = 3``);
* ``zeros`` (null only): as ``inv_chisq``, but a fifth of the regions are sparse: a
  density is a Poisson number of fibres (mean 1-5 per mouse) times gamma lengths, so
  that some mice have exactly zero.

Run:  python benchmarks/bench_density_calibration.py [--null 300 --reps 20]
Writes benchmarks/results/density_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ketamap.io.atomic import write_json
from ketamap.stats.densities import DensityParams, compare_densities

RESULTS = Path(__file__).resolve().parent / "results"
VALUE = "length_density_mm_per_mm3"
S0 = 0.2
SCENARIOS = {
    "inv_chisq": {"d0": 8.0, "t_df": None, "sparse": 0.0},
    "heavy_tailed": {"d0": 3.0, "t_df": 4.0, "sparse": 0.0},
    "zeros": {"d0": 8.0, "t_df": None, "sparse": 0.2},
}
MODELS = {"moderated": DensityParams(), "ordinary": DensityParams(moderate=False)}


def cohort(rng, *, n_regions, n_per_group, groups, folds, d0, t_df, sparse):
    """One cohort's long density table and subject table; ``folds[g]`` per region."""
    base = np.exp(rng.uniform(np.log(20), np.log(2000), n_regions))
    sigma = S0 * np.sqrt(d0 / rng.chisquare(d0, n_regions))
    is_sparse = rng.uniform(size=n_regions) < sparse
    fibres = rng.uniform(1, 5, n_regions)  # mean fibres per mouse in a sparse region
    rows, subjects = [], []
    for g, dose in groups:
        fold = folds.get(g, 1.0)
        for i in range(n_per_group):
            sid = f"{g}-{i}"
            subjects.append((sid, g, dose))
            if t_df is None:
                noise = rng.normal(size=n_regions)
            else:
                noise = rng.standard_t(t_df, n_regions) / np.sqrt(t_df / (t_df - 2))
            dens = base * fold * np.exp(sigma * noise)
            k = rng.poisson(fibres * fold)
            lengths = rng.gamma(np.maximum(k, 1) * 4.0, 1.0 / 4.0) * (k > 0)
            dens = np.where(is_sparse, base * lengths / fibres, dens)
            rows.append(pd.DataFrame({
                "subject": sid,
                "region_id": np.arange(n_regions, dtype=np.int64) + 1000,
                "acronym": [f"R{r}" for r in range(n_regions)],
                "level": 5,
                VALUE: dens,
            }))  # fmt: skip
    subjects = pd.DataFrame(subjects, columns=["subject", "group", "dose_mg_per_kg"])
    return pd.concat(rows, ignore_index=True), subjects


def _interval(k, n):
    lo = stats.beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return [round(float(lo), 4), round(float(hi), 4)]


def null_rates(scenario, n_cohorts, n_regions, n_per_group, seed):
    rng = np.random.default_rng(seed)
    groups = (("saline", 0.0), ("ket30", 30.0), ("ket100", 100.0))
    hits = {m: {} for m in MODELS}
    prior_df = []
    for _ in range(n_cohorts):
        table, subjects = cohort(rng, n_regions=n_regions, n_per_group=n_per_group,
                                 groups=groups, folds={}, **SCENARIOS[scenario])  # fmt: skip
        for m, params in MODELS.items():
            res = compare_densities(table, subjects, reference_group="saline", params=params)
            if m == "moderated":
                prior_df.append(res.attrs["prior_df"]["groups"][5])  # the one level simulated
            for contrast, grp in res.groupby("contrast"):
                p = grp["p"].dropna().to_numpy()
                h = hits[m].setdefault(contrast, [0, 0])
                h[0] += int((p < 0.05).sum())
                h[1] += len(p)
    out = {
        m: {
            c: {"false_positive_rate": round(a / b, 4), "ci95": _interval(a, b), "tests": b}
            for c, (a, b) in sorted(h.items())
        }
        for m, h in hits.items()
    }
    out["prior_df_quartiles"] = np.percentile(prior_df, [25, 50, 75]).round(2).tolist()
    return out


def power_curves(scenario, reps, n_regions, ns, folds, seed):
    rng = np.random.default_rng(seed)
    groups = (("saline", 0.0), ("ket", 30.0))
    out = []
    for n in ns:
        for f in folds:
            found = {m: [0, 0] for m in MODELS}
            fdp = {m: [] for m in MODELS}
            for _ in range(reps):
                effect = np.zeros(n_regions, bool)
                effect[rng.choice(n_regions, n_regions // 10, replace=False)] = True
                fold = np.where(effect, np.where(rng.uniform(size=n_regions) < 0.5, f, 1 / f), 1)
                table, subjects = cohort(rng, n_regions=n_regions, n_per_group=n,
                                         groups=groups, folds={"ket": fold},
                                         **SCENARIOS[scenario])  # fmt: skip
                for m, params in MODELS.items():
                    res = compare_densities(table, subjects, reference_group="saline",
                                            params=params)  # fmt: skip
                    r = res[res["contrast"] == "ket_vs_saline"]
                    called = r["called"].to_numpy()
                    truth = effect[r["region_id"].to_numpy() - 1000]
                    found[m][0] += int((called & truth).sum())
                    found[m][1] += int(truth.sum())
                    fdp[m].append((called & ~truth).sum() / max(called.sum(), 1))
            row = {"n_per_group": n, "fold_change": f}
            for m in MODELS:
                row[f"power_{m}"] = round(found[m][0] / found[m][1], 4)
                row[f"mean_fdp_{m}"] = round(float(np.mean(fdp[m])), 4)
            out.append(row)
            print(f"    n={n} fold={f:.2f} power moderated {row['power_moderated']:.2f} "
                  f"ordinary {row['power_ordinary']:.2f}  FDP {row['mean_fdp_moderated']:.3f} "
                  f"/ {row['mean_fdp_ordinary']:.3f}", flush=True)  # fmt: skip
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--null", type=int, default=300, help="null cohorts per setting (300)")
    ap.add_argument("--reps", type=int, default=20, help="cohorts per power cell; 0 skips (20)")
    ap.add_argument("--scenarios", default="inv_chisq,heavy_tailed,zeros",
                    help="comma-separated: inv_chisq, heavy_tailed, zeros")  # fmt: skip
    ap.add_argument("--out", default="density_calibration.json",
                    help="file name under benchmarks/results/")  # fmt: skip
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"s0": S0, "alpha": 0.05, "params": "DensityParams() and moderate=False",
              "scenarios": {}}  # fmt: skip
    for k, name in enumerate(args.scenarios.split(",")):
        print(f"{name} {SCENARIOS[name]}:", flush=True)
        res = {"settings": SCENARIOS[name], "null": []}
        for n_regions, n_per_group in ((100, 4), (300, 4), (300, 5), (300, 6)):
            if not args.null:
                break
            rates = null_rates(name, args.null, n_regions, n_per_group, seed=100 * k + n_per_group
                               + n_regions)  # fmt: skip
            res["null"].append({"regions": n_regions, "mice_per_group": n_per_group,
                                "cohorts": args.null, **rates})  # fmt: skip
            for m in MODELS:
                txt = "  ".join(f"{c} {v['false_positive_rate']:.4f}"
                                for c, v in rates[m].items())  # fmt: skip
                print(f"  null {n_regions} regions x {n_per_group} mice, {m}: {txt}", flush=True)
            print(f"    prior df quartiles {rates['prior_df_quartiles']}", flush=True)
        if args.reps and name != "zeros":
            print("  power (10 % of 300 regions, two groups, q < 0.05):", flush=True)
            res["power"] = power_curves(name, args.reps, 300, (4, 6, 8),
                                        (1.2, 1.35, 1.5, 1.75, 2.0), seed=7 + k)  # fmt: skip
        result["scenarios"][name] = res
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = write_json(result, RESULTS / args.out)
    print(json.dumps({"seconds": result["seconds"], "written": path.name}))


if __name__ == "__main__":
    main()
