"""The shared real crop: tissue mask, candidates and recall of cellfinder's 56 cells.

Runs ``detect_cells`` with default parameters on ``../shared/data/cellfinder_crop``
(30 x 510 x 667 voxels at 5 x 2 x 2 µm, signal ``ch0`` and autofluorescence ``ch1``),
with and without the background channel, and reports: candidates, recall of the 56
reference cells within 10 µm (3D), the tissue mask's void level, tissue level and
fraction, and candidates in the void by an independent test (the autofluorescence
channel's mean over a 10 x 25 x 25-voxel box around the candidate below 4 x the void
level). Saves ``benchmarks/results/detect_real_crop.json`` and the figure
``docs/img/detect_real_crop.png`` (maximum projection of the signal, tissue-mask
outline, candidates and reference cells).

Usage::

    .venv/bin/python benchmarks/bench_detect_real_crop.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ketamap.io.points import read_points
from ketamap.wholebrain import DetectionParams, detect_cells

ROOT = Path(__file__).resolve().parents[1]
CROP = ROOT.parent / "shared" / "data" / "cellfinder_crop"
VS = np.array([5.0, 2.0, 2.0])


def _load(channel: str) -> np.ndarray:
    return np.stack([tifffile.imread(f) for f in sorted((CROP / channel).glob("*.tif*"))])


def main() -> dict:
    signal, background = _load("ch0"), _load("ch1")
    pts = read_points(CROP / "cell_classification.xml")
    ref = pts[["z_vox", "y_vox", "x_vox"]].to_numpy()
    local_bg = ndi.uniform_filter(background.astype(np.float32), (10, 25, 25), mode="nearest")
    result = {"shape": list(signal.shape), "voxel_size_um": VS.tolist(), "n_reference": len(ref)}
    runs = {}
    for name, bg in (("with_background", background), ("signal_only", None)):
        t = time.perf_counter()
        cells, qc = detect_cells(
            signal,
            voxel_size_um=tuple(VS),
            background=bg,
            params=DetectionParams(),
            return_qc=True,
        )
        wall = time.perf_counter() - t
        xyz = cells[["z_vox", "y_vox", "x_vox"]].to_numpy()
        d, _ = cKDTree(xyz * VS).query(ref * VS)
        idx = np.clip(np.rint(xyz).astype(int), 0, np.asarray(signal.shape) - 1)
        tissue = qc.pop("tissue")
        void_level = qc["tissue_void_level"] or float(np.percentile(local_bg, 1))
        in_void = local_bg[tuple(idx.T)] < 4 * max(void_level, 1.0)
        runs[name] = {
            "candidates": len(cells),
            "recall_10um": float(np.mean(d <= 10.0)),
            "candidates_in_void_independent": int(in_void.sum()),
            "wall_s": wall,
            **qc,
        }
        runs[name]["_mask"] = tissue
        runs[name]["_xyz"] = xyz
        print(name, {k: v for k, v in runs[name].items() if not k.startswith("_")})
    result["runs"] = {
        k: {a: b for a, b in v.items() if not a.startswith("_")} for k, v in runs.items()
    }
    out = ROOT / "benchmarks" / "results" / "detect_real_crop.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = runs["with_background"]
    mask = run["_mask"].full_resolution((slice(None),) * 3).any(axis=0)
    fig, ax = plt.subplots(figsize=(9, 7), layout="constrained")
    proj = signal.max(axis=0).astype(float)
    ax.imshow(proj, cmap="gray", vmin=np.percentile(proj, 1), vmax=np.percentile(proj, 99.7))
    ax.contour(mask, levels=[0.5], colors="yellow", linewidths=1.2)
    xyz = run["_xyz"]
    ax.scatter(
        xyz[:, 2],
        xyz[:, 1],
        s=6,
        facecolors="none",
        edgecolors="cyan",
        lw=0.6,
        label=f"ketamap candidates ({len(xyz)})",
    )
    ax.scatter(
        ref[:, 2],
        ref[:, 1],
        s=40,
        marker="+",
        color="magenta",
        lw=1.0,
        label=f"cellfinder's classified cells ({len(ref)})",
    )
    ax.set_title(
        f"Shared real crop (max projection of 30 planes): tissue mask (yellow), "
        f"recall {run['recall_10um']:.3f}, "
        f"candidates in the void {run['candidates_in_void_independent']}",
        fontsize=9,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.set_axis_off()
    fig.savefig(ROOT / "docs" / "img" / "detect_real_crop.png", dpi=100)
    print(f"wrote {out} and docs/img/detect_real_crop.png")
    return result


if __name__ == "__main__":
    main()
