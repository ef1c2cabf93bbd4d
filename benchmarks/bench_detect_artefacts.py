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

Prints a table with the targets met or not and saves JSON
(``benchmarks/results/detect_artefacts.json``).

Usage::

    .venv/bin/python benchmarks/bench_detect_artefacts.py [--quick] [--seed 0] [--out PATH]

The full run takes about 5 minutes on 2 cores, ``--quick`` (fewer and smaller crops)
about 1 minute.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import time
from pathlib import Path

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


def _run(name, crops_params, shape, n, seed0, det_params, *, nn_diameter_um=None, log=print):
    """Simulate ``n`` crops, detect in both modes; return per-mode summaries."""
    from ketamap.simulate.crop import simulate_crop

    tallies = {m: _Tally() for m in MODES}
    qcs: dict[str, list] = {m: [] for m in MODES}
    walls = {m: 0.0 for m in MODES}
    sim_wall = 0.0
    for i in range(n):
        t = time.perf_counter()
        crop = simulate_crop(shape, params=crops_params, seed=seed0 + i)
        sim_wall += time.perf_counter() - t
        for mode in MODES:
            bg = crop.background if mode == "signal+bg" else None
            found, qc, wall = _detect(crop.signal, bg, det_params)
            walls[mode] += wall
            qcs[mode].append(qc)
            _score_crop(crop, found, tallies[mode], nn_diameter_um=nn_diameter_um)
    out = {}
    for mode in MODES:
        out[mode] = _summary(tallies[mode]) | {
            "detect_wall_s": walls[mode],
            "qc": qcs[mode][:3],
        }
    out["simulate_wall_s"] = sim_wall
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller crops (~1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "detect_artefacts.json")
    )
    ap.add_argument("--note", default="", help="free text saved in the JSON (e.g. which detector)")
    args = ap.parse_args(argv)

    import ketamap
    import ketamap.wholebrain.detect as detect_mod
    from ketamap.simulate.crop import CropParams
    from ketamap.wholebrain.detect import DetectionParams

    cfg = _settings(args.quick)
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

    # b. dense nuclei with clusters
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
            )
            dense_rows.append(row)
    scen["dense_nuclei"] = {
        "crop_params": "soma 12 µm, cluster_fraction 0.5, cluster_size (3, 8), spacing 1-1.5 d",
        "detection": "DetectionParams(soma_diameter_um=12, psf_sigma_um=psf)",
        "rows": dense_rows,
    }
    for mode in MODES:
        agg = {}
        for psf in PSFS:
            rows = [r[mode] for r in dense_rows if r["psf_sigma_um"] == list(psf)]
            tp = sum(r["tp"] for r in rows)
            fp = sum(r["fp"] for r in rows)
            b = [r["recall_by_nn_diameters"]["1-1.5"] for r in rows]
            n_b = sum(x["n"] for x in b)
            tp_b = sum(x["n"] * x["recall"] for x in b if x["n"])
            agg[f"psf_z_{psf[0]:g}"] = {
                "precision": _ratio(tp, tp + fp),
                "recall_nn_1_1.5": _ratio(tp_b, n_b),
                "n_nn_1_1.5": int(n_b),
            }
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
    print(f"total {result['total_wall_s']:.0f} s; wrote {args.out}")
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
    print()
    print("targets:")
    for k, v in result["targets_met"].items():
        flag = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        print(f"  {k:<52} {_fmt(v['value']):>8}  (target {v['target']})  {flag}")


if __name__ == "__main__":
    main()
