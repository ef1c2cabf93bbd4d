"""Accuracy curves of cell detection: F1 against signal-to-noise and against cell density.

Small simulated light-sheet volumes with known cells at 5 x 2 x 2 µm
(``ketamap.simulate.crop.simulate_crop`` with every failure mode off), imaged with the
imaging model and the defaults of ``ketamap.simulate.BrainParams`` (the census
simulator): somata of 12-18 µm rendered as Gaussians of sigma sqrt((d/4)^2 + psf^2)
(psf (4, 1.5, 1.5) µm), peak photons log-normal (CV 0.25) around a mean brightness,
autofluorescence bleed-through (0.2 x 300 photons, +-30 % smooth variation), an
illumination gradient along x (30 %) and light-sheet stripes (10 %), shot noise
(variance = mean) plus read noise (SD 6), camera offset 100, uint16.

Signal-to-noise (SNR) = mean soma peak photons over the noise SD of the mean
background, sqrt(60 + 6^2) = 9.8 photons. The census simulator's default brightness
(500 photons) is SNR 51. Cells are placed uniformly at random with a hard-core
distance of 10 µm (somata may touch and squeeze, never overlap by more than that).

Two sweeps at fixed seeds: SNR at 5 000 cells/mm^3 (few somata touch), and density at
SNR 51 (the default), up to 200 000 cells/mm^3 where most somata touch a neighbour. Each volume is
scored for ketamap's ``detect_cells`` (signal channel only, default parameters) and, when
a Python with cellfinder is given (a separate environment), for cellfinder's detection
stage (``skip_classification=True``, ``n_free_cpus=0``, ``soma_diameter=15``, other
parameters at their defaults, and optionally other values of its threshold
``n_sds_above_mean_thresh``, default 10), all volumes in one subprocess. Matching is one-to-one
(Hungarian on pairs within 10 µm); cells and detections within 10 µm of the volume's
faces are not scored (a detection matched to a scored cell always counts).

Prints and saves JSON (``benchmarks/results/detect_curves.json``) and a two-panel figure
(``docs/img/detect_curves.png``).

Usage (``CF_PYTHON``: the python of a separate environment with cellfinder)::

    .venv/bin/python benchmarks/bench_detect_curves.py \\
        [--cellfinder-python CF_PYTHON] [--cellfinder-sds 10 4] \\
        [--shape 40 256 256] [--replot]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
VOXEL_UM = (5.0, 2.0, 2.0)
TOLERANCE_UM = 10.0
MARGIN_UM = 10.0
HARD_CORE_UM = 10.0
SNR_LEVELS = (3.0, 5.0, 8.0, 12.0, 20.0, 51.0)
SNR_DENSITY_PER_MM3 = 5_000.0
DENSITY_LEVELS = (5_000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0, 200_000.0)

_CELLFINDER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from cellfinder.core.main import main
    results = []
    sds = [float(v) for v in sys.argv[2].split(",")]
    for path in sys.argv[3:]:
        vol = np.load(path)
        for sd in sds:
            t = time.perf_counter()
            cells = main(vol, vol, voxel_sizes=(5.0, 2.0, 2.0), skip_classification=True,
                         n_free_cpus=0, soma_diameter=15.0, n_sds_above_mean_thresh=sd)
            wall = time.perf_counter() - t
            xyz = np.array([[c.z, c.y, c.x] for c in cells], dtype=float).reshape(-1, 3)
            out = path[:-4] + f"_cellfinder_{sd:g}.npy"
            np.save(out, xyz)
            results.append({"path": path, "sd": sd, "wall_s": wall, "n": len(xyz),
                            "cells": out})
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
    """
)


def _cellfinder_key(sd: float) -> str:
    """Result key of cellfinder at one threshold: its default (10 SDs) is plain "cellfinder"."""
    return "cellfinder" if sd == 10.0 else f"cellfinder_sd{sd:g}"


def _imaging():
    """Imaging constants of the census simulator (``BrainParams`` defaults)."""
    from ketamap.simulate import BrainParams

    p = BrainParams()
    return {
        "soma_diameter_um": p.soma_diameter_um,
        "psf_sigma_um": list(p.psf_sigma_um),
        "brightness_photons": p.cell_brightness,
        "brightness_cv": p.cell_brightness_cv,
        "background_photons": p.bleed_through * p.autofluorescence_photons,
        "read_noise": p.read_noise,
        "camera_offset": p.camera_offset,
        "illumination_gradient": p.illumination_gradient,
        "stripe_amplitude": p.stripe_amplitude,
    }


