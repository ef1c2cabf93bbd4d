"""Cell detection on failure modes of real light-sheet data: void, hot pixels, dense nuclei, seams.

Simulated crops of 40 x 512 x 512 voxels at 5 x 2 x 2 µm (``ketamap.simulate.crop``,
fixed seeds) with the imaging model of ``bench_detect_curves.py`` (somata of 12-18 µm,
psf (4, 1.5, 1.5) µm, SNR 51, bleed-through 60 photons, gradient, stripes, shot + read
noise) and, switched on per scenario, the failure modes seen on real tissue:

a. **void + hot pixels**: tissue fills half the crop (a curved surface); outside, no
   photons: camera offset 12 and read noise 1.5 (as measured on a real brain: ~12 counts
   in the void against ~310 in tissue), single-voxel spikes at 1e-5 per voxel of 30-3000
   counts anywhere. Reported: false detections in the void per 1e8 void voxels (target
   <= 1; every detection in the void is false), detections on hot pixels, recall and
   precision in tissue.
b. **dense nuclei**: somata of exactly 12 µm, half of them in clusters of 3-8 whose
   neighbours sit 1-1.5 soma diameters apart, at 1 000-20 000 cells/mm³ (VTA/SNc reach
   10 000-20 000), psf z 4 and 6 µm (the light sheet's axial blur merges neighbours).
   The detector is told the soma size and the psf (``DetectionParams(soma_diameter_um=12,
   psf_sigma_um=psf)``). Reported: recall of cells whose nearest neighbour is 1-1.5
   diameters away (target >= 0.90), overall precision (target >= 0.95), recall by
   nearest-neighbour distance (diameters) and by density.
c. **seams and edges**: stitched tiles of 128 x 128 voxels with log-normal gains (CV 0.2),
   a void (tissue 60 %), a bright rim (300 extra autofluorescence photons, 20 µm deep)
   under the tissue surface, 5 000 cells/mm³; also with one unlabelled (dark) tile.
   Reported: precision (target >= 0.98) and recall.
d. **plain**: the default crop, no failure mode (the reference row).

Detection: ``ketamap.wholebrain.detect.detect_cells`` with default ``DetectionParams()``
(b: soma size and psf given), on the signal channel alone ("signal") and with the
autofluorescence channel (``background=``, "signal+bg"). When the detector accepts
``return_qc=True`` its scalar QC numbers are recorded too. Scoring: one-to-one Hungarian
matching within 10 µm (``ketamap.simulate.crop.match_detections``); cells and unmatched
detections within 10 µm of a face are not scored, except that void false detections are
counted everywhere.

With ``--cellfinder-python PY`` (the python of a separate environment with cellfinder),
the dense-nuclei volumes (and only those) are also run through cellfinder's detection
stage, all in one subprocess of that python (as in ``bench_detect_curves.py``):
``cellfinder.core.main.main(signal, signal, voxel_sizes=(5, 2, 2), soma_diameter=12,
skip_classification=True, n_free_cpus=0)``, other parameters at their defaults,
``OMP_NUM_THREADS=2`` unless set, and scored the same way (all its candidates count,
including any it marks as artefacts). Per volume and per density, recall, precision and
recall by nearest-neighbour distance are recorded for both tools, and a two-panel figure
(``docs/img/detect_dense_curves.png``) shows recall against nearest-neighbour distance
and recall and precision against density (ketamap on the signal channel alone, as
cellfinder gets it).

Prints a table with the targets met or not and saves JSON
(``benchmarks/results/detect_artefacts.json``).

Usage::

    .venv/bin/python benchmarks/bench_detect_artefacts.py [--quick] [--seed 0] [--out PATH] \\
        [--cellfinder-python PY] [--dense-crops N] [--figure PATH] [--replot]

The full run takes about 5 minutes on 2 cores, ``--quick`` (fewer and smaller crops)
about 1 minute; cellfinder adds about 25 s per dense volume of 40 x 512 x 512 voxels
(20 in the full run, 10 with ``--dense-crops 1``).
``--replot`` only redraws the figure from the saved JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
VOXEL_UM = (5.0, 2.0, 2.0)
TOLERANCE_UM = 10.0
MARGIN_UM = 10.0
DENSITIES = (1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0)
PSFS = ((4.0, 1.5, 1.5), (6.0, 1.5, 1.5))
NN_BINS = (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, np.inf)  # nearest neighbour, soma diameters
TARGETS = {
    "void_false_per_1e8_voxels": ("<=", 1.0),
    "dense_recall_nn_1_1.5": (">=", 0.90),
    "dense_precision": (">=", 0.95),
    "seams_precision": (">=", 0.98),
}
MODES = ("signal", "signal+bg")
CF_SOMA_DIAMETER_UM = 12.0

# Runs in the cellfinder environment: argv = report path, then volume paths (.npy).
_CELLFINDER = textwrap.dedent(
    """
    import json, sys, time
    from importlib.metadata import version
    import numpy as np
    from cellfinder.core.main import main
    results = []
    for path in sys.argv[2:]:
        vol = np.load(path)
        t = time.perf_counter()
        cells = main(vol, vol, voxel_sizes=(5.0, 2.0, 2.0), skip_classification=True,
                     n_free_cpus=0, soma_diameter=%r)
        wall = time.perf_counter() - t
        zyx = np.array([[c.z, c.y, c.x] for c in cells], dtype=float).reshape(-1, 3)
        n_artifact = int(sum(c.type == c.ARTIFACT for c in cells))
        out = path[:-4] + "_cellfinder.npy"
        np.save(out, zyx)
        results.append({"path": path, "wall_s": wall, "n": len(zyx),
                        "n_artifact": n_artifact, "cells": out})
    with open(sys.argv[1], "w") as f:
        json.dump({"cellfinder": version("cellfinder"), "torch": version("torch"),
                   "numpy": version("numpy"), "volumes": results}, f)
    """
    % CF_SOMA_DIAMETER_UM
)


def _settings(quick: bool) -> dict:
    if quick:
        return {
            "void": {"shape": (40, 512, 512), "n": 3},
            "dense": {"shape": (40, 256, 512), "n": 1},
            "seams": {"shape": (40, 512, 512), "n": 1},
            "plain": {"shape": (40, 512, 512), "n": 1},
        }
    return {
        "void": {"shape": (40, 512, 512), "n": 20},
        "dense": {"shape": (40, 512, 512), "n": 2},
        "seams": {"shape": (40, 512, 512), "n": 4},
        "plain": {"shape": (40, 512, 512), "n": 4},
    }


def _detect(signal, background, params) -> tuple[np.ndarray, dict, float]:
    """Run detect_cells; return (centres in voxels, scalar QC, wall seconds)."""
    import dask

    from ketamap.wholebrain.detect import detect_cells

    kw = {"voxel_size_um": VOXEL_UM, "params": params, "background": background}
    if "return_qc" in inspect.signature(detect_cells).parameters:
        kw["return_qc"] = True
    with dask.config.set(scheduler="threads"):
        t = time.perf_counter()
        out = detect_cells(signal, **kw)
        wall = time.perf_counter() - t
    cells, qc = out if isinstance(out, tuple) else (out, {})
    scalars = {
        k: v for k, v in dict(qc).items() if v is None or isinstance(v, (bool, int, float, str))
    }
    return cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float), scalars, wall


def _inner(points_vox: np.ndarray, shape) -> np.ndarray:
    from ketamap.simulate.crop import inner_mask

    return inner_mask(points_vox, shape, voxel_size_um=VOXEL_UM, margin_um=MARGIN_UM)


def _in_mask(points_vox: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if not len(points_vox):
        return np.zeros(0, bool)
    idx = np.clip(np.rint(points_vox).astype(int), 0, np.asarray(mask.shape) - 1)
    return mask[tuple(idx.T)]


def _near(points_vox: np.ndarray, targets_vox: np.ndarray, within_um: float) -> np.ndarray:
    if not len(points_vox) or not len(targets_vox):
        return np.zeros(len(points_vox), bool)
    vs = np.asarray(VOXEL_UM)
    d, _ = cKDTree(np.asarray(targets_vox) * vs).query(np.asarray(points_vox) * vs)
    return d <= within_um


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


class _Tally:
    """Counts summed over crops: matched cells, misses and false detections by kind."""

    def __init__(self):
        self.c: dict[str, float] = {}

    def add(self, **kw):
        for k, v in kw.items():
            self.c[k] = self.c.get(k, 0) + v

    def __getitem__(self, k):
        return self.c.get(k, 0)

    def merge(self, other: _Tally) -> None:
        self.add(**other.c)


def _score_crop(crop, found: np.ndarray, tally: _Tally, *, nn_diameter_um: float | None = None):
    """Add one crop's matching to ``tally`` (and nn-binned recall when a diameter is given)."""
    from ketamap.simulate.crop import match_detections

    shape = crop.signal.shape
    truth = crop.cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float)
    mt, mf = match_detections(found, truth, voxel_size_um=VOXEL_UM, tolerance_um=TOLERANCE_UM)
    t_in, f_in = _inner(truth, shape), _inner(found, shape)
    in_tissue = _in_mask(found, crop.tissue)
    on_hot = _near(found, crop.hot_pixels, TOLERANCE_UM)
    false = ~mf
    tally.add(
        crops=1,
        voxels=crop.signal.size,
        void_voxels=int((~crop.tissue).sum()),
        n_true=int(t_in.sum()),
        tp=int((mt & t_in).sum()),
        fn=int((~mt & t_in).sum()),
        fp=int((false & f_in).sum()),
        fp_tissue=int((false & f_in & in_tissue).sum()),
        fp_void=int((false & ~in_tissue).sum()),
        fp_void_off_hot=int((false & ~in_tissue & ~on_hot).sum()),
        fp_on_hot=int((false & on_hot).sum()),
        n_hot=len(crop.hot_pixels),
        n_found=len(found),
    )
    if nn_diameter_um is not None:
        nn = crop.cells["nn_distance_um"].to_numpy() / nn_diameter_um
        b = np.digitize(nn, NN_BINS) - 1
        for k in range(len(NN_BINS) - 1):
            sel = t_in & (b == k)
            tally.add(**{f"nn{k}_n": int(sel.sum()), f"nn{k}_tp": int((sel & mt).sum())})


