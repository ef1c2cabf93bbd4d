"""Scale benchmark: detect cells end to end in a synthetic volume of many GB, in bounded memory.

The volume (uint16, voxel 5 x 2 x 2 µm, planes of ``--plane`` x ``--plane`` voxels,
as many planes as ``--gb`` needs) is defined lazily, chunk by chunk: each chunk is
rendered on demand from a seed (a smooth background, Gaussian noise and the Gaussian
somata planted in it and in its neighbours), so it is never whole in memory and never
written to disk. The planted somata are known, so recall is measured (a planted soma
counts as found when a detected cell lies within 10 µm in 3D).

``detect_cells`` runs under the threaded scheduler (``--threads`` workers) while a
thread samples the resident memory of this process and its children every 0.2 s;
``ru_maxrss`` is reported as well. Then the first ``--compare-gb`` GB are detected
again with the threaded scheduler and on a LocalCluster of 2 worker processes (1
thread each), and the two cell tables are compared exactly. Prints and saves JSON
(``benchmarks/results/scale.json``, or ``--out``).

Usage::

    .venv/bin/python benchmarks/bench_scale.py --gb 1
    .venv/bin/python benchmarks/bench_scale.py --gb 20 --compare-gb 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import psutil
from dask.callbacks import Callback

from ketamap.engine.scheduler import use_scheduler
from ketamap.wholebrain.detect import DetectionParams, detect_cells

ROOT = Path(__file__).resolve().parents[1]
VOXEL_UM = (5.0, 2.0, 2.0)
SOMA_UM = 15.0
CELLS_PER_MVOX = 5.0  # planted somata per million voxels (about 2 500 per GB)
BACKGROUND = 100.0
NOISE_SD = 8.0
AMPLITUDE = (120.0, 360.0)  # peak soma intensity above background, uniform


def _sigma_vox() -> np.ndarray:
    return SOMA_UM / (2 * math.sqrt(3)) / np.asarray(VOXEL_UM)


def planted_in_chunk(index, chunks, shape, seed) -> np.ndarray:
    """Somata planted in one generation chunk: rows (z, y, x, amplitude), global voxels."""
    lo = [sum(chunks[a][: index[a]]) for a in range(3)]
    size = [chunks[a][index[a]] for a in range(3)]
    ss = np.random.SeedSequence([seed, 1, *index])
    rng = np.random.default_rng(ss)
    n = rng.poisson(CELLS_PER_MVOX * math.prod(size) / 1e6)
    pos = rng.uniform(0, 1, (n, 3)) * np.asarray(size) + np.asarray(lo)
    # keep somata a radius away from the volume's faces (a half soma is not a soma)
    margin = np.ceil(1.5 * _sigma_vox())
    keep = np.all((pos >= margin) & (pos < np.asarray(shape) - margin), axis=1)
    amp = rng.uniform(*AMPLITUDE, n)
    return np.column_stack([pos, amp])[keep]


def render_chunk(block_info, *, chunks, seed: int) -> np.ndarray:
    """One chunk of the synthetic volume, identical however often it is computed."""
    info = block_info[None]
    index, shape = info["chunk-location"], info["shape"]
    (z0, z1), (y0, y1), (x0, x1) = info["array-location"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, *index]))
    out = rng.normal(0.0, NOISE_SD, (z1 - z0, y1 - y0, x1 - x0)).astype(np.float32)
    z, y, x = np.ogrid[z0:z1, y0:y1, x0:x1]
    out += np.float32(BACKGROUND) + np.float32(20.0) * (
        np.sin(z / 97.0) + np.cos(y / 301.0) * np.sin(x / 257.0)
    ).astype(np.float32)
    sig = _sigma_vox()
    reach = np.ceil(4 * sig).astype(int)
    n_chunks = [len(c) for c in chunks]
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                nb = (index[0] + dz, index[1] + dy, index[2] + dx)
                if any(not 0 <= nb[a] < n_chunks[a] for a in range(3)):
                    continue
                for cz, cy, cx, amp in planted_in_chunk(nb, chunks, shape, seed):
                    c = (cz, cy, cx)
                    lo = [max(int(c[a]) - reach[a], (z0, y0, x0)[a]) for a in range(3)]
                    hi = [min(int(c[a]) + reach[a] + 1, (z1, y1, x1)[a]) for a in range(3)]
                    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                        continue
                    g = [
                        np.exp(-((np.arange(lo[a], hi[a]) - c[a]) ** 2) / (2 * sig[a] ** 2))
                        for a in range(3)
                    ]
                    out[
                        lo[0] - z0 : hi[0] - z0, lo[1] - y0 : hi[1] - y0, lo[2] - x0 : hi[2] - x0
                    ] += np.float32(amp) * (g[0][:, None, None] * g[1][None, :, None] * g[2])
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def synthetic_volume(shape, chunks, seed=0) -> da.Array:
    """The lazy synthetic volume (uint16, chunked like the detection)."""
    template = da.empty(shape, chunks=chunks, dtype=np.uint16)
    return da.map_blocks(
        lambda block_info=None: render_chunk(block_info, chunks=template.chunks, seed=seed),
        dtype=np.uint16,
        chunks=template.chunks,
        meta=np.empty((0, 0, 0), np.uint16),
    )


def planted(shape, chunks, seed=0) -> np.ndarray:
    """All planted somata (z, y, x) of the volume, in voxels."""
    norm = da.empty(shape, chunks=chunks, dtype=np.uint8).chunks
    rows = [
        planted_in_chunk(idx, norm, shape, seed)[:, :3]
        for idx in np.ndindex(*(len(c) for c in norm))
    ]
    return np.concatenate(rows) if rows else np.empty((0, 3))


def recall(truth_vox: np.ndarray, cells: pd.DataFrame, within_um=10.0) -> float:
    from scipy.spatial import cKDTree

    if len(truth_vox) == 0:
        return float("nan")
    if len(cells) == 0:
        return 0.0
    found = cells[["z_um", "y_um", "x_um"]].to_numpy()
    d, _ = cKDTree(found).query(truth_vox * np.asarray(VOXEL_UM), k=1)
    return float(np.mean(d <= within_um))


class TaskCount(Callback):
    """Count the tasks the local scheduler has finished (for the progress lines)."""

    def __init__(self):
        super().__init__()
        self.done, self.total = 0, 0

    def _start_state(self, dsk, state):
        self.total += len(dsk)

    def _posttask(self, key, result, dsk, state, worker_id):
        self.done += 1


class PeakRSS:
    """Sample the resident memory of this process and its children in a thread.

    Every ``report_s`` seconds a line gives the elapsed time, the current and peak
    memory and, under the local scheduler, the fraction of tasks done.
    """

    def __init__(self, period_s: float = 0.2, report_s: float = 60.0, tasks=None):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()
        self.report_s, self.tasks = report_s, tasks
        self._proc = psutil.Process()

    def _sample(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        t0 = last = time.perf_counter()
        while not self._stop.wait(self.period_s):
            now = self._sample()
            self.peak = max(self.peak, now)
            if time.perf_counter() - last >= self.report_s:
                last = time.perf_counter()
                done = (
                    f", tasks {self.tasks.done}/{self.tasks.total}"
                    if self.tasks and self.tasks.total
                    else ""
                )
                print(
                    f"  {last - t0:7.0f} s: rss {now / 1e9:.2f} GB, peak {self.peak / 1e9:.2f} GB"
                    f"{done}",
                    flush=True,
                )

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def cpu_s() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    own = psutil.Process().cpu_times()
    return own.user + own.system + own.children_user + own.children_system


def detect(volume, params, **scheduler) -> tuple[pd.DataFrame, float, int, float]:
    tasks = TaskCount()
    with use_scheduler(**scheduler), tasks, PeakRSS(tasks=tasks) as mem:
        t0, c0 = time.perf_counter(), cpu_s()
        cells = detect_cells(volume, voxel_size_um=VOXEL_UM, params=params)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return cells, wall, mem.peak, cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the uint16 volume (GB)")
    ap.add_argument("--plane", type=int, default=2048, help="plane size y = x (voxels)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, nargs=3, default=None, help="chunk z y x (voxels)")
    ap.add_argument(
        "--compare-gb", type=float, default=0.25, help="GB detected on both schedulers (0 to skip)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args(argv)

    params = DetectionParams(**({"chunk_size_vox": tuple(args.chunk)} if args.chunk else {}))
    plane = args.plane * args.plane * 2
    shape = (max(1, round(args.gb * 1e9 / plane)), args.plane, args.plane)
    chunks = params.chunk_size_vox
    volume = synthetic_volume(shape, chunks, args.seed)
    truth = planted(shape, chunks, args.seed)
    print(
        f"volume {shape} uint16 = {volume.nbytes / 1e9:.2f} GB in {volume.npartitions} "
        f"chunks of {chunks}; {len(truth)} planted somata",
        flush=True,
    )
    base_rss = psutil.Process().memory_info().rss

    cells, wall, peak, cpu = detect(volume, params, threads=args.threads)
    result = {
        "shape": list(shape),
        "gb": volume.nbytes / 1e9,
        "voxels": int(volume.size),
        "voxel_size_um": list(VOXEL_UM),
        "chunk_size_vox": list(chunks),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "memory_gb": psutil.virtual_memory().total / 1e9,
        "machine": platform.platform(),
        "dask": dask.__version__,
        "planted": int(len(truth)),
        "detected": int(len(cells)),
        "recall_10um": recall(truth, cells),
        "wall_s": wall,
        "mvoxels_per_s": volume.size / wall / 1e6,
        "cpu_s": cpu,
        "mvoxels_per_cpu_s": volume.size / cpu / 1e6,
        "load_average_1min": os.getloadavg()[0],
        "gb_per_hour": volume.nbytes / 1e9 / wall * 3600,
        "peak_rss_gb_sampled": peak / 1e9,
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "rss_before_gb": base_rss / 1e9,
        "projected_20gb_s": 20e9 / (volume.nbytes / wall),
        "projected_20gb_s_on_2_free_cores": 20e9 / 2 / (volume.nbytes / cpu),
    }
    print(json.dumps(result, indent=1), flush=True)

    if args.compare_gb > 0:
        nz = min(shape[0], max(1, round(args.compare_gb * 1e9 / plane)))
        sub = volume[:nz]
        if nz == shape[0]:  # the whole volume: the threaded run above is the reference
            ref, t_threads = cells, wall
        else:
            ref, t_threads, _, _ = detect(sub, params, threads=args.threads)
        other, t_cluster, peak_cluster, _ = detect(
            sub, params, cluster="local", n_workers=2, threads_per_worker=1, memory_limit="4GB"
        )
        identical = ref.equals(other)
        result["cluster_compare"] = {
            "shape": [nz, *shape[1:]],
            "cells": int(len(ref)),
            "identical": bool(identical),
            "threads_wall_s": t_threads,
            "local_cluster_2x1_wall_s": t_cluster,
            "local_cluster_peak_rss_gb_sampled": peak_cluster / 1e9,
        }
        print(json.dumps(result["cluster_compare"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {args.out}")
    if args.compare_gb > 0 and not result["cluster_compare"]["identical"]:
        sys.exit("the LocalCluster gave other cells than the threaded scheduler")
    return result


if __name__ == "__main__":
    main()
