"""Benchmark ketamap's fibre segmentation: speed, peak memory and accuracy against the truth.

Speed and memory: a simulated fibre volume (``ketamap.simulate.fibres``, 4 x 2 x 2 µm,
three regions of 1500, 600 and 200 mm/mm³, autofluorescence channel) of
``--block`` voxels is tiled ``--tiles`` times along each axis (by default 384 x 768 x
768 voxels: several chunks along every axis, so that chunk faces inside the volume and
their overlap weigh as they do in a whole brain); each measurement runs
in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own:
``segment_fibres`` on a Dask array (threaded scheduler, ``--workers``; mask and
skeleton computed together; the noise pass, the background scale and the tissue mask
included; the input wrapped as ketamap wraps a volume or memory map it reads,
:func:`ketamap.io.volumes.lazy_array`, which reads it chunk by chunk and neither
hashes nor copies it, where ``dask.array.from_array`` would copy it whole before the
work starts; the faster of two runs, the first being cold), the same on one thread,
and one 3D ``scipy.ndimage.gaussian_filter`` pass in float32 with the filter's own
smoothing sigma over the whole volume (before and after; the faster is the yardstick;
its first pass in a fresh process is the ratio's unit, and a second, warm pass in the
same process is recorded too). Every run records its CPU time (user + system) and the
load average. Other work may share the cores: the ratio to the Gaussian pass measured
in the same run is robust to that load. The same Gaussian filter is also timed on the
chunks ``segment_fibres`` filters (with their overlap), on one thread and on two: its
time is the filter's own share of the work (the whole volume's 768 x 768 planes are a
power-of-two multiple apart in memory and filter slowly along z), and its speed-up on
two threads (it holds no GIL) measures the cores the machine gives at the time
(``gaussian_chunks_speedup_2_threads``), against which the parallel efficiency of
``segment_fibres`` is to be read.

Accuracy, on the fields of ``tests/wholebrain/test_fibres.py`` (40 x 240 x 240 voxels,
the interior 3 voxels from the faces, default parameters, the all-tissue mask given):
voxel precision and recall against the true footprint and the measured / true length
of every region, for the sparse and the dense field over ``--seeds`` seeds; the same
against the fibres' brightness (``fibre_snr``) and the density of the densest region;
and the total length under three chunkings.

Prints and saves JSON (``benchmarks/results/bench_fibres.json``).

Usage::

    .venv/bin/python benchmarks/bench_fibres.py [--tiles 6 2 2] [--workers 2] [--seeds 3]
        [--skip-speed | --skip-accuracy] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
VOXEL_UM = (4.0, 2.0, 2.0)

_PRELUDE = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    vol = np.load(sys.argv[1])
    bg = np.load(Path(sys.argv[1]).with_name("background.npy"))
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    """
)

_KETAMAP = _PRELUDE + textwrap.dedent(
    """
    import os
    import dask
    from ketamap.io.volumes import lazy_array
    from ketamap.wholebrain.fibres import FibreParams, segment_fibres, skeleton_lengths
    dask.config.set(scheduler="threads", num_workers=int(sys.argv[2]))
    params = FibreParams()
    chunks = params.chunk_size_vox
    runs, cpus, loads = [], [], []
    for _ in range(2):  # the first run is cold; the faster one is kept
        loads.append(os.getloadavg()[0])
        t, u = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        mask, skeleton, qc = segment_fibres(
            lazy_array(vol, chunks=chunks), voxel_size_um=(4.0, 2.0, 2.0),
            background=lazy_array(bg, chunks=chunks), params=params)
        n_mask, n_skel = dask.compute(mask.sum(), skeleton.sum())
        runs.append(time.perf_counter() - t)
        v = resource.getrusage(resource.RUSAGE_SELF)
        cpus.append(v.ru_utime - u.ru_utime + v.ru_stime - u.ru_stime)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = int(np.argmin(runs))
    print(json.dumps({"wall_s": runs[best], "wall_s_runs": runs, "cpu_s": cpus[best],
                      "cpu_s_runs": cpus, "cores_used": cpus[best] / runs[best],
                      "load_average_runs": loads, "n_fibre_voxels": int(n_mask),
                      "n_skeleton_voxels": int(n_skel), "chunks": qc["chunks"],
                      "overlap_vox": qc["overlap_vox"], "peak_rss_mib": peak / 1024,
                      "input_mib": (vol.nbytes + bg.nbytes) / 2**20}))
    """
)