def _summary(t: _Tally) -> dict:
    out = {
        "crops": int(t["crops"]),
        "n_true": int(t["n_true"]),
        "n_found": int(t["n_found"]),
        "tp": int(t["tp"]),
        "fn": int(t["fn"]),
        "fp": int(t["fp"]),
        "recall": _ratio(t["tp"], t["tp"] + t["fn"]),
        "precision": _ratio(t["tp"], t["tp"] + t["fp"]),
        "f1": _ratio(2 * t["tp"], 2 * t["tp"] + t["fn"] + t["fp"]),
    }
    if t["void_voxels"]:
        out |= {
            "void_voxels": int(t["void_voxels"]),
            "void_false": int(t["fp_void"]),
            "void_false_not_on_hot_pixels": int(t["fp_void_off_hot"]),
            "void_false_per_1e8_voxels": 1e8 * t["fp_void"] / t["void_voxels"],
            "precision_in_tissue": _ratio(t["tp"], t["tp"] + t["fp_tissue"]),
        }
    if t["n_hot"]:
        out |= {"hot_pixels": int(t["n_hot"]), "false_on_hot_pixels": int(t["fp_on_hot"])}
    if t["nn0_n"] or t["nn1_n"] or t["nn2_n"]:
        bins = {}
        for k in range(len(NN_BINS) - 1):
            lo, hi = NN_BINS[k], NN_BINS[k + 1]
            name = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}"
            bins[name] = {"n": int(t[f"nn{k}_n"]), "recall": _ratio(t[f"nn{k}_tp"], t[f"nn{k}_n"])}
        out["recall_by_nn_diameters"] = bins
    return out


