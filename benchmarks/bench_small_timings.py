"""Timings of small, frequent operations (speed lives here, never in a test's asserts).

* ``make_phantom``: build the built-in phantom atlas at 100 µm and at 50 µm
  (target: under 1 s and under 3 s).
* ``compare_regions``: the region statistics of a cohort of 3 groups × 4 mice
  (3 contrasts: two groups and the dose trend) for 300 and 1300 regions (target
  for 300 regions: well under 10 s). The counts are simulated as in
  ``tests/stats/test_regions.py``: expected counts log-uniform 5-500 per region,
  gamma-Poisson with a between-mouse CV of 15-20 %, brain size ±5 %.

Each operation runs ``--repeats`` times after one untimed warm-up; the minimum
and the median are reported. BLAS and OpenMP run on one thread unless the
environment says otherwise (``OMP_NUM_THREADS`` etc. set before the start).

Usage::

    python benchmarks/bench_small_timings.py [--repeats 5] [--out small_timings.json]

Prints one line per operation and writes ``benchmarks/results/small_timings.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ketamap.atlas import make_phantom  # noqa: E402
from ketamap.stats import compare_regions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = (("saline", 0.0), ("ketamine_30", 30.0), ("ketamine_100", 100.0))


def count_cohort(seed: int, n_regions: int, n_per_group: int = 4):
    """Long count table and subject table of a null cohort (no group effect)."""
    rng = np.random.default_rng(seed)
    subjects = pd.DataFrame(
        [(f"{g}-{i}", g, d) for g, d in GROUPS for i in range(n_per_group)],
        columns=["subject", "group", "dose_mg_per_kg"],
    )
    expected = np.exp(rng.uniform(np.log(5), np.log(500), n_regions))
    volume = np.exp(rng.uniform(np.log(0.05), np.log(5), n_regions))
    shape = 1 / rng.uniform(0.15, 0.20, n_regions) ** 2
    frames = []
    for sid in subjects["subject"]:
        brain = rng.normal(1, 0.05)
        mu = expected * brain
        frames.append(
            pd.DataFrame(
                {
                    "subject": sid,
                    "region_id": np.arange(1, n_regions + 1, dtype=np.int64),
                    "acronym": [f"R{i}" for i in range(1, n_regions + 1)],
                    "level": 1 + np.arange(n_regions) % 5,
                    "count": rng.poisson(rng.gamma(shape, mu / shape)).astype(np.int64),
                    "volume_mm3": volume * brain,
                }
            )
        )
    return pd.concat(frames, ignore_index=True), subjects


def timed(fn, repeats: int) -> dict:
    """Run ``fn`` once untimed, then ``repeats`` times; return the times in seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"min_s": min(runs), "median_s": statistics.median(runs), "runs_s": runs}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per operation")
    ap.add_argument("--out", default="small_timings.json", help="file under benchmarks/results/")
    args = ap.parse_args()
    result = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "blas_threads": os.environ["OPENBLAS_NUM_THREADS"],
        "numpy": np.__version__,
        "repeats": args.repeats,
        "operations": {},
    }
    ops = {
        "make_phantom_100um": (lambda: make_phantom(resolution_um=100), 1.0),
        "make_phantom_50um": (lambda: make_phantom(resolution_um=50), 3.0),
    }
    for n in (300, 1300):
        counts, subjects = count_cohort(11, n)
        ops[f"compare_regions_{n}_regions"] = (
            lambda c=counts, s=subjects: compare_regions(c, s, reference_group="saline"),
            10.0 if n == 300 else None,
        )
    for name, (fn, target) in ops.items():
        row = {**timed(fn, args.repeats), "target_s": target}
        if target is not None:
            row["within_target"] = row["median_s"] < target
        result["operations"][name] = row
        print(f"{name}: min {row['min_s']:.3f} s, median {row['median_s']:.3f} s"
              + (f" (target < {target:g} s)" if target else ""), flush=True)  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {RESULTS / args.out}")


if __name__ == "__main__":
    main()
