"""Opening a whole-brain subject in napari is lazy: seconds and bounded memory, whatever its size.

Writes a synthetic census subject: a uint16 signal of ``--gb`` GB (voxel 5 x 2 x 2 µm,
planes of ``--plane`` x ``--plane`` voxels) as a multiscale OME-Zarr with
:func:`ketamap.io.volumes.write_ome_zarr`, chunk by chunk (each chunk rendered from a
seed: a smooth background, somata and mild noise, so it is never whole in memory), a
study manifest naming it and a ``detect/cells.parquet`` of ``--cells`` candidates.

Then, each in a fresh process so that its memory is its own:

* **reader**: the plugin's reader on the subject folder (every pyramid level as a lazy
  Dask array, the display range from the coarsest level, the cells as points);
* **viewer** (when napari and a display are there; Xvfb is started when ``Xvfb`` is
  installed and there is no display): ``viewer.open(subject, plugin="ketamap")`` and
  the first rendered frame.

Each reports the wall time and the peak resident memory (``ru_maxrss``) of its
process, against the target of the issue: a 20 GB volume open in under 5 s with
memory bounded (far below the volume). Prints and saves JSON
(``benchmarks/results/napari_open.json``, or ``--out``).

Usage::

    .venv/bin/python benchmarks/bench_napari_open.py --gb 4
    .venv/bin/python benchmarks/bench_napari_open.py --gb 20 --keep /data/bench-subject
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VOXEL_UM = (5.0, 2.0, 2.0)
CHUNKS = (64, 256, 256)


def render_chunk(block_info=None, *, seed: int) -> np.ndarray:
    """One chunk: a smooth background, a few somata, mild noise (the same however often)."""
    info = block_info[None]
    (z0, z1), (y0, y1), (x0, x1) = info["array-location"]
    rng = np.random.default_rng(np.random.SeedSequence([seed, *info["chunk-location"]]))
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    x = np.arange(x0, x1, dtype=np.float32)[None, :]
    plane = 100.0 + 30.0 * np.sin(y / 400.0) * np.cos(x / 500.0)
    out = rng.standard_normal((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
    out *= 3.0
    out += plane[None]
    out += (0.02 * np.arange(z0, z1, dtype=np.float32))[:, None, None]
    for _ in range(rng.poisson(4)):  # somata of sigma 3 voxels (y, x), drawn in a local box
        c = rng.uniform([z0, y0, x0], [z1, y1, x1])
        lo = np.maximum(np.floor(c - [4, 10, 10]).astype(int), [z0, y0, x0])
        hi = np.minimum(np.ceil(c + [4, 10, 10]).astype(int), [z1, y1, x1])
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        r2 = ((zz - c[0]) * 2.5) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        box = out[lo[0] - z0 : hi[0] - z0, lo[1] - y0 : hi[1] - y0, lo[2] - x0 : hi[2] - x0]
        box += (300.0 * np.exp(-r2 / 18.0)).astype(np.float32)
    return np.clip(out, 0, 65535).astype(np.uint16)


def write_subject(root: Path, gb: float, plane: int, n_cells: int, seed: int = 0) -> dict:
    """Write the synthetic study (manifest, signal pyramid, candidates); return its sizes."""
    from ketamap.io.volumes import write_ome_zarr
    from ketamap.manifest import Group, Imaging, Study, Subject, study_to_toml

    nz = max(1, int(round(gb * 1e9 / (2 * plane * plane))))
    shape = (nz, plane, plane)
    lazy = da.map_blocks(
        render_chunk,
        seed=seed,
        dtype=np.uint16,
        chunks=tuple(tuple(min(c, n - i) for i in range(0, n, c)) for n, c in zip(shape, CHUNKS)),
    )
    signal = root / "data" / "b1" / "signal.ome.zarr"
    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        write_ome_zarr(lazy, signal, voxel_size_um=VOXEL_UM, chunks=CHUNKS, levels=None)
    write_s = time.perf_counter() - start
    study = Study(
        name="bench",
        atlas="phantom",
        marker="TH",
        reference_group="saline",
        imaging=Imaging(VOXEL_UM, "psl", "TH", None),
        groups=(Group("saline", 0.0),),
        subjects=(Subject("b1", "saline", signal, None, VOXEL_UM, "psl", {}),),
        root=root,
    )
    (root / "study.toml").write_text(study_to_toml(study))
    rng = np.random.default_rng(seed)
    vox = rng.uniform(0, 1, (n_cells, 3)) * np.asarray(shape)
    cells = pd.DataFrame(vox, columns=["z_vox", "y_vox", "x_vox"])
    for axis, v in zip("zyx", VOXEL_UM):
        cells[f"{axis}_um"] = cells[f"{axis}_vox"] * v
    cells["snr"] = rng.lognormal(np.log(12), 0.4, n_cells)
    cells["contrast"] = rng.lognormal(np.log(10), 0.4, n_cells)
    cells["intensity"] = 50.0 * cells["snr"]
    detect = root / "subjects" / "b1" / "detect"
    detect.mkdir(parents=True)
    cells.to_parquet(detect / "cells.parquet", index=False)
    on_disk = sum(p.stat().st_size for p in signal.rglob("*") if p.is_file())
    levels = json.loads((signal / ".zattrs").read_text())["multiscales"][0]["datasets"]
    return {
        "shape": list(shape),
        "dtype": "uint16",
        "voxel_size_um": list(VOXEL_UM),
        "logical_gb": math.prod(shape) * 2 / 1e9,
        "on_disk_gb": on_disk / 1e9,
        "levels": len(levels),
        "chunks": list(CHUNKS),
        "n_cells": n_cells,
        "write_s": write_s,
    }


# --------------------------------------------------------------------------- measured steps


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_reader(subject: str) -> dict:
    """The plugin's reader on the subject, in this (fresh) process."""
    import_start = time.perf_counter()
    from ketamap.napari.readers import get_reader

    imported = time.perf_counter()
    before_mb = _peak_mb()
    layers = get_reader(subject)(subject)
    done = time.perf_counter()
    image = next(d for d, kw, kind in layers if kind == "image")
    return {
        "import_s": imported - import_start,
        "read_s": done - imported,
        "peak_rss_mb_before": before_mb,
        "peak_rss_mb": _peak_mb(),
        "layers": [kw["name"] for _, kw, _ in layers],
        "level_shapes": [list(level.shape) for level in image],
        "lazy": all(isinstance(level, da.Array) for level in image),
    }