_GAUSS = _PRELUDE + textwrap.dedent(
    """
    import itertools, math, os
    from concurrent.futures import ThreadPoolExecutor
    from scipy import ndimage as ndi
    from ketamap.wholebrain.fibres import FibreParams, _axis_chunks, _plan
    plan = _plan((4.0, 2.0, 2.0), FibreParams())
    load = os.getloadavg()[0]
    t = time.perf_counter()
    x = vol.astype(np.float32)
    ndi.gaussian_filter(x, plan.sigma_vox, radius=plan.radius_vox, output=x)
    wall = time.perf_counter() - t
    t = time.perf_counter()  # again, in the memory of the first pass
    np.copyto(x, vol)
    ndi.gaussian_filter(x, plan.sigma_vox, radius=plan.radius_vox, output=x)
    warm = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the same filter on the chunks of segment_fibres with their overlap, on 1 and 2
    # threads (it holds no GIL: the speed-up measures the cores at hand)
    axes = []
    for n, size, depth, block in zip(
            vol.shape, FibreParams().chunk_size_vox, plan.depth, plan.noise_block):
        sizes = _axis_chunks(n, size, depth, block)
        depth = depth if len(sizes) > 1 else 0
        axes.append([slice(max(end - c - depth, 0), min(end + depth, n))
                     for c, end in zip(sizes, np.cumsum(sizes))])
    parts = [np.ascontiguousarray(x[box]) for box in itertools.product(*axes)]
    def smooth(p):
        ndi.gaussian_filter(p, plan.sigma_vox, radius=plan.radius_vox, output=p)
    threads = {}
    for n in (1, 2, 1, 2):
        t = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(smooth, parts))
        threads[n] = min(threads.get(n, math.inf), time.perf_counter() - t)
    print(json.dumps({"wall_s": wall, "wall_s_warm": warm, "sigma_vox": list(plan.sigma_vox),
                      "peak_rss_mib": peak / 1024, "load_average": load,
                      "chunks_1_thread_s": threads[1], "chunks_2_threads_s": threads[2],
                      "chunk_shapes": [list(p.shape) for p in parts]}))
    """
)


def _run(code: str, volume: Path, extra=()) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(volume), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _speed_volume(block, tiles, seed: int = 11):
    from ketamap.simulate.fibres import region_slabs, simulate_fibres

    labels, _ = region_slabs(tuple(block), (1, 2, 3))
    sim = simulate_fibres(labels, densities_mm_per_mm3={1: 1500.0, 2: 600.0, 3: 200.0}, seed=seed)
    return np.tile(sim.signal, tiles), np.tile(sim.background, tiles)


def _all_tissue(shape):
    from ketamap.wholebrain.tissue import TissueMask

    return TissueMask(np.ones((1, 1, 1), bool), shape, shape, math.nan, math.nan, math.nan)


def _accuracy(densities, seed, *, shape=(40, 240, 240), margin=3, chunks=None, **sim_kw):
    """Precision, recall and per-region length ratio of one simulated field."""
    from ketamap.simulate.fibres import (
        FibreSimParams,
        region_slabs,
        simulate_fibres,
        true_length_table,
    )
    from ketamap.wholebrain.fibres import FibreParams, segment_fibres, skeleton_lengths

    labels, _ = region_slabs(shape, (1, 2, 3))
    sim = simulate_fibres(
        labels,
        densities_mm_per_mm3=dict(zip((1, 2, 3), densities)),
        seed=seed,
        params=FibreSimParams(**sim_kw),
    )
    params = FibreParams() if chunks is None else FibreParams(chunk_size_vox=chunks)
    t = time.perf_counter()
    mask, skeleton, qc = segment_fibres(
        sim.signal,
        voxel_size_um=sim.voxel_size_um,
        background=sim.background,
        tissue=_all_tissue(shape),
        params=params,
    )
    wall = time.perf_counter() - t
    inner = np.zeros(shape, bool)
    inner[(slice(margin, -margin),) * 3] = True
    truth, found = (sim.true_mask > 0) & inner, (mask > 0) & inner
    hit = int((truth & found).sum())
    lab = np.where(inner, labels, 0)
    true = true_length_table(sim.points, lab, None, sim.voxel_size_um).set_index("region_id")
    lengths = skeleton_lengths(skeleton, sim.voxel_size_um, smoothing=params.length_smoothing)
    regions = {}
    for k in (1, 2, 3):
        t_len = float(true.loc[k, "length_um"])
        regions[str(k)] = {
            "true_mm_per_mm3": float(true.loc[k, "density_mm_per_mm3"]),
            "length_ratio": float(lengths[lab == k].sum() / t_len) if t_len > 0 else None,
            "precision": float((truth & found)[lab == k].sum() / max(found[lab == k].sum(), 1)),
            "recall": float((truth & found)[lab == k].sum() / max(truth[lab == k].sum(), 1)),
        }
    return {
        "precision": hit / max(int(found.sum()), 1),
        "recall": hit / max(int(truth.sum()), 1),
        "regions": regions,
        "total_length_um": float(lengths.sum()),
        "segment_s": wall,
    }


