"""Calibration and power of the region-level count model (issue 5's yardstick).

Simulates region count tables the way the census simulator does (baseline
density × volume × a per-mouse factor × a per-region, per-mouse factor, then
Poisson; between-mouse CV of regional counts about 15-20 %), fits
``ketamap.stats.compare_regions`` and reports:

* the false-positive rate per region test at alpha = 0.05 over null cohorts;
* the false discovery proportion at q < 0.05 when 10 % of regions carry an effect;
* power against mice per group and fold change.

Two scenarios of between-mouse variability are run: *homogeneous* (every
region has the same dispersion) and *heterogeneous* (the dispersion varies
log-normally across regions, SD of log dispersion ``--heterogeneous-log-sd``),
because the prior df of the dispersion is estimated from that spread.

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

from ketamap.stats import StatsParams, compare_regions

RESULTS = Path(__file__).resolve().parent / "results"
N_REGIONS = 150
PARAMS = StatsParams()  # replaced in main() by --prior-df
REGION_LOG_SD = 0.13  # between-mouse log-SD of a region's count (CV ~13 %)


def cohort(
    rng,
    *,
    n_per_group,
    folds,
    groups=(("saline", 0.0), ("ket30", 30.0), ("ket100", 100.0)),
    disp_log_sd=0.0,
):
    """One cohort's long count table and subject table; ``folds[g]`` is a per-region array.

    ``disp_log_sd``: SD across regions of the log of the extra-Poisson dispersion
    (0: every region has the same between-mouse log-SD, 0.13).
    """
    base = np.exp(rng.uniform(np.log(20), np.log(500), N_REGIONS))
    volume = np.exp(rng.uniform(np.log(0.1), np.log(10), N_REGIONS))
    # dispersion ~ (log-SD)^2, so the log-SD varies with half the SD of log dispersion
    region_sd = REGION_LOG_SD * np.exp(rng.normal(0, disp_log_sd / 2, N_REGIONS))
    rows, subjects = [], []
    for g, dose in groups:
        for i in range(n_per_group):
            sid = f"{g}-{i}"
            subjects.append((sid, g, dose))
            scale = np.exp(rng.normal(0, 0.05) + rng.normal(0, 1, N_REGIONS) * region_sd)
            vol = volume * np.exp(rng.normal(0, 0.03))
            counts = rng.poisson(base * folds.get(g, 1.0) * scale * vol / volume)
            rows.append(
                pd.DataFrame(
                    {
                        "subject": sid,
                        "region_id": np.arange(N_REGIONS, dtype=np.int64) + 1000,
                        "acronym": [f"R{k}" for k in range(N_REGIONS)],
                        "level": 5,
                        "count": counts,
                        "volume_mm3": vol,
                    }
                )
            )
    return (
        pd.concat(rows, ignore_index=True),
        pd.DataFrame(subjects, columns=["subject", "group", "dose_mg_per_kg"]),
    )


def null_rates(n_cohorts, seed=0, disp_log_sd=0.0):
    rng = np.random.default_rng(seed)
    hits, prior_df = {}, []
    for _ in range(n_cohorts):
        counts, subjects = cohort(rng, n_per_group=4, folds={}, disp_log_sd=disp_log_sd)
        res = compare_regions(counts, subjects, reference_group="saline", params=PARAMS)
        prior_df.append(res.attrs["dispersion_prior_df"])
        for contrast, grp in res.groupby("contrast"):
            p = grp["p"].dropna().to_numpy()
            h = hits.setdefault(contrast, [0, 0])
            h[0] += int((p < 0.05).sum())
            h[1] += len(p)
    out = {c: {"false_positive_rate": a / b, "tests": b} for c, (a, b) in hits.items()}
    out["prior_df_quartiles"] = np.percentile(prior_df, [25, 50, 75]).round(1).tolist()
    return out


def fdp(n_cohorts, seed=1, disp_log_sd=0.0, compare=None):
    """Mean FDP and power at q < 0.05; ``compare``: other StatsParams run on the same cohorts."""
    rng = np.random.default_rng(seed)
    runs = {"main": PARAMS, **({"compare": compare} if compare is not None else {})}
    fdps, powers = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(n_cohorts):
        effect = np.zeros(N_REGIONS, bool)
        effect[rng.choice(N_REGIONS, N_REGIONS // 10, replace=False)] = True
        fold = np.where(effect, rng.choice([0.5, 2.0], N_REGIONS), 1.0)
        counts, subjects = cohort(
            rng, n_per_group=4, folds={"ket100": fold}, disp_log_sd=disp_log_sd
        )
        for k, params in runs.items():
            res = compare_regions(counts, subjects, reference_group="saline", params=params)
            r = res[res["contrast"] == "ket100_vs_saline"]
            called = r["q"].to_numpy() < 0.05
            truth = effect[r["region_id"].to_numpy() - 1000]
            fdps[k].append((called & ~truth).sum() / max(called.sum(), 1))
            powers[k].append((called & truth).sum() / truth.sum())

    def summary(k):
        return {
            "mean_fdp": float(np.mean(fdps[k])),
            "mean_fdp_standard_error": float(np.std(fdps[k], ddof=1) / np.sqrt(n_cohorts)),
            "mean_power_at_2fold": float(np.mean(powers[k])),
            "cohorts": n_cohorts,
        }

    out = summary("main")
    if compare is not None:
        diff = np.subtract(fdps["main"], fdps["compare"])
        out["compare"] = {"dispersion_prior_df": compare.dispersion_prior_df,
                          "test": compare.test, **summary("compare"),
                          "paired_fdp_difference": float(diff.mean()),
                          "paired_fdp_difference_standard_error":
                              float(diff.std(ddof=1) / np.sqrt(n_cohorts))}  # fmt: skip
    return out


def power_curves(
    reps, seed=2, ns=(3, 4, 5, 6, 8, 10), folds=(1.2, 1.5, 2.0, 2.5, 3.0), disp_log_sd=0.0
):
    rng = np.random.default_rng(seed)
    out = []
    for n in ns:
        for f in folds:
            found = total = 0
            for _ in range(reps):
                effect = np.zeros(N_REGIONS, bool)
                effect[rng.choice(N_REGIONS, N_REGIONS // 10, replace=False)] = True
                fold = np.where(effect, f, 1.0)
                counts, subjects = cohort(
                    rng,
                    n_per_group=n,
                    folds={"ket": fold},
                    groups=(("saline", 0.0), ("ket", 30.0)),
                    disp_log_sd=disp_log_sd,
                )
                res = compare_regions(counts, subjects, reference_group="saline", params=PARAMS)
                r = res[res["contrast"] == "ket_vs_saline"]
                called = r["q"].to_numpy() < 0.05
                truth = effect[r["region_id"].to_numpy() - 1000]
                found += int((called & truth).sum())
                total += int(truth.sum())
            out.append({"n_per_group": n, "fold_change": f, "power": found / total})
            print(f"  n={n:2d} fold={f:.1f} power={found / total:.2f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--null", type=int, default=500, help="null cohorts (default 500)")
    ap.add_argument(
        "--fdp", type=int, default=500, help="cohorts with 10%% of regions affected (default 500)"
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=20,
        help="cohorts per power-curve cell; 0 skips the curves (default 20)",
    )
    ap.add_argument(
        "--heterogeneous-log-sd",
        type=float,
        default=1.0,
        help="SD across regions of log dispersion in the heterogeneous scenario (default 1.0)",
    )
    ap.add_argument(
        "--scenarios",
        default="homogeneous,heterogeneous",
        help="comma-separated: homogeneous (one dispersion for all regions) and/or "
        "heterogeneous (log-normal spread of dispersion across regions)",
    )
    ap.add_argument(
        "--out",
        default="stats_calibration.json",
        help="file name under benchmarks/results/ (default stats_calibration.json)",
    )
    ap.add_argument(
        "--prior-df",
        type=float,
        default=None,
        help="fix StatsParams.dispersion_prior_df (default: estimated from the data)",
    )
    ap.add_argument(
        "--test",
        default="ql-f",
        choices=("ql-f", "lr-f", "lr", "wald"),
        help="StatsParams.test (default ql-f)",
    )
    ap.add_argument(
        "--no-poisson-bound",
        action="store_true",
        help="StatsParams.poisson_bound=False: QL F p-values without edgeR's Poisson bound",
    )
    ap.add_argument(
        "--compare-prior-df",
        type=float,
        default=None,
        help="also analyse the FDP cohorts with this fixed prior df (paired)",
    )
    ap.add_argument(
        "--compare-test",
        default=None,
        choices=("ql-f", "lr-f", "lr", "wald"),
        help="also analyse the FDP cohorts with this test (paired)",
    )
    args = ap.parse_args()
    global PARAMS
    PARAMS = StatsParams(dispersion_prior_df=args.prior_df, test=args.test,
                         poisson_bound=not args.no_poisson_bound)  # fmt: skip
    compare = None
    if args.compare_prior_df is not None or args.compare_test is not None:
        compare = StatsParams(dispersion_prior_df=args.compare_prior_df,
                              test=args.compare_test or args.test)  # fmt: skip
    t0 = time.perf_counter()
    spreads = {"homogeneous": 0.0, "heterogeneous": args.heterogeneous_log_sd}
    result = {
        "regions_per_cohort": N_REGIONS,
        "mice_per_group": 4,
        "region_log_sd_median": REGION_LOG_SD,
        "dispersion_prior_df": args.prior_df,
        "test": args.test,
        "poisson_bound": not args.no_poisson_bound,
        "scenarios": {},
    }
    for name in args.scenarios.split(","):
        sd = spreads[name]
        print(f"{name} (SD of log dispersion across regions {sd:g}):", flush=True)
        res = {"dispersion_log_sd": sd}
        if args.null:
            res["null"] = null_rates(args.null, disp_log_sd=sd)
            print("  false-positive rate at 0.05:", json.dumps(res["null"]), flush=True)
        if args.fdp:
            res["fdp_10pct_effects"] = fdp(args.fdp, disp_log_sd=sd, compare=compare)
            print("  FDP at q < 0.05 with 10% effects:", json.dumps(res["fdp_10pct_effects"]),
                  flush=True)  # fmt: skip
        if args.reps:
            res["power"] = power_curves(args.reps, disp_log_sd=sd)
        result["scenarios"][name] = res
    result["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    curves = {k: v["power"] for k, v in result["scenarios"].items() if "power" in v}
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            1, len(curves), figsize=(5 * len(curves), 3.5), dpi=100, squeeze=False
        )
        for ax, (name, rows) in zip(axes[0], curves.items()):
            power = pd.DataFrame(rows)
            for f, grp in power.groupby("fold_change"):
                ax.plot(grp["n_per_group"], grp["power"], marker="o", label=f"{f:g}x")
            ax.set_title(f"{name} dispersion", fontsize=10)
            ax.set_xlabel("mice per group")
            ax.set_ylabel("power at q < 0.05")
            ax.set_ylim(0, 1.02)
            ax.legend(title="fold change", fontsize=8)
        fig.tight_layout()
        fig.savefig(
            RESULTS
            / Path(args.out).with_suffix(".png").name.replace("stats_calibration", "stats_power")
        )
    print(f"done in {result['seconds']} s")


if __name__ == "__main__":
    main()