def _light(crop) -> SimpleNamespace:
    """What scoring needs of a crop, without its image volumes."""
    shape = crop.signal.shape
    return SimpleNamespace(
        signal=np.broadcast_to(np.zeros((), crop.signal.dtype), shape),
        tissue=crop.tissue,
        hot_pixels=crop.hot_pixels,
        cells=crop.cells,
    )


def _per_volume(summary: dict) -> dict:
    keys = ("n_true", "n_found", "tp", "fn", "fp", "recall", "precision", "f1")
    out = {k: summary[k] for k in keys}
    if "recall_by_nn_diameters" in summary:
        out["recall_by_nn_diameters"] = summary["recall_by_nn_diameters"]
    return out


def _run(
    name,
    crops_params,
    shape,
    n,
    seed0,
    det_params,
    *,
    nn_diameter_um=None,
    keep=None,
    log=print,
):
    """Simulate ``n`` crops, detect in both modes; return per-mode summaries.

    With ``keep=(directory, list)``, per-volume scores are recorded under ``"volumes"``
    and ``(path, light crop, per-volume record)`` is appended to the list; when the
    directory is not None, each crop's signal volume is saved there as ``path`` (.npy,
    for other detectors).
    """
    from ketamap.simulate.crop import simulate_crop

    tallies = {m: _Tally() for m in MODES}
    qcs: dict[str, list] = {m: [] for m in MODES}
    walls = {m: 0.0 for m in MODES}
    volumes = []
    sim_wall = 0.0
    for i in range(n):
        t = time.perf_counter()
        crop = simulate_crop(shape, params=crops_params, seed=seed0 + i)
        sim_wall += time.perf_counter() - t
        vol = {"seed": seed0 + i}
        for mode in MODES:
            bg = crop.background if mode == "signal+bg" else None
            found, qc, wall = _detect(crop.signal, bg, det_params)
            walls[mode] += wall
            qcs[mode].append(qc)
            one = _Tally()
            _score_crop(crop, found, one, nn_diameter_um=nn_diameter_um)
            tallies[mode].merge(one)
            vol[mode] = _per_volume(_summary(one)) | {"detect_wall_s": wall}
        if keep is not None:
            directory, kept = keep
            path = None
            if directory is not None:
                path = str(Path(directory) / f"vol{len(kept):03d}.npy")
                np.save(path, crop.signal)
            kept.append((path, _light(crop), vol))
            volumes.append(vol)
    out = {}
    for mode in MODES:
        out[mode] = _summary(tallies[mode]) | {
            "detect_wall_s": walls[mode],
            "qc": qcs[mode][:3],
        }
    out["simulate_wall_s"] = sim_wall
    if keep is not None:
        out["volumes"] = volumes
    log(f"{name}: {n} crops of {shape} simulated in {sim_wall:.0f} s", flush=True)
    return out


