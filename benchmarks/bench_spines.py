"""Benchmark spine turnover on simulated studies: accuracy at the default SNR, vs SNR, vs drift.

For every simulated study (default design: 3 mice × 2 dendrites × 4 sessions)
the full stage runs (``run_spines``) and is scored against the ground truth:
detection F1, identity-tracking accuracy, the largest error of the pooled
formation and elimination rates (percentage points), and the return-to-lost-
sites p-value, with the effect planted (``stress-ketamine``) and without it
(``no-return``). The calibration of the return test itself is checked on the
ground truth of ``--null-seeds`` further ``no-return`` studies (no image
analysis): with a calibrated null about 5 % of them have p < 0.05.

Usage::

    python benchmarks/bench_spines.py [--seeds 0 1] [--snr 4 6 8 10 15] [--drift 0 1 2 4]
        [--null-seeds 20] [--out FILE]

Prints one line per run and writes ``benchmarks/results/spines.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.invivo.spines import (
    SpineParams,
    presence_matrix,
    return_to_lost_sites,
    score_spines,
)
from ketamap.manifest import load_spine_sessions
from ketamap.pipelines import run_spines
from ketamap.simulate.spines import SpineSimParams, simulate_spine_study


def one_run(tmp: Path, *, scenario: str, seed: int, params: SpineSimParams) -> dict:
    toml = simulate_spine_study(tmp / "study", scenario=scenario, seed=seed, params=params)
    t0 = time.perf_counter()
    run_spines(toml, tmp / "out")
    seconds = time.perf_counter() - t0
    labels = load_spine_sessions(toml).labels
    truth = pd.read_parquet(tmp / "study" / "ground_truth" / "spines.parquet")
    det = pd.read_parquet(tmp / "out" / "detections.parquet")
    score = score_spines(truth, det, labels, pixel_size_um=params.pixel_size_um)
    t = pd.read_csv(tmp / "study" / "ground_truth" / "rates_pooled.csv")
    g = pd.read_csv(tmp / "out" / "rates_pooled.csv")
    rs = pd.read_csv(tmp / "out" / "return_sites.csv").set_index("dendrite").loc["all"]
    return {
        "scenario": scenario,
        "seed": seed,
        "snr": params.snr,
        "drift_um": params.drift_um,
        "f1": round(score["f1"], 4),
        "precision": round(score["precision"], 4),
        "recall": round(score["recall"], 4),
        "tracking_accuracy": round(score["tracking_accuracy"], 4),
        "formation_error_pp": [round(100 * v, 2) for v in g.formation_rate - t.formation_rate],
        "elimination_error_pp": [
            round(100 * v, 2) for v in g.elimination_rate - t.elimination_rate
        ],
        "max_rate_error_pp": round(
            100
            * max(
                np.abs(g.formation_rate - t.formation_rate).max(),
                np.abs(g.elimination_rate - t.elimination_rate).max(),
            ),
            2,
        ),
        "return_p": float(rs["p_value"]),
        "return_share": round(float(rs["share_near"]), 3),
        "return_null_share": round(float(rs["null_share_mean"]), 3),
        "analysis_s": round(seconds, 1),
    }


def null_calibration(tmp: Path, seeds: list[int]) -> dict:
    """Return-to-lost-sites p-values on the ground truth of ``no-return`` studies."""
    p = SpineParams()
    sim = SpineSimParams()
    ps = []
    for seed in seeds:
        toml = simulate_spine_study(tmp / f"null{seed}", scenario="no-return", seed=seed)
        labels = load_spine_sessions(toml).labels
        truth = pd.read_parquet(tmp / f"null{seed}" / "ground_truth" / "spines.parquet")
        pres = presence_matrix(truth[["dendrite", "session", "spine_id", "s_um", "side"]], labels)
        stretch = {d: (0.0, sim.dendrite_length_um) for d in pres["dendrite"].unique()}
        rs = return_to_lost_sites(
            pres,
            labels,
            new_session=labels[-1],
            stretch_um=stretch,
            distance_um=p.return_distance_um,
            exclusion_um=p.return_exclusion_um,
            n_permutations=p.n_permutations,
            seed=p.seed,
        )
        ps.append(float(rs.set_index("dendrite").loc["all", "p_value"]))
    arr = np.array(ps)
    return {
        "seeds": seeds,
        "p_values": [round(v, 4) for v in ps],
        "share_below_0.05": float(np.mean(arr < 0.05)) if ps else None,
        "share_below_0.10": float(np.mean(arr < 0.10)) if ps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--snr", type=float, nargs="+", default=[4, 6, 8, 10, 15])
    ap.add_argument("--drift", type=float, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--null-seeds", type=int, default=20, help="ground-truth null studies")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spines.json"))
    args = ap.parse_args()
    default = SpineSimParams()
    runs = []
    plan = [("stress-ketamine", s, default) for s in args.seeds]
    plan += [("no-return", s, default) for s in args.seeds]
    plan += [
        ("stress-ketamine", args.seeds[0], SpineSimParams(snr=v))
        for v in args.snr
        if v != default.snr
    ]
    plan += [
        ("stress-ketamine", args.seeds[0], SpineSimParams(drift_um=v))
        for v in args.drift
        if v != default.drift_um
    ]
    for scenario, seed, params in plan:
        with tempfile.TemporaryDirectory() as tmp:
            r = one_run(Path(tmp), scenario=scenario, seed=seed, params=params)
        runs.append(r)
        print(
            f"{scenario:16s} seed {seed} snr {r['snr']:>4g} drift {r['drift_um']:>3g} µm: "
            f"F1 {r['f1']:.3f} tracking {r['tracking_accuracy']:.3f} "
            f"max rate error {r['max_rate_error_pp']:.1f} pp, return p {r['return_p']:.4f} "
            f"({r['analysis_s']:.0f} s)",
            flush=True,
        )
    null_seeds = [1000 + i for i in range(args.null_seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        null = null_calibration(Path(tmp), null_seeds)
    if null_seeds:
        print(
            f"return test on the ground truth of {len(null_seeds)} no-return studies: "
            f"p < 0.05 in {null['share_below_0.05']:.0%}, "
            f"p < 0.10 in {null['share_below_0.10']:.0%}",
            flush=True,
        )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "defaults": {
            "snr": default.snr,
            "drift_um": default.drift_um,
            "rotation_deg": default.rotation_deg,
            "pixel_size_um": default.pixel_size_um,
        },
        "runs": runs,
        "null_calibration_ground_truth": null,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