def noise_sd(imaging: dict) -> float:
    """Noise SD (photons) of the mean background: sqrt(background + read^2)."""
    return float(np.sqrt(imaging["background_photons"] + imaging["read_noise"] ** 2))


def simulate_volume(shape, *, snr: float, density_per_mm3: float, seed: int):
    """A light-sheet-like uint16 volume and its true cell centres (voxels, (n, 3)).

    The library's crop simulator (``ketamap.simulate.crop``) with every failure mode off.
    """
    from ketamap.simulate.crop import CropParams, simulate_crop

    params = CropParams(voxel_size_um=VOXEL_UM, snr=snr, density_per_mm3=density_per_mm3)
    crop = simulate_crop(shape, params=params, seed=seed)
    return crop.signal, crop.cells[["z_vox", "y_vox", "x_vox"]].to_numpy()


def score(found_vox: np.ndarray, truth_vox: np.ndarray, shape) -> dict:
    """Recall, precision and F1 of one-to-one matching within ``TOLERANCE_UM``.

    Cells and unmatched detections within ``MARGIN_UM`` of a face are not scored.
    """
    from ketamap.simulate.crop import score_detections

    return score_detections(
        found_vox,
        truth_vox,
        shape,
        voxel_size_um=VOXEL_UM,
        tolerance_um=TOLERANCE_UM,
        margin_um=MARGIN_UM,
    )


def _touching_fraction(truth_vox: np.ndarray, diameter_um: float) -> float:
    """Fraction of cells whose nearest neighbour is closer than one soma diameter."""
    if len(truth_vox) < 2:
        return 0.0
    pts = np.asarray(truth_vox) * np.asarray(VOXEL_UM)
    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.mean(d[:, 1] < diameter_um))