def measure_viewer(subject: str) -> dict:
    """``viewer.open`` with the plugin, then the first frame, in this (fresh) process."""
    import napari
    import npe2

    pm = npe2.PluginManager.instance()
    if "ketamap" not in {m.name for m in pm.iter_manifests()}:
        manifest = ROOT / "src" / "ketamap" / "napari" / "napari.yaml"
        pm.register(npe2.PluginManifest.from_file(manifest))
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    start = time.perf_counter()
    viewer.open(subject, plugin="ketamap")
    opened = time.perf_counter()
    frame = viewer.screenshot(canvas_only=True)
    drawn = time.perf_counter()
    viewer.dims.set_point(0, viewer.dims.range[0].stop / 2)  # another plane at full resolution
    viewer.screenshot(canvas_only=True)
    moved = time.perf_counter()
    viewer.close()
    return {
        "open_s": opened - start,
        "first_frame_s": drawn - opened,
        "next_plane_s": moved - drawn,
        "frame_shape": list(frame.shape),
        "peak_rss_mb": _peak_mb(),
    }


def _in_fresh_process(step: str, subject: Path, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", step, str(subject)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _display(env: dict):
    """A display for the viewer step: the session's, or an Xvfb started here (or None)."""
    if env.get("DISPLAY"):
        return None, env
    from ketamap.napari._display import start_xvfb

    proc, display = start_xvfb()
    if proc is None:
        return None, None
    return proc, env | {"DISPLAY": display}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=4.0, help="size of the signal (uint16 voxels)")
    ap.add_argument("--plane", type=int, default=4096, help="plane size in voxels (y = x)")
    ap.add_argument("--cells", type=int, default=200_000, help="candidates in cells.parquet")
    ap.add_argument("--keep", default=None, help="study folder to write and keep")
    ap.add_argument("--out", default="napari_open.json", help="file under benchmarks/results/")
    ap.add_argument("--measure", nargs=2, metavar=("STEP", "SUBJECT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        step, subject = args.measure
        result = measure_reader(subject) if step == "reader" else measure_viewer(subject)
        print(json.dumps(result))
        return

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ketamap-napari-"))
    try:
        sizes = write_subject(root, args.gb, args.plane, args.cells)
        print(
            f"wrote {sizes['logical_gb']:.2f} GB ({sizes['on_disk_gb']:.2f} GB on disk, "
            f"{sizes['levels']} levels) in {sizes['write_s']:.0f} s",
            flush=True,
        )
        subject = root / "subjects" / "b1"
        env = dict(os.environ)
        result = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "volume": sizes,
            "target": {"open_s": 5.0, "memory": "bounded (far below the volume)"},
            "reader": _in_fresh_process("reader", subject, env),
        }
        r = result["reader"]
        print(
            f"reader: {r['read_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(lazy: {r['lazy']}, levels {r['level_shapes']})",
            flush=True,
        )
        try:
            import napari  # noqa: F401
        except ImportError:
            result["viewer"] = "napari not installed"
        else:
            xvfb, venv = _display(env)
            if venv is None:
                result["viewer"] = "no display (install xvfb)"
            else:
                try:
                    result["viewer"] = _in_fresh_process("viewer", subject, venv)
                finally:
                    if xvfb is not None:
                        xvfb.terminate()
                v = result["viewer"]
                print(
                    f"viewer: open {v['open_s']:.2f} s, first frame {v['first_frame_s']:.2f} s, "
                    f"another plane {v['next_plane_s']:.2f} s, peak RSS "
                    f"{v['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {RESULTS / args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