def _summary(runs: list[dict]) -> dict:
    ratios = [
        r["length_ratio"]
        for run in runs
        for r in run["regions"].values()
        if r["length_ratio"] is not None and r["true_mm_per_mm3"] >= 1.0
    ]
    return {
        "precision_min": min(r["precision"] for r in runs),
        "precision_mean": float(np.mean([r["precision"] for r in runs])),
        "recall_min": min(r["recall"] for r in runs),
        "recall_mean": float(np.mean([r["recall"] for r in runs])),
        "length_ratio_min": min(ratios),
        "length_ratio_max": max(ratios),
        "length_error_max": max(abs(r - 1.0) for r in ratios),
        "runs": runs,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, nargs=3, default=(64, 384, 384), help="simulated block")
    ap.add_argument("--tiles", type=int, nargs=3, default=(6, 2, 2), help="tiles along z, y, x")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_fibres.json"))
    args = ap.parse_args(argv)

    result: dict = {
        "voxel_size_um": list(VOXEL_UM),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "machine": platform.platform(),
        "load_average_start": os.getloadavg()[0],
    }
    if not args.skip_speed:
        signal, background = _speed_volume(args.block, args.tiles)
        result |= {"shape": list(signal.shape), "voxels": int(signal.size)}
        with tempfile.TemporaryDirectory() as tmp:
            vpath = Path(tmp) / "volume.npy"
            np.save(vpath, signal)
            np.save(Path(tmp) / "background.npy", background)
            del signal, background
            gauss = [_run(_GAUSS, vpath)]
            k = _run(_KETAMAP, vpath, (str(args.workers),))
            k1 = _run(_KETAMAP, vpath, ("1",))
            gauss.append(_run(_GAUSS, vpath))
        g = min(gauss, key=lambda r: r["wall_s"])
        g["wall_s_runs"] = [r["wall_s"] for r in gauss]
        g["wall_s_warm"] = min(r["wall_s_warm"] for r in gauss)
        g["chunks_1_thread_s"] = min(r["chunks_1_thread_s"] for r in gauss)
        g["chunks_2_threads_s"] = min(r["chunks_2_threads_s"] for r in gauss)
        g["load_average_runs"] = [r["load_average"] for r in gauss]
        k["mvoxels_per_s"] = result["voxels"] / k["wall_s"] / 1e6
        k1["mvoxels_per_s"] = result["voxels"] / k1["wall_s"] / 1e6
        result |= {
            "ketamap": k,
            "ketamap_1_thread": k1,
            "gaussian_scipy_float32": g,
            "ketamap_over_gaussian": k["wall_s"] / g["wall_s"],
            "ketamap_1_thread_over_gaussian": k1["wall_s"] / g["wall_s"],
            "ketamap_over_gaussian_warm": k["wall_s"] / g["wall_s_warm"],
            "ketamap_1_thread_over_gaussian_warm": k1["wall_s"] / g["wall_s_warm"],
            "parallel_efficiency_2_threads": k1["wall_s"] / (args.workers * k["wall_s"]),
            "gaussian_chunks_speedup_2_threads": g["chunks_1_thread_s"] / g["chunks_2_threads_s"],
            "ketamap_1_thread_over_gaussian_chunks": k1["wall_s"] / g["chunks_1_thread_s"],
        }
        print(json.dumps({key: v for key, v in result.items()}, indent=2), flush=True)

    if args.skip_accuracy:
        return _save(result, args.out)
    seeds = range(1, args.seeds + 1)
    sparse, dense = (600.0, 300.0, 100.0), (1800.0, 1200.0, 600.0)
    result["accuracy_sparse"] = _summary([_accuracy(sparse, s) for s in seeds])
    result["accuracy_dense"] = _summary([_accuracy(dense, s) for s in seeds])
    result["accuracy_vs_snr"] = {
        str(snr): _summary([_accuracy(sparse, 1, fibre_snr=snr)]) for snr in (6.0, 8.0, 12.0, 20.0)
    }
    result["accuracy_vs_density"] = {
        str(d): _summary([_accuracy((d, d / 2, d / 4), 1)]) for d in (300.0, 1000.0, 2000.0, 3000.0)
    }
    totals = [
        _accuracy(sparse, 1, chunks=c)["total_length_um"]
        for c in ((40, 240, 240), (24, 96, 96), (16, 128, 64))
    ]
    result["chunkings_total_length_um"] = totals
    result["chunkings_max_relative_difference"] = (max(totals) - min(totals)) / max(totals)
    for key in ("accuracy_sparse", "accuracy_dense"):
        s = result[key]
        print(
            f"{key}: precision >= {s['precision_min']:.3f}, recall >= {s['recall_min']:.3f}, "
            f"length ratio {s['length_ratio_min']:.3f}-{s['length_ratio_max']:.3f}"
        )
    return _save(result, args.out)


def _save(result: dict, out: str) -> dict:
    result["load_average_end"] = os.getloadavg()[0]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