def _ketamap(volume: np.ndarray) -> tuple[np.ndarray, float]:
    import dask

    from ketamap.wholebrain import detect_cells

    with dask.config.set(scheduler="threads"):
        t = time.perf_counter()
        cells = detect_cells(volume, voxel_size_um=VOXEL_UM)
        wall = time.perf_counter() - t
    return cells[["z_vox", "y_vox", "x_vox"]].to_numpy(), wall


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    tools = [("ketamap", "ketamap detect_cells (defaults)", "C0", "o", "-")]
    for k, sd in enumerate(result.get("cellfinder_n_sds_above_mean_thresh", [])):
        tools.append((
            _cellfinder_key(sd),
            f"cellfinder detection (n_sds_above_mean_thresh={sd:g}"
            + (", default)" if sd == 10.0 else ")"),
            "C3" if sd == 10.0 else f"C{k + 1}",
            "s",
            "-" if sd == 10.0 else "--",
        ))  # fmt: skip
    for ax, sweep, key, label in (
        (axes[0], result["snr_sweep"], "snr", "signal-to-noise (soma peak / noise SD)"),
        (axes[1], result["density_sweep"], "density_per_mm3", "cell density (cells / mm³)"),
    ):
        for tool, name, colour, marker, style in tools:
            xs = [r[key] for r in sweep if tool in r]
            ys = [r[tool]["f1"] for r in sweep if tool in r]
            ax.plot(xs, ys, marker=marker, color=colour, ls=style, label=name)
        ax.set_xscale("log")
        ticks = sorted({r[key] for r in sweep})
        ax.set_xticks(ticks, [f"{t:,.0f}" if t >= 1000 else f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.set_ylabel("F1 (matching within 10 µm)")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.95, color="0.7", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].axvline(result["default_snr"], color="0.5", lw=0.8, ls=":")
    axes[0].set_title(f"F1 vs SNR ({SNR_DENSITY_PER_MM3:,.0f} cells/mm³)")
    axes[1].set_title(f"F1 vs density (SNR {result['default_snr']:.0f}, simulator default)")
    for r in result["density_sweep"]:
        axes[1].annotate(
            f"{100 * r['touching_fraction']:.0f}% touch",
            (r["density_per_mm3"], 0.03),
            fontsize=7,
            ha="center",
        )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), help="z y x voxels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cellfinder-python",
        default=None,
        help="python of a separate environment with cellfinder installed",
    )
    ap.add_argument(
        "--cellfinder-sds",
        type=float,
        nargs="+",
        default=(10.0,),
        help="cellfinder's n_sds_above_mean_thresh values to run (its default is 10)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detect_curves.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "img" / "detect_curves.png"))
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the figure from the saved JSON"
    )
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        _plot(result, Path(args.figure))
        print(f"wrote {args.figure}")
        return result

    imaging = _imaging()
    default_snr = imaging["brightness_photons"] / noise_sd(imaging)
    snr_levels = sorted({*SNR_LEVELS[:-1], round(default_snr, 1)})
    runs = [("snr", s, SNR_DENSITY_PER_MM3) for s in snr_levels]
    runs += [("density", round(default_snr, 1), d) for d in DENSITY_LEVELS]
    result: dict = {
        "shape": list(args.shape),
        "voxels": int(np.prod(args.shape)),
        "voxel_size_um": list(VOXEL_UM),
        "tolerance_um": TOLERANCE_UM,
        "margin_um": MARGIN_UM,
        "hard_core_um": HARD_CORE_UM,
        "imaging": imaging,
        "noise_sd_photons": noise_sd(imaging),
        "default_snr": default_snr,
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "snr_sweep": [],
        "density_sweep": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows, paths = [], []
        for i, (sweep, snr, density) in enumerate(runs):
            volume, truth = simulate_volume(
                args.shape, snr=snr, density_per_mm3=density, seed=args.seed + i
            )
            found, wall = _ketamap(volume)
            row = {
                "snr": snr,
                "density_per_mm3": density,
                "n_true": len(truth),
                "touching_fraction": _touching_fraction(truth, imaging["soma_diameter_um"]),
                "ketamap": {**score(found, truth, args.shape), "n": len(found), "wall_s": wall},
            }
            print(sweep, f"snr={snr:g} density={density:g}", "ketamap", row["ketamap"], flush=True)
            path = Path(tmp) / f"vol{i}.npy"
            np.save(path, volume)
            np.save(Path(tmp) / f"vol{i}_truth.npy", truth)
            rows.append((sweep, row))
            paths.append(str(path))
        if args.cellfinder_python:
            report = Path(tmp) / "cellfinder.json"
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
            sds = ",".join(f"{v:g}" for v in args.cellfinder_sds)
            t = time.perf_counter()
            proc = subprocess.run(
                [args.cellfinder_python, "-c", _CELLFINDER, str(report), sds, *paths],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"cellfinder failed:\n{proc.stderr[-3000:]}")
            result["cellfinder_process_wall_s"] = time.perf_counter() - t
            result["cellfinder_n_sds_above_mean_thresh"] = list(args.cellfinder_sds)
            by_path = dict(zip(paths, (row for _, row in rows), strict=True))
            for cf in json.loads(report.read_text()):
                row = by_path[cf["path"]]
                truth = np.load(cf["path"][:-4] + "_truth.npy")
                key = _cellfinder_key(cf["sd"])
                row[key] = {
                    **score(np.load(cf["cells"]), truth, args.shape),
                    "n": cf["n"],
                    "wall_s": cf["wall_s"],
                }
                print(f"snr={row['snr']:g} density={row['density_per_mm3']:g}", key, row[key])
        for sweep, row in rows:
            result[f"{sweep}_sweep"].append(row)
    result["total_wall_s"] = time.perf_counter() - t0
    at_default = [r for r in result["snr_sweep"] if r["snr"] == round(default_snr, 1)]
    result["ketamap_f1_at_default_snr"] = at_default[0]["ketamap"]["f1"] if at_default else None
    for sd in result.get("cellfinder_n_sds_above_mean_thresh", []):
        key = _cellfinder_key(sd)
        if at_default and key in at_default[0]:
            result[f"{key}_f1_at_default_snr"] = at_default[0][key]["f1"]
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    _plot(result, Path(args.figure))
    print(f"wrote {args.out} and {args.figure}")
    return result


if __name__ == "__main__":
    main()