def _params_dict(p) -> dict:
    from ketamap.params import to_dict

    return to_dict(p)


def _met(value: float, target) -> bool | None:
    op, bound = target
    if value is None or not np.isfinite(value):
        return None
    return bool(value <= bound) if op == "<=" else bool(value >= bound)


def _fmt(v, nd=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _run_cellfinder(python: str, paths: list[str], directory: str, log=print) -> dict:
    """Run cellfinder's detection stage on each saved volume in one subprocess."""
    report = Path(directory) / "cellfinder.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log(f"cellfinder: {len(paths)} volumes in one subprocess of {python}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(
        [python, "-c", _CELLFINDER, str(report), *paths],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"cellfinder failed:\n{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    out["process_wall_s"] = wall
    out["omp_num_threads"] = env["OMP_NUM_THREADS"]
    return out


def _score_cellfinder(cf: dict, kept: list, dense_rows: list, row_items: list) -> None:
    """Score cellfinder's detections per volume and per dense row (as ketamap's)."""
    by_path = {v["path"]: v for v in cf["volumes"]}
    for row, items in zip(dense_rows, row_items, strict=True):
        tally, wall, n_art = _Tally(), 0.0, 0
        for path, light, vol in items:
            v = by_path[path]
            one = _Tally()
            _score_crop(light, np.load(v["cells"]), one, nn_diameter_um=CF_SOMA_DIAMETER_UM)
            tally.merge(one)
            wall += v["wall_s"]
            n_art += v["n_artifact"]
            vol["cellfinder"] = _per_volume(_summary(one)) | {
                "detect_wall_s": v["wall_s"],
                "n_artifact": v["n_artifact"],
            }
        row["cellfinder"] = _summary(tally) | {"detect_wall_s": wall, "n_artifact": n_art}


def _dense_summary(dense_rows: list, key: str) -> dict:
    """Precision and recall of cells with a neighbour 1-1.5 diameters away, per psf."""
    agg = {}
    for psf in PSFS:
        rows = [r[key] for r in dense_rows if r["psf_sigma_um"] == list(psf) and key in r]
        if not rows:
            continue
        tp = sum(r["tp"] for r in rows)
        fp = sum(r["fp"] for r in rows)
        fn = sum(r["fn"] for r in rows)
        b = [r["recall_by_nn_diameters"]["1-1.5"] for r in rows]
        n_b = sum(x["n"] for x in b)
        tp_b = sum(x["n"] * x["recall"] for x in b if x["n"])
        agg[f"psf_z_{psf[0]:g}"] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "recall_nn_1_1.5": _ratio(tp_b, n_b),
            "n_nn_1_1.5": int(n_b),
        }
    return agg


def _pooled_nn_recall(rows: list, key: str) -> tuple[list, list]:
    """Recall per nearest-neighbour bin (1-4 diameters), pooled over densities."""
    xs, ys = [], []
    for name in ("1-1.5", "1.5-2", "2-3", "3-4"):
        bins = [r[key]["recall_by_nn_diameters"][name] for r in rows if key in r]
        n = sum(b["n"] for b in bins)
        tp = sum(b["n"] * b["recall"] for b in bins if b["n"])
        lo, hi = (float(v) for v in name.split("-"))
        xs.append((lo + hi) / 2)
        ys.append(_ratio(tp, n))
    return xs, ys


def _plot(result: dict, path: Path) -> None:
    """Recall against nearest-neighbour distance; recall and precision against density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["scenarios"]["dense_nuclei"]["rows"]
    tools = [("signal", "ketamap detect_cells (signal)", "C0")]
    if any("cellfinder" in r for r in rows):
        tools.append(("cellfinder", "cellfinder detection (defaults, soma 12 µm)", "C3"))
    psfs = sorted({r["psf_sigma_um"][0] for r in rows})
    styles = {p: ls for p, ls in zip(psfs, ("-", ":", "-."), strict=False)}
    markers = {p: m for p, m in zip(psfs, ("o", "^", "s"), strict=False)}

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for key, _, colour in tools:
        for p in psfs:
            sel = [r for r in rows if r["psf_sigma_um"][0] == p]
            xs, ys = _pooled_nn_recall(sel, key)
            ax0.plot(xs, ys, color=colour, ls=styles[p], marker=markers[p])
    ax0.set_xticks([1.25, 1.75, 2.5, 3.5], ["1-1.5", "1.5-2", "2-3", "3-4"])
    ax0.set_xlabel("nearest neighbour (soma diameters, 12 µm)")
    ax0.set_ylabel("recall (matching within 10 µm)")
    ax0.set_title("recall by nearest-neighbour distance (all densities' cells pooled)")
    ax0.axhline(0.90, color="0.7", lw=0.8, ls="--")

    densities = sorted({r["density_per_mm3"] for r in rows})
    for key, _, colour in tools:
        for p in psfs:
            sel = sorted(
                (r for r in rows if r["psf_sigma_um"][0] == p and key in r),
                key=lambda r: r["density_per_mm3"],
            )
            d = [r["density_per_mm3"] for r in sel]
            ax1.plot(d, [r[key]["recall"] for r in sel], color=colour, ls="-", marker=markers[p])
            ax1.plot(
                d,
                [r[key]["precision"] for r in sel],
                color=colour,
                ls="--",
                marker=markers[p],
                mfc="none",
            )
    ax1.set_xscale("log")
    ax1.set_xticks(densities, [f"{v:,.0f}" for v in densities])
    ax1.minorticks_off()
    ax1.set_xlabel("cell density (cells / mm³)")
    ax1.set_ylabel("recall (solid), precision (dashed)")
    ax1.set_title("recall and precision by density")
    ax1.axhline(0.95, color="0.7", lw=0.8, ls="--")
    for ax in (ax0, ax1):
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)

    handles = [Line2D([], [], color=c, lw=2) for _, _, c in tools]
    labels = [name for _, name, _ in tools]
    for p in psfs:
        handles.append(Line2D([], [], color="0.3", ls=styles[p], marker=markers[p]))
        labels.append(f"psf z {p:g} µm (left: line style; right: marker)")
    handles.append(Line2D([], [], color="0.3", ls="--", marker="o", mfc="none"))
    labels.append("precision (right panel)")
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8.5, frameon=False)
    shape = result["settings"]["dense"]["shape"]
    n = result["settings"]["dense"]["crops"]
    fig.suptitle(
        f"Dense nuclei (12 µm somata, half in clusters 1-1.5 diameters apart): "
        f"{n} crop(s) of {shape[0]}x{shape[1]}x{shape[2]} voxels at 5x2x2 µm per point",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller crops (~1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detect_artefacts.json"))
    ap.add_argument("--note", default="", help="free text saved in the JSON (e.g. which detector)")
    ap.add_argument(
        "--cellfinder-python",
        default=None,
        help="python of a separate environment with cellfinder: also run its detection "
        "stage on the dense-nuclei volumes",
    )
    ap.add_argument(
        "--dense-crops",
        type=int,
        default=None,
        help="crops per dense-nuclei point (default 2, --quick 1); 1 halves cellfinder's time",
    )
    ap.add_argument(
        "--figure",
        default=str(ROOT / "docs" / "img" / "detect_dense_curves.png"),
        help="dense-nuclei figure",
    )
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the figure from the saved JSON"
    )
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        _plot(result, Path(args.figure))
        print(f"wrote {args.figure}")
        return result

    import ketamap
    import ketamap.wholebrain.detect as detect_mod
    from ketamap.simulate.crop import CropParams
    from ketamap.wholebrain.detect import DetectionParams

    cfg = _settings(args.quick)
    if args.dense_crops is not None:
        cfg["dense"]["n"] = args.dense_crops
    t0 = time.perf_counter()
    result: dict = {
        "note": args.note,
        "quick": args.quick,
        "seed": args.seed,
        "voxel_size_um": list(VOXEL_UM),
        "tolerance_um": TOLERANCE_UM,
        "margin_um": MARGIN_UM,
        "targets": {k: list(v) for k, v in TARGETS.items()},
        "settings": {k: {"shape": list(v["shape"]), "crops": v["n"]} for k, v in cfg.items()},
        "ketamap": str(Path(ketamap.__file__).resolve().parent),
        "detector_sha256": hashlib.sha256(Path(detect_mod.__file__).read_bytes()).hexdigest()[:16],
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "scenarios": {},
    }
    scen = result["scenarios"]
    default_det = DetectionParams()

    # d. plain reference
    plain = CropParams(voxel_size_um=VOXEL_UM)
    scen["plain"] = {"crop_params": _params_dict(plain), "detection": _params_dict(default_det)}
    scen["plain"] |= _run(
        "plain", plain, cfg["plain"]["shape"], cfg["plain"]["n"], args.seed + 4000, default_det
    )

    # a. void + hot pixels (real-like camera)
    void = CropParams(
        voxel_size_um=VOXEL_UM,
        tissue_fraction=0.5,
        camera_offset=12.0,
        read_noise=1.5,
        hot_pixel_rate_per_voxel=1e-5,
        hot_pixel_counts=(30.0, 3000.0),
    )
    scen["void_hot_pixels"] = {
        "crop_params": _params_dict(void),
        "detection": _params_dict(default_det),
    }
    scen["void_hot_pixels"] |= _run(
        "void_hot_pixels",
        void,
        cfg["void"]["shape"],
        cfg["void"]["n"],
        args.seed + 1000,
        default_det,
    )

    # b. dense nuclei with clusters (and cellfinder on the same volumes)
    tmp = tempfile.TemporaryDirectory(prefix="detect_dense_") if args.cellfinder_python else None
    kept: list = []
    row_items: list = []
    dense_rows = []
    for j, psf in enumerate(PSFS):
        det = DetectionParams(soma_diameter_um=12.0, psf_sigma_um=psf)
        for k, density in enumerate(DENSITIES):
            p = CropParams(
                voxel_size_um=VOXEL_UM,
                density_per_mm3=density,
                soma_diameter_um=(12.0, 12.0),
                psf_sigma_um=psf,
                cluster_fraction=0.5,
                cluster_size=(3, 8),
                cluster_spacing_diameters=(1.0, 1.5),
            )
            row = {"psf_sigma_um": list(psf), "density_per_mm3": density}
            row |= _run(
                f"dense psf {psf[0]:g} density {density:g}",
                p,
                cfg["dense"]["shape"],
                cfg["dense"]["n"],
                args.seed + 2000 + 100 * j + 10 * k,
                det,
                nn_diameter_um=12.0,
                keep=(tmp.name if tmp else None, kept),
            )
            dense_rows.append(row)
            row_items.append(kept[len(kept) - cfg["dense"]["n"] :])
    scen["dense_nuclei"] = {
        "crop_params": "soma 12 µm, cluster_fraction 0.5, cluster_size (3, 8), spacing 1-1.5 d",
        "detection": "DetectionParams(soma_diameter_um=12, psf_sigma_um=psf)",
        "rows": dense_rows,
    }
    if tmp is not None:
        try:
            cf = _run_cellfinder(args.cellfinder_python, [p for p, _, _ in kept], tmp.name)
            _score_cellfinder(cf, kept, dense_rows, row_items)
        finally:
            tmp.cleanup()
        result["cellfinder"] = {
            "python": args.cellfinder_python,
            "version": cf["cellfinder"],
            "torch": cf["torch"],
            "numpy": cf["numpy"],
            "call": "cellfinder.core.main.main(signal, signal, voxel_sizes=(5, 2, 2), "
            f"soma_diameter={CF_SOMA_DIAMETER_UM:g}, skip_classification=True, "
            "n_free_cpus=0), other parameters at their defaults",
            "omp_num_threads": cf["omp_num_threads"],
            "process_wall_s": cf["process_wall_s"],
            "volumes": len(kept),
        }
        scen["dense_nuclei"]["cellfinder"] = result["cellfinder"]["call"]
    del kept, row_items
    for mode in (*MODES, "cellfinder"):
        agg = _dense_summary(dense_rows, mode)
        if agg:
            scen["dense_nuclei"][f"summary_{mode}"] = agg

    # c. seams and edges (with and without a dark tile)
    for name, dark in (("seams_edges", False), ("seams_edges_dark_tile", True)):
        p = CropParams(
            voxel_size_um=VOXEL_UM,
            tissue_fraction=0.6,
            tile_shape_vox=(128, 128),
            tile_gain_cv=0.2,
            dark_tile=dark,
            edge_photons=300.0,
            edge_width_um=20.0,
        )
        scen[name] = {"crop_params": _params_dict(p), "detection": _params_dict(default_det)}
        scen[name] |= _run(
            name,
            p,
            cfg["seams"]["shape"],
            cfg["seams"]["n"],
            args.seed + (3000 if not dark else 3500),
            default_det,
        )
    result["total_wall_s"] = time.perf_counter() - t0

    # targets
    checks = {}
    for mode in MODES:
        v = scen["void_hot_pixels"][mode]["void_false_per_1e8_voxels"]
        checks[f"void_false_per_1e8_voxels [{mode}]"] = (v, TARGETS["void_false_per_1e8_voxels"])
        for psf in PSFS:
            s = scen["dense_nuclei"][f"summary_{mode}"][f"psf_z_{psf[0]:g}"]
            checks[f"dense recall nn 1-1.5 d, psf z {psf[0]:g} [{mode}]"] = (
                s["recall_nn_1_1.5"],
                TARGETS["dense_recall_nn_1_1.5"],
            )
            checks[f"dense precision, psf z {psf[0]:g} [{mode}]"] = (
                s["precision"],
                TARGETS["dense_precision"],
            )
        for name in ("seams_edges", "seams_edges_dark_tile"):
            checks[f"{name} precision [{mode}]"] = (
                scen[name][mode]["precision"],
                TARGETS["seams_precision"],
            )
    result["targets_met"] = {
        k: {"value": v, "target": f"{t[0]} {t[1]:g}", "met": _met(v, t)}
        for k, (v, t) in checks.items()
    }

    text = json.dumps(result, indent=2, default=float)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    _print_table(result)
    _plot(result, Path(args.figure))
    print(f"total {result['total_wall_s']:.0f} s; wrote {args.out} and {args.figure}")
    return result


def _print_table(result: dict) -> None:
    scen = result["scenarios"]
    print()
    head = f"{'scenario':<24}{'mode':<11}{'crops':>6}{'true':>7}{'recall':>8}{'prec':>8}"
    print(head + f"{'prec tissue':>12}{'void FP/1e8':>12}{'FP on hot':>10}")
    for name in ("plain", "void_hot_pixels", "seams_edges", "seams_edges_dark_tile"):
        for mode in MODES:
            r = scen[name][mode]
            print(
                f"{name:<24}{mode:<11}{r['crops']:>6}{r['n_true']:>7}{_fmt(r['recall']):>8}"
                f"{_fmt(r['precision']):>8}"
                f"{_fmt(r.get('precision_in_tissue')):>12}"
                f"{_fmt(r.get('void_false_per_1e8_voxels'), 1):>12}"
                f"{_fmt(r.get('false_on_hot_pixels')):>10}"
            )
    void, void_bg = scen["void_hot_pixels"]["signal"], scen["void_hot_pixels"]["signal+bg"]
    print(
        f"  void: {void['void_voxels']:.3g} void voxels, {void['hot_pixels']} hot pixels; "
        "false in void (signal / signal+bg): "
        f"{void['void_false']} / {void_bg['void_false']}, of which not within 10 µm of a "
        f"hot pixel: {void['void_false_not_on_hot_pixels']} / "
        f"{void_bg['void_false_not_on_hot_pixels']}"
    )
    print()
    bins = list(scen["dense_nuclei"]["rows"][0]["signal"]["recall_by_nn_diameters"])
    print("dense nuclei (signal only): recall by nearest neighbour (soma diameters), precision")
    cols = "".join(f"{b:>9}" for b in bins)
    print(f"{'psf z':>6}{'density':>9}{'true':>7}{cols}{'prec':>8}")
    for row in scen["dense_nuclei"]["rows"]:
        r = row["signal"]
        rb = r["recall_by_nn_diameters"]
        print(
            f"{row['psf_sigma_um'][0]:>6g}{row['density_per_mm3']:>9,.0f}{r['n_true']:>7}"
            + "".join(f"{_fmt(rb[b]['recall'], 2):>9}" for b in bins)
            + f"{_fmt(r['precision']):>8}"
        )
    if "cellfinder" in scen["dense_nuclei"]["rows"][0]:
        print()
        print("dense nuclei, ketamap (signal) vs cellfinder: recall nn 1-1.5 d / recall / prec")
        print(f"{'psf z':>6}{'density':>9}{'true':>7}{'ketamap':>22}{'cellfinder':>22}")
        for row in scen["dense_nuclei"]["rows"]:
            cells = []
            for key in ("signal", "cellfinder"):
                r = row[key]
                nn = r["recall_by_nn_diameters"]["1-1.5"]["recall"]
                cells.append(
                    f"{_fmt(nn, 2):>6} {_fmt(r['recall'], 2):>6} {_fmt(r['precision'], 2):>6}"
                )
            print(
                f"{row['psf_sigma_um'][0]:>6g}{row['density_per_mm3']:>9,.0f}"
                f"{row['signal']['n_true']:>7}{cells[0]:>22}{cells[1]:>22}"
            )
    print()
    print("targets:")
    for k, v in result["targets_met"].items():
        flag = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        print(f"  {k:<52} {_fmt(v['value']):>8}  (target {v['target']})  {flag}")


if __name__ == "__main__":
    main()
