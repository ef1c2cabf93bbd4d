"""Memory of detect_cells is bounded by the chunk size, not by the volume size.

A subprocess caps its own address space (RLIMIT_AS) at what it uses after a warm-up plus
a small budget, then detects cells in a lazily generated Dask volume at least four times
larger than that budget. The cells found must be the planted ones. Dask's overlap graph
keeps about one z-slab of chunks alive, so the bound is chunk depth x plane area: the
volume here is many chunks deep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource")

BUDGET_MIB = 64

_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import dask, dask.array as da
    import numpy as np
    from ketamap.wholebrain import DetectionParams, detect_cells

    budget = int(sys.argv[1]) * 2**20
    shape, chunks = (1024, 256, 256), (32, 128, 128)
    step = 48  # one planted cell every 48 voxels along y and x, in every z chunk

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        (z0, z1), (y0, y1), (x0, x1) = loc
        seed = z0 * 1_000_003 + y0 * 1_009 + x0
        rng = np.random.default_rng(seed)
        out = rng.normal(100.0, 3.0, (z1 - z0, y1 - y0, x1 - x0)).astype(np.float32)
        zz = (z0 + z1) // 2
        for y in range(y0 - y0 % step + step // 2, y1, step):
            for x in range(x0 - x0 % step + step // 2, x1, step):
                if y >= y0 and x >= x0:
                    out[zz - z0, y - y0, x - x0] += 200.0
        return out

    vol = da.map_blocks(block, chunks=tuple(
        tuple(min(c, n - i) for i in range(0, n, c)) for n, c in zip(shape, chunks)),
        dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    # the tissue mask's own memory is bounded by its coarse grid (volume / block^3,
    # tests/wholebrain/test_tissue.py); 800 µm blocks keep it out of the chunk budget here
    params = DetectionParams(chunk_size_vox=(32, 128, 128), tissue_block_um=800.0)
    vs = (25.0, 25.0, 25.0)
    dask.config.set(scheduler="synchronous")
    detect_cells(vol[:32, :256, :256], voxel_size_um=vs, params=params)  # warm-up imports

    def vm_bytes():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    limit = vm_bytes() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cells = detect_cells(vol, voxel_size_um=vs, params=params)
    got = np.rint(cells[["z_vox", "y_vox", "x_vox"]].to_numpy()).astype(int)
    print(json.dumps({"volume_bytes": int(vol.nbytes), "budget_bytes": budget,
                      "n": int(len(cells)), "cells": got.tolist()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_volume_four_times_the_memory_limit():
    env = dict(os.environ, MALLOC_ARENA_MAX="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(BUDGET_MIB)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["volume_bytes"] >= 4 * out["budget_bytes"]
    step, shape = 48, (1024, 256, 256)
    want = {
        (z, y, x)
        for z in range(16, shape[0], 32)
        for y in range(step // 2, shape[1], step)
        for x in range(step // 2, shape[2], step)
    }
    got = {tuple(c) for c in out["cells"]}
    assert want <= got  # every planted cell, at its voxel
    assert len(got - want) <= 0.01 * len(want)  # and few noise maxima
