"""Benchmark the ensembles core: 1,000 cells × 50,000 frames in <= 60 s on 2 cores.

Also measures, on the simulator, the best-match Jaccard of planted ensembles at
the default signal-to-noise and the false-ensemble rate over many null runs.

Usage::

    python benchmarks/bench_ensembles.py [--cells 1000] [--frames 50000] [--null-runs 200]

Prints the numbers and writes them to ``benchmarks/results/ensembles.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ketamap.invivo.ensembles.assemblies import match_assemblies
from ketamap.invivo.ensembles.session import EnsembleParams, analyse_session
from ketamap.simulate.calcium import simulate_calcium_traces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=50000)
    ap.add_argument("--null-runs", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensembles.json"))
    args = ap.parse_args()
    params = EnsembleParams()
    rng = np.random.default_rng(0)
    perm = rng.permutation(args.cells)
    ens = [np.sort(perm[i * 20 : (i + 1) * 20]) for i in range(10)]
    t0 = time.perf_counter()
    tr = simulate_calcium_traces(
        args.cells, args.frames, frame_rate_hz=15.0, ensembles=ens, coordination=0.9, seed=1
    )
    t_sim = time.perf_counter() - t0
    F, Fneu = tr.F, tr.Fneu
    del tr
    tracemalloc.start()
    t0 = time.perf_counter()
    res = analyse_session(F, Fneu, frame_rate_hz=15.0, params=params)
    t_core = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    jac = match_assemblies(ens, res.assemblies.members)
    print(
        f"{args.cells} cells x {args.frames} frames: analyse_session {t_core:.1f} s, "
        f"peak traced memory {peak / 2**20:.0f} MiB (input {2 * F.nbytes / 2**20:.0f} MiB), "
        f"{res.assemblies.n} ensembles found of {len(ens)}, best-match Jaccard min "
        f"{jac.min():.2f} mean {jac.mean():.2f}"
    )

    # null calibration: many small null recordings (100 cells, 5 min at 15 Hz, 0.2 s bins)
    false, t0 = 0, time.perf_counter()
    for seed in range(args.null_runs):
        tr = simulate_calcium_traces(100, 4500, ensembles=[], seed=10_000 + seed)
        false += analyse_session(tr.F, tr.Fneu, frame_rate_hz=15.0, params=params).assemblies.n > 0
    rate = false / max(args.null_runs, 1)
    print(
        f"null: false ensemble in {false} of {args.null_runs} runs ({100 * rate:.1f} %), "
        f"{time.perf_counter() - t0:.0f} s"
    )

    # Jaccard at default SNR over 10 seeds (200 cells, 4 ensembles of 12, 10 min)
    jacs = []
    for seed in range(10):
        r = np.random.default_rng(seed)
        p = r.permutation(200)
        e = [np.sort(p[i * 12 : (i + 1) * 12]) for i in range(4)]
        tr = simulate_calcium_traces(200, 9000, ensembles=e, coordination=0.9, seed=seed)
        a = analyse_session(tr.F, tr.Fneu, frame_rate_hz=15.0, params=params).assemblies
        jacs.append(float(match_assemblies(e, a.members).min()))
    print(
        f"Jaccard (worst ensemble per run) over 10 runs: min {min(jacs):.2f}, "
        f"mean {np.mean(jacs):.2f}"
    )

    out = {
        "cells": args.cells,
        "frames": args.frames,
        "seconds_analyse_session": round(t_core, 2),
        "seconds_simulate": round(t_sim, 2),
        "peak_traced_mib": round(peak / 2**20, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ensembles_planted": len(ens),
        "ensembles_found": res.assemblies.n,
        "jaccard_min": round(float(jac.min()), 3),
        "null_runs": args.null_runs,
        "null_false_ensembles": int(false),
        "null_false_rate": rate,
        "jaccard_default_snr_runs": [round(j, 3) for j in jacs],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
