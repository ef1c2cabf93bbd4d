"""Benchmark matching cells across sessions (mean-image registration + footprints).

On simulated studies (4 sessions, each after the first rotated and shifted,
5 % of ROIs missed per session, ROI order shuffled) it measures, for every
pair of sessions, the fraction of true cell pairs recovered (recall) and of
reported pairs that are true (precision), and the time of ``track_cells``.

Usage::

    python benchmarks/bench_cell_matching.py [--seeds 10]

Prints the numbers and writes them to ``benchmarks/results/cell_matching.json``.
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

from ketamap.invivo.ensembles.matching import track_cells
from ketamap.simulate.calcium import CALCIUM_SCENARIOS, simulate_calcium_study

LABELS = [s[0] for s in CALCIUM_SCENARIOS["stress-ketamine"]]


def _load(root: Path):
    means, stats = [], []
    for label in LABELS:
        plane = root / label / "suite2p" / "plane0"
        means.append(np.load(plane / "ops.npy", allow_pickle=True).item()["meanImg"])
        stats.append(list(np.load(plane / "stat.npy", allow_pickle=True)))
    return means, stats, pd.read_csv(root / "ground_truth" / "cell_map.csv")


def _scores(ids, truth) -> tuple[int, int, int]:
    hit = n_true = n_pred = 0
    for i, a in enumerate(LABELS):
        for j in range(i + 1, len(LABELS)):
            b = LABELS[j]
            ta = truth[truth.session == a].set_index("global_cell")["cell"]
            tb = truth[truth.session == b].set_index("global_cell")["cell"]
            common = ta.index.intersection(tb.index)
            true = set(zip(ta[common], tb[common], strict=True))
            pos = {g: r for r, g in enumerate(ids[i])}
            pred = {(pos[g], r) for r, g in enumerate(ids[j]) if g in pos}
            hit += len(true & pred)
            n_true += len(true)
            n_pred += len(pred)
    return hit, n_true, n_pred


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cell_matching.json"))
    args = ap.parse_args()
    configs = {
        "default (200 cells, <=8 px, <=2.5 deg)": dict(n_cells=200),
        "dense (1000 cells, ROIs 8 px apart)": dict(n_cells=1000),
        "large drift (400 cells, <=15 px, <=4 deg)": dict(
            n_cells=400, max_shift_px=15.0, max_rotation_deg=4.0
        ),
        "footprints only, no mean image (400 cells)": dict(n_cells=400, no_mean=True),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs.items():
            cfg = dict(cfg)
            no_mean = cfg.pop("no_mean", False)
            hit = n_true = n_pred = 0
            times = []
            for seed in range(args.seeds):
                root = Path(tmp) / f"s{seed}"
                simulate_calcium_study(root, seed=seed, duration_s=10.0, **cfg)
                means, stats, truth = _load(root)
                if no_mean:
                    means = [None] * len(means)
                t0 = time.perf_counter()
                ids, _ = track_cells(means, stats)
                times.append(time.perf_counter() - t0)
                h, t, p = _scores(ids, truth)
                hit, n_true, n_pred = hit + h, n_true + t, n_pred + p
            results[name] = {
                "runs": args.seeds,
                "true_pairs": n_true,
                "recall": hit / n_true,
                "precision": hit / n_pred,
                "track_cells_s_median": float(np.median(times)),
            }
            r = results[name]
            print(
                f"{name}: recall {r['recall']:.4f}, precision {r['precision']:.4f} over "
                f"{n_true} true cell pairs in {args.seeds} studies; track_cells "
                f"{r['track_cells_s_median']:.2f} s (median, 4 sessions)"
            )
    out = {
        "benchmark": "cell matching across sessions",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
