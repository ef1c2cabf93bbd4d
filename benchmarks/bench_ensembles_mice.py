"""Null calibration and power of the across-mice session comparison (``compare_mice``).

Each simulated study has ``n`` mice, one field of view each, imaged in two sessions
(``simulate_calcium_cohort``: mice differ in coordination, SD 0.15, and each mouse
moves from day to day, SD 0.08, with its firing rate and imaging noise; 60 cells, 3
ensembles of 12, 3 min at 15 Hz). Every session is analysed by ``analyse_session`` and
the per-cell mean coactivity is compared between the sessions by

* ``compare_mice(unit="field")``: per-field means, random intercept per mouse;
* ``compare_mice(unit="cell")``: every cell, random intercept per mouse plus session
  within mouse;
* for contrast, the pseudo-replicated model: every cell, random intercept per mouse
  only, statsmodels' normal p-value (what a per-cell mixed model gives by default).

Under the null no session effect is planted; for power, coordination falls by 0.2 in
the second session.

Usage::

    python benchmarks/bench_ensembles_mice.py [--studies 400] [--power-studies 200]

Prints a table and writes ``benchmarks/results/ensembles_mice.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.invivo.ensembles.mice import compare_mice
from ketamap.invivo.ensembles.session import analyse_session
from ketamap.simulate.calcium import simulate_calcium_cohort

SIM = {"duration_s": 180.0, "n_cells": 60}


def study_cells(n_mice: int, seed: int, effect: float = 0.0) -> pd.DataFrame:
    """Per-cell measures of one simulated study (mouse, session, mean_coactivity)."""
    frames = []
    for r in simulate_calcium_cohort(
        n_mice, seed=seed, effect={"later": effect} if effect else None, **SIM
    ):
        res = analyse_session(r["traces"].F, r["traces"].Fneu, frame_rate_hz=15.0)
        frames.append(res.per_cell.assign(mouse=r["mouse"], session=r["session"]))
    return pd.concat(frames, ignore_index=True)


def naive_p(cells: pd.DataFrame) -> float:
    """Per-cell model with a mouse intercept only, statsmodels' own (normal) p-value."""
    import statsmodels.formula.api as smf

    d = cells.assign(y=cells["mean_coactivity"] / cells["mean_coactivity"].std())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("y ~ C(session)", d, groups="mouse").fit(reml=True)
    return float(fit.pvalues["C(session)[T.later]"])


def run(n_mice: int, n_studies: int, effect: float, seed0: int) -> dict:
    p = {"field": [], "cell": [], "naive": []}
    fellback = {"field": 0, "cell": 0}
    for i in range(n_studies):
        cells = study_cells(n_mice, seed0 + i, effect)
        for unit in ("field", "cell"):
            row = compare_mice(cells, unit=unit).iloc[0]
            p[unit].append(float(row["p_value"]))
            fellback[unit] += not bool(row["converged"])
        p["naive"].append(naive_p(cells))
    out = {}
    for k, v in p.items():
        v = np.asarray(v)
        out[k] = {"rate_p_below_0.05": float(np.mean(v < 0.05)), "n": int(len(v))}
        if k in fellback:
            out[k]["fraction_fallback"] = fellback[k] / n_studies
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=400)
    ap.add_argument("--power-studies", type=int, default=200)
    ap.add_argument("--mice", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ensembles_mice.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = {"simulation": SIM | {"mouse_sd": 0.15, "session_sd": 0.08}, "null": {},
               "power_effect_-0.2": {}}  # fmt: skip
    for n in args.mice:
        results["null"][n] = run(n, args.studies, 0.0, 10_000 * n)
        print(f"null, {n} mice:", results["null"][n], flush=True)
    for n in args.mice:
        results["power_effect_-0.2"][n] = run(n, args.power_studies, -0.2, 20_000 * n + 7)
        print(f"power, {n} mice:", results["power_effect_-0.2"][n], flush=True)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["machine"] = platform.platform()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
