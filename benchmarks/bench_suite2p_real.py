"""Check our reader on an output folder written by the suite2p package itself.

suite2p pulls in torch and CUDA wheels (several GB), so it is not a ketamap
dependency; run this script with a Python that has suite2p installed and
ketamap importable, e.g.::

    python -m venv suite2p-venv && suite2p-venv/bin/pip install suite2p==0.14.6 pandas pyarrow
    PYTHONPATH=src suite2p-venv/bin/python benchmarks/bench_suite2p_real.py

It writes a small simulated movie (planted-ensemble spikes convolved with a
GCaMP kernel, Gaussian somata, noise) as a TIFF, runs suite2p on it, reads the
resulting folder with :func:`ketamap.invivo.read_suite2p`, runs the ensembles
core, and saves the numbers to ``benchmarks/results/suite2p_real.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _movie(n_side: int = 8, size: int = 128, n_frames: int = 9000, seed: int = 0):
    from ketamap.simulate.calcium import simulate_calcium_traces

    n_cells = n_side * n_side
    rng = np.random.default_rng(seed)
    ens = [np.array([0, 9, 18, 27, 36, 45]), np.array([7, 14, 21, 28, 35, 42])]
    tr = simulate_calcium_traces(
        n_cells,
        n_frames,
        ensembles=ens,
        coordination=0.9,
        background_rate_hz=0.05,
        noise_sd=0.05,
        seed=seed,
    )
    spikes_dff = tr.F - 0.7 * tr.Fneu  # F0 (1 + dff + noise) per cell
    yy, xx = np.mgrid[:size, :size]
    movie = np.full((n_frames, size, size), 50.0, dtype=np.float32)
    pitch = size / n_side
    centres = []
    for i in range(n_cells):
        cy, cx = (i // n_side + 0.5) * pitch, (i % n_side + 0.5) * pitch
        centres.append((cy, cx))
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.5**2)).astype(np.float32)
        movie += spikes_dff[i][:, None, None] / spikes_dff[i].mean() * 100 * blob[None]
    movie += rng.normal(0, 5, movie.shape).astype(np.float32)
    return np.clip(movie, 0, 65535).astype(np.int16), np.array(centres), ens


def main() -> None:
    import suite2p
    import tifffile

    from ketamap.invivo.ensembles.session import analyse_session
    from ketamap.io.traces.suite2p import read_suite2p

    movie, centres, ens = _movie()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "raw").mkdir()
        tifffile.imwrite(d / "raw" / "movie.tif", movie)
        ops = suite2p.default_ops()
        ops.update(
            {
                "fs": 15.0,
                "tau": 1.0,
                "do_registration": 0,
                "nonrigid": False,
                "spikedetect": True,
                "batch_size": 500,
                "diameter": 8,
                "anatomical_only": 0,
                "threshold_scaling": 0.5,
                # suite2p 0.14.6 fails under numpy 2 when it estimates the scale itself
                "spatial_scale": 1,
            }
        )
        db = {
            "data_path": [str(d / "raw")],
            "save_path0": str(d / "out"),
            "tiff_list": ["movie.tif"],
        }
        t0 = time.perf_counter()
        suite2p.run_s2p(ops=ops, db=db)
        t_s2p = time.perf_counter() - t0
        plane = d / "out" / "suite2p" / "plane0"
        files = sorted(p.name for p in plane.iterdir())
        rec = read_suite2p(d / "out")
        stat = np.load(plane / "stat.npy", allow_pickle=True)
        res = analyse_session(rec.F, rec.Fneu, frame_rate_hz=rec.frame_rate_hz)
    # map each suite2p ROI to the nearest planted soma to express members in planted ids
    med = np.array([s["med"] for s in stat])[rec.cell_index]
    nearest = np.argmin(((med[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    found = [sorted(set(nearest[m].tolist())) for m in res.assemblies.members]
    out = {
        "suite2p_version": suite2p.version if hasattr(suite2p, "version") else "0.14",
        "files": files,
        "rois_kept": int(rec.F.shape[0]),
        "frames": int(rec.F.shape[1]),
        "frame_rate_hz": rec.frame_rate_hz,
        "seconds_suite2p": round(t_s2p, 1),
        "ensembles_found": res.assemblies.n,
        "members_as_planted_ids": found,
        "planted": [e.tolist() for e in ens],
    }
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / "suite2p_real.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    assert rec.frame_rate_hz == 15.0 and rec.F.shape[1] == movie.shape[0], "reader mismatch"


if __name__ == "__main__":
    sys.exit(main())
