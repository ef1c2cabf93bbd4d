"""Benchmark the fibres stage's peak memory on a volume larger than memory-light defaults.

A simulated fibre block (``ketamap.simulate.fibres``, 4 x 2 x 2 µm, three regions of
1500, 600 and 200 mm/mm³, autofluorescence channel; ``--block`` voxels) is tiled lazily
(``dask.array.tile``) ``--tiles`` times along each axis, so the input costs no memory
beyond the block itself; the volume is segmented and both images written as the census'
fibres stage does it (``segment_fibres`` on Dask chunks, ``write_fibre_outputs``, which
computes a slab of chunk rows at a time), on the threaded scheduler with ``--workers``.
Each chunk size of ``--chunks`` runs in its own subprocess, so its peak resident
memory (``ru_maxrss``, the block loaded from a file included) is its own; the wall time is
recorded too (other work may share the cores: compare times within one run).

Prints and saves JSON (``benchmarks/results/bench_fibre_memory.json``).

Usage::

    .venv/bin/python benchmarks/bench_fibre_memory.py [--block 64 384 384]
        [--tiles 6 4 4] [--workers 2] [--chunks 64 384 384 --chunks 128 384 384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_fibres import _run  # noqa: E402  (each measurement in its own process)

_RUN = textwrap.dedent(
    """
    import json, resource, sys, tempfile, time
    import dask, dask.array as da
    from ketamap.io.volumes import lazy_array
    from ketamap.wholebrain.fibres import FibreParams, segment_fibres, write_fibre_outputs
    import numpy as np
    folder = Path(sys.argv[1])
    tiles, chunks, workers, vs = (json.loads(a) for a in sys.argv[2:6])
    signal, background = (
        da.tile(lazy_array(np.load(folder / f"{name}.npy")), tiles)
        for name in ("signal", "background")
    )
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dask.config.set(scheduler="threads", num_workers=workers)
    t = time.perf_counter()
    mask, skeleton, qc = segment_fibres(signal, voxel_size_um=vs,
                                        background=background,
                                        params=FibreParams(chunk_size_vox=tuple(chunks)))
    with tempfile.TemporaryDirectory() as tmp:
        write_fibre_outputs(mask, skeleton, Path(tmp) / "out", voxel_size_um=vs)
    wall = time.perf_counter() - t
    print(json.dumps({"shape": list(signal.shape), "voxels": int(signal.size),
                      "input_mib_if_loaded": 2 * signal.nbytes / 2**20,
                      "chunks": qc["chunks"], "overlap_vox": qc["overlap_vox"],
                      "wall_s": wall, "mvoxels_per_s": signal.size / wall / 1e6,
                      "baseline_rss_mib": base,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
).replace("import json, resource", "from pathlib import Path\nimport json, resource")


_MAKE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from ketamap.simulate.fibres import region_slabs, simulate_fibres
    folder, block = Path(sys.argv[1]), tuple(json.loads(sys.argv[2]))
    labels, _ = region_slabs(block, (1, 2, 3))
    sim = simulate_fibres(labels, densities_mm_per_mm3={1: 1500.0, 2: 600.0, 3: 200.0},
                          seed=11)
    np.save(folder / "signal.npy", sim.signal)
    np.save(folder / "background.npy", sim.background)
    print(json.dumps({"voxel_size_um": list(sim.voxel_size_um)}))
    """
)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, nargs=3, default=(64, 384, 384))
    ap.add_argument("--tiles", type=int, nargs=3, default=(6, 4, 4))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs=3, action="append")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_fibre_memory.json"))
    args = ap.parse_args(argv)
    chunk_sizes = args.chunks or [[64, 384, 384], [128, 384, 384]]
    result = {
        "block": list(args.block),
        "tiles": list(args.tiles),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_average_start": os.getloadavg()[0],
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # the block is made in a process of its own: a child inherits its parent's peak
        # resident memory (ru_maxrss survives exec), so this process stays small
        vs = _run(_MAKE, folder, [json.dumps(list(args.block))])["voxel_size_um"]
        for chunks in chunk_sizes:
            extra = [json.dumps(v) for v in (args.tiles, chunks, args.workers, vs)]
            run = _run(_RUN, folder, extra)
            result["runs"]["x".join(map(str, chunks))] = run
            print(json.dumps({"chunk_size_vox": chunks} | run), flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
