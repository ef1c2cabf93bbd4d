"""The ensembles stage: sessions file in, ensembles and coordination tables and figures out.

``run_ensembles(sessions_toml, out_dir)`` writes::

    OUT/ensembles.csv / .parquet    session, ensemble, cell, global_cell, weight, jaccard_first
    OUT/sessions.csv / .parquet     one row per session with coordination and matching measures
    OUT/cells.csv / .parquet        session, cell, global_cell, event_rate_hz, mean_coactivity
    OUT/cell_map.csv / .parquet     session, cell, global_cell (cells matched across sessions)
    OUT/statistics.csv / .parquet   every session compared with the first and the previous
    OUT/activations.parquet         session, ensemble, time_s, strength
    OUT/figures/raster.png / .svg   events sorted by ensemble (reference: first session)
    OUT/figures/coordination.png / .svg  coactivity measures over sessions
    OUT/figures/stability.png / .svg     ensemble stability and matched cells over sessions
    OUT/report.html                 one self-contained page with tables and figures
    OUT/summary.json                parameters, inputs and the returned summary

``cell`` is always a cell's index in that session's input (suite2p ROI number,
array row); ``global_cell`` is the identity of the cell across sessions.

The folder is written atomically: a failed run leaves no half-written output.
:func:`analyse_session` is the pure core (arrays in, results out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sstats

from ketamap.errors import InputError
from ketamap.invivo.ensembles import (
    Assemblies,
    activation_strength,
    bin_activity,
    block_permutation_test,
    coactive_bins,
    coactivity_matrix,
    detect_assemblies,
    match_assemblies,
)
from ketamap.invivo.matching import track_cells
from ketamap.invivo.report import ensemble_figures, save_figures, write_report
from ketamap.invivo.sessions import SessionsFile, apply_cell_map, load_sessions, read_cell_map
from ketamap.invivo.suite2p_io import read_recording
from ketamap.invivo.traces import (
    deconvolve,
    delta_f_over_f,
    detect_events,
    neuropil_correct,
    robust_noise,
)
from ketamap.io.atomic import atomic_dir, write_json, write_table
from ketamap.params import bounds, from_mapping, to_dict, validate
from ketamap.stats.multitest import holm

__all__ = [
    "EnsembleParams",
    "SessionResult",
    "analyse_session",
    "compare_sessions",
    "run_ensembles",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsembleParams:
    """Parameters of the ensembles stage (units in the names)."""

    neuropil_coefficient: float = field(
        default=0.7, metadata=bounds(ge=0, le=1, doc="neuropil contamination subtracted")
    )
    baseline_window_s: float = field(
        default=60.0, metadata=bounds(gt=0, doc="running-baseline window for ΔF/F")
    )
    baseline_percentile: float = field(
        default=8.0, metadata=bounds(ge=0, le=50, doc="percentile taken as baseline")
    )
    tau_decay_s: float = field(default=1.0, metadata=bounds(gt=0, doc="indicator decay time"))
    deconvolution: str = field(
        default="ar1", metadata=bounds(choices=("ar1", "oasis"), doc="deconvolution method")
    )
    event_threshold_sd: float = field(
        default=3.0, metadata=bounds(gt=0, doc="event threshold in noise SDs")
    )
    bin_s: float = field(default=0.2, metadata=bounds(gt=0, doc="time bin for coactivity"))
    coactivity_alpha: float = field(
        default=0.01, metadata=bounds(gt=0, lt=1, doc="per-bin level of the shift null")
    )
    member_sd: float = field(default=2.0, metadata=bounds(gt=0, doc="membership threshold in SDs"))
    min_members: int = field(default=2, metadata=bounds(ge=2, doc="smallest ensemble kept"))
    tracy_widom: bool = field(default=True, metadata=bounds(doc="Tracy-Widom margin on MP bound"))
    seed: int = field(default=0, metadata=bounds(ge=0, doc="seed of the ICA initialisation"))
    cell_matching: str = field(
        default="auto",
        metadata=bounds(
            choices=("auto", "footprints", "index"), doc="how cells are matched across sessions"
        ),
    )
    match_min_overlap: float = field(
        default=0.2, metadata=bounds(gt=0, le=1, doc="smallest footprint Jaccard of a match")
    )
    match_max_rotation_deg: float = field(
        default=4.0, metadata=bounds(ge=0, le=45, doc="rotation searched when registering")
    )
    match_rotation_step_deg: float = field(
        default=0.5, metadata=bounds(gt=0, le=10, doc="step of the rotation search")
    )

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class SessionResult:
    """Everything measured in one session (see :func:`analyse_session`)."""

    events: np.ndarray
    binned: np.ndarray
    assemblies: Assemblies
    activation: np.ndarray
    summary: dict
    per_cell: pd.DataFrame


def analyse_session(
    F: np.ndarray,
    Fneu: np.ndarray | None = None,
    *,
    frame_rate_hz: float,
    params: EnsembleParams | None = None,
    cell_index: np.ndarray | None = None,
) -> SessionResult:
    """Events, coactivity and ensembles of one session (pure).

    Parameters
    ----------
    F : ndarray, shape (cells, frames)
        ROI fluorescence.
    Fneu : ndarray, shape (cells, frames), optional
        Neuropil fluorescence (no correction when omitted).
    frame_rate_hz : float
        Imaging rate.
    params : EnsembleParams, optional
        Defaults to ``EnsembleParams()``.
    cell_index : ndarray of int, optional
        Input index of each cell (defaults to ``0..cells-1``).

    Returns
    -------
    SessionResult
        ``events`` bool (cells, frames); ``binned`` float32 (cells, bins);
        ``assemblies``; ``activation`` float32 (assemblies, bins); ``summary``
        dict of coordination measures; ``per_cell`` table.
    """
    params = EnsembleParams() if params is None else params
    Fc = F if Fneu is None else neuropil_correct(F, Fneu, coefficient=params.neuropil_coefficient)
    Fc = np.asarray(Fc, dtype=np.float32)
    n_cells, n_frames = Fc.shape
    idx = np.arange(n_cells) if cell_index is None else np.asarray(cell_index)
    dff = delta_f_over_f(
        Fc,
        frame_rate_hz=frame_rate_hz,
        window_s=params.baseline_window_s,
        percentile=params.baseline_percentile,
    )
    spikes = deconvolve(
        dff,
        frame_rate_hz=frame_rate_hz,
        tau_decay_s=params.tau_decay_s,
        method=params.deconvolution,
    )
    g = np.exp(-1.0 / (params.tau_decay_s * frame_rate_hz))
    noise = robust_noise(dff) * np.float32(np.sqrt(1 + g * g))
    events = detect_events(spikes, threshold_sd=params.event_threshold_sd, noise=noise)
    bin_frames = max(1, int(round(params.bin_s * frame_rate_hz)))
    binned = bin_activity(events, bin_frames=bin_frames)
    active = binned > 0
    corr = coactivity_matrix(active)
    off = ~np.eye(n_cells, dtype=bool)
    mean_coact = (
        np.where(off, corr, 0).sum(axis=1) / max(n_cells - 1, 1) if n_cells else np.zeros(0)
    )
    co = coactive_bins(active, alpha=params.coactivity_alpha)
    asm = detect_assemblies(
        binned,
        member_sd=params.member_sd,
        min_members=params.min_members,
        tracy_widom=params.tracy_widom,
        seed=params.seed,
    )
    act = activation_strength(binned, asm.patterns)
    duration_s = n_frames / frame_rate_hz
    iu = np.triu_indices(n_cells, 1)
    summary = {
        "n_cells": int(n_cells),
        "n_frames": int(n_frames),
        "duration_s": float(duration_s),
        "event_rate_hz": float(events.sum() / max(n_cells, 1) / duration_s) if duration_s else 0.0,
        "mean_pairwise_correlation": float(corr[iu].mean()) if len(iu[0]) else float("nan"),
        "coactive_threshold_cells": int(co["threshold"]),
        "fraction_coactive_bins": co["fraction"],
        "expected_fraction_coactive_bins": co["expected_fraction"],
        "n_ensembles": asm.n,
        "mean_ensemble_size": float(np.mean([len(m) for m in asm.members])) if asm.n else 0.0,
        "top_eigenvalue": float(asm.eigenvalues[0]) if len(asm.eigenvalues) else float("nan"),
        "mp_threshold": float(asm.threshold),
        "mean_activation_strength": float(act.mean()) if act.size else 0.0,
    }
    per_cell = pd.DataFrame(
        {
            "cell": idx.astype(int),
            "event_rate_hz": events.sum(axis=1) / duration_s if duration_s else np.zeros(n_cells),
            "mean_coactivity": mean_coact.astype(float),
        }
    )
    return SessionResult(events, binned, asm, act, summary, per_cell)


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = b - a
    if len(d) < 6 or np.all(d == 0):
        return float("nan"), float("nan")
    res = sstats.wilcoxon(a, b, zero_method="wilcox")
    return float(res.statistic), float(res.pvalue)


def compare_sessions(
    sessions: pd.DataFrame, cells: pd.DataFrame, coactive: dict | None = None
) -> pd.DataFrame:
    """Compare every session with the first one and with the previous one.

    Two tests per pair: a paired Wilcoxon signed-rank test on each cell's mean
    coactivity (cells present in both sessions, matched by ``global_cell`` when
    the table has it, else by input index), and a block permutation test
    (:func:`~ketamap.invivo.ensembles.block_permutation_test`) on the fraction of
    significantly coactive bins, which keeps the autocorrelation of the bins (they
    are not independent samples). p-values are Holm-adjusted within each measure.

    Parameters
    ----------
    sessions : DataFrame
        One row per session (``session``, ``fraction_coactive_bins``, ``n_bins``).
    cells : DataFrame
        ``session, cell, mean_coactivity`` and optionally ``global_cell``.
    coactive : dict, optional
        Session -> bool array, per time bin whether it was significantly coactive.
        Without it the fraction of coactive bins is reported, not tested.

    Returns
    -------
    DataFrame
        ``measure, session_a, session_b, comparison, value_a, value_b, difference,
        test, statistic, n, p_value, p_holm``.
    """
    labels = list(sessions["session"])
    pairs = []
    for i in range(1, len(labels)):
        pairs.append((labels[0], labels[i], "vs first"))
        if i > 1:
            pairs.append((labels[i - 1], labels[i], "vs previous"))
    rows = []
    by = sessions.set_index("session")
    key = "global_cell" if "global_cell" in cells.columns else "cell"
    for a, b, kind in pairs:
        ca = cells[cells.session == a].set_index(key)["mean_coactivity"]
        cb = cells[cells.session == b].set_index(key)["mean_coactivity"]
        common = ca.index.intersection(cb.index)
        xa, xb = ca.loc[common].to_numpy(), cb.loc[common].to_numpy()
        stat, p = _wilcoxon(xa, xb)
        rows.append(
            {
                "measure": "cell_mean_coactivity",
                "session_a": a,
                "session_b": b,
                "comparison": kind,
                "value_a": float(np.mean(xa)) if len(xa) else np.nan,
                "value_b": float(np.mean(xb)) if len(xb) else np.nan,
                "test": "paired Wilcoxon signed-rank",
                "statistic": stat,
                "n": len(common),
                "p_value": p,
            }
        )
        fa, fb = by.loc[a, "fraction_coactive_bins"], by.loc[b, "fraction_coactive_bins"]
        na, nb = int(by.loc[a, "n_bins"]), int(by.loc[b, "n_bins"])
        test = {"difference": fb - fa, "p_value": np.nan, "block": 0}
        if coactive is not None and a in coactive and b in coactive:
            test = block_permutation_test(coactive[a], coactive[b])
        rows.append(
            {
                "measure": "fraction_coactive_bins",
                "session_a": a,
                "session_b": b,
                "comparison": kind,
                "value_a": float(fa),
                "value_b": float(fb),
                "test": f"block permutation ({test['block']}-bin blocks)"
                if test["block"]
                else "not tested (too few bins)",
                "statistic": test["difference"],
                "n": na + nb,
                "p_value": test["p_value"],
            }
        )
    cols = [
        "measure",
        "session_a",
        "session_b",
        "comparison",
        "value_a",
        "value_b",
        "difference",
        "test",
        "statistic",
        "n",
        "p_value",
        "p_holm",
    ]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows)
    out["difference"] = out["value_b"] - out["value_a"]
    out["p_holm"] = np.nan
    for _, grp in out.groupby("measure"):
        p = grp["p_value"].to_numpy()
        ok = np.isfinite(p)
        if ok.any():
            out.loc[grp.index[ok], "p_holm"] = holm(p[ok])
    return out[cols]


@dataclass(frozen=True)
class _Analysed:
    """One session analysed: the result, its ensembles' members and the cell ids."""

    result: SessionResult
    members: list  # per ensemble, the input cell indices of its members
    cell_index: np.ndarray  # input cell index of every analysed row
    frame_rate_hz: float
    global_ids: np.ndarray  # global cell id of every analysed row
    global_members: list  # per ensemble, the members' global cell ids


def _global_ids(sf: SessionsFile, recs: list, params: EnsembleParams) -> tuple:
    """Global cell id of every kept cell of every session, and how they were found."""
    if sf.cell_map is not None:
        gids = apply_cell_map(
            read_cell_map(sf.cell_map, [s.label for s in sf.sessions]),
            [s.label for s in sf.sessions],
            [r.cell_index for r in recs],
        )
        return gids, "cell_map", None
    have = all(r.footprints is not None and len(r.footprints) == len(r.cell_index) for r in recs)
    mode = params.cell_matching
    if mode == "footprints" and not have:
        missing = next(
            s.label for s, r in zip(sf.sessions, recs, strict=True) if r.footprints is None
        )
        raise InputError(
            f'session "{missing}" has no ROI footprints, so cells cannot be matched by '
            'footprints; set cell_matching = "index" or give a cell_map.'
        )
    if mode == "index" or (mode == "auto" and (not have or len(recs) == 1)):
        return [np.asarray(r.cell_index, dtype=np.int64) for r in recs], "index", None
    ids, registration = track_cells(
        [r.mean_image for r in recs],
        [r.footprints for r in recs],
        min_jaccard=params.match_min_overlap,
        max_rotation_deg=params.match_max_rotation_deg,
        rotation_step_deg=params.match_rotation_step_deg,
    )
    return ids, "footprints", registration


def run_ensembles(
    sessions_toml: str | Path,
    out_dir: str | Path,
    *,
    params: EnsembleParams | None = None,
) -> dict:
    """Run the ensembles stage on every session of a sessions file.

    Cells are matched across sessions first (``params.cell_matching``, or the
    sessions file's ``cell_map``); every session is then analysed on all its
    own cells, and sessions are compared on the cells they share.

    Parameters
    ----------
    sessions_toml : path-like
        A sessions file (see :mod:`ketamap.invivo.sessions`).
    out_dir : path-like
        Output folder (replaced atomically).
    params : EnsembleParams, optional
        Overrides the file's ``[params]`` table entirely when given.

    Returns
    -------
    dict
        ``out_dir``, ``sessions`` (list of per-session summary dicts),
        ``n_ensembles`` (per session), ``cell_matching`` (method used) and
        ``files`` (paths written).

    Raises
    ------
    ManifestError, ParameterError, InputError, InputNotFoundError
        One sentence each.
    """
    sf: SessionsFile = load_sessions(sessions_toml)
    if params is None:
        params = from_mapping(EnsembleParams, sf.params, where=f"[params] in {sessions_toml}")
    recs, rates = [], []
    for s in sf.sessions:
        rec = read_recording(s.data, neuropil=s.neuropil, series=s.series)
        rate = s.frame_rate_hz or rec.frame_rate_hz
        if rate is None:
            raise InputError(
                f'session "{s.label}": {rec.source} records no frame rate; give frame_rate_hz.'
            )
        recs.append(rec)
        rates.append(rate)
    gids, method, registration = _global_ids(sf, recs, params)
    results, rows, cell_rows, map_rows = {}, [], [], []
    first_gids = set(gids[0].tolist())
    for k, (s, rec, rate, gid) in enumerate(zip(sf.sessions, recs, rates, gids, strict=True)):
        log.info("session %s: %d cells × %d frames at %.2f Hz", s.label, *rec.F.shape, rate)
        res = analyse_session(
            rec.F, rec.Fneu, frame_rate_hz=rate, params=params, cell_index=rec.cell_index
        )
        # member rows -> input cell indices and global ids
        members = [rec.cell_index[m] for m in res.assemblies.members]
        gmembers = [gid[m] for m in res.assemblies.members]
        results[s.label] = _Analysed(res, members, rec.cell_index, rate, gid, gmembers)
        n_bins = res.binned.shape[1]
        prev = set(gids[k - 1].tolist()) if k else first_gids
        match_row = {
            "cell_matching": method,
            "n_matched_first": int(len(first_gids.intersection(gid.tolist()))),
            "n_matched_previous": int(len(prev.intersection(gid.tolist()))),
        }
        if registration is not None:
            reg = registration.iloc[k]
            match_row |= {
                "shift_y_px": float(reg.shift_y_px),
                "shift_x_px": float(reg.shift_x_px),
                "rotation_deg": float(reg.rotation_deg),
                "registration_correlation": float(reg.correlation),
                "median_match_overlap": float(reg.median_overlap),
            }
        rows.append(
            {
                "session": s.label,
                "time_h": s.time_h,
                "frame_rate_hz": rate,
                "n_bins": n_bins,
                **res.summary,
                **match_row,
            }
        )
        cell_rows.append(res.per_cell.assign(session=s.label, global_cell=gid))
        map_rows.append(
            pd.DataFrame(
                {
                    "session": s.label,
                    "cell": rec.cell_index.astype(int),
                    "global_cell": gid.astype(int),
                }
            )
        )
    first = sf.sessions[0].label
    ens_rows, act_frames = [], []
    prev_members = None
    for row, (lab, a) in zip(rows, results.items(), strict=True):
        res, members, cidx, rate = a.result, a.members, a.cell_index, a.frame_rate_hz
        gmembers = a.global_members
        jf = match_assemblies(gmembers, results[first].global_members)
        row["stability_vs_first"] = float(jf.mean()) if len(jf) else float("nan")
        jp = match_assemblies(gmembers, prev_members) if prev_members is not None else np.array([])
        row["stability_vs_previous"] = float(jp.mean()) if len(jp) else float("nan")
        prev_members = gmembers
        for e, (m, gm) in enumerate(zip(members, gmembers, strict=True)):
            w = res.assemblies.patterns[e]
            pos = np.searchsorted(cidx, m)
            ens_rows += [
                {
                    "session": lab,
                    "ensemble": e,
                    "cell": int(c),
                    "global_cell": int(g),
                    "weight": float(w[p]),
                    "jaccard_first": float(jf[e]),
                }
                for c, g, p in zip(m, gm, pos, strict=True)
            ]
        if res.activation.size:
            nb = res.activation.shape[1]
            bin_s = max(1, int(round(params.bin_s * rate))) / rate
            act_frames.append(
                pd.DataFrame(
                    {
                        "session": lab,
                        "ensemble": np.repeat(np.arange(res.activation.shape[0]), nb),
                        "time_s": np.tile(np.arange(nb) * bin_s, res.activation.shape[0]),
                        "strength": res.activation.ravel(),
                    }
                )
            )
    sessions_table = pd.DataFrame(rows)
    cells = pd.concat(cell_rows, ignore_index=True)[
        ["session", "cell", "global_cell", "event_rate_hz", "mean_coactivity"]
    ]
    ensembles = pd.DataFrame(
        ens_rows, columns=["session", "ensemble", "cell", "global_cell", "weight", "jaccard_first"]
    )
    activations = (
        pd.concat(act_frames, ignore_index=True)
        if act_frames
        else pd.DataFrame(
            {
                "session": pd.Series(dtype=str),
                "ensemble": pd.Series(dtype=int),
                "time_s": pd.Series(dtype=float),
                "strength": pd.Series(dtype=np.float32),
            }
        )
    )
    cell_map = pd.concat(map_rows, ignore_index=True)
    coactive = {
        lab: (a.result.binned > 0).sum(axis=0) >= a.result.summary["coactive_threshold_cells"]
        for lab, a in results.items()
    }
    statistics = compare_sessions(sessions_table, cells, coactive)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_table(ensembles, tmp / "ensembles.parquet")
        write_table(sessions_table, tmp / "sessions.parquet")
        write_table(cells, tmp / "cells.parquet")
        write_table(cell_map, tmp / "cell_map.parquet")
        write_table(statistics, tmp / "statistics.parquet")
        write_table(activations, tmp / "activations.parquet", csv=False)
        figures = ensemble_figures(
            {k: (a.result, a.global_ids) for k, a in results.items()}, sessions_table, statistics
        )
        save_figures(figures, tmp / "figures")
        write_report(
            tmp / "report.html",
            field_of_view=sf.name,
            sessions=sessions_table,
            statistics=statistics,
            ensembles=ensembles,
            figures=figures,
            cell_matching=method,
            params=to_dict(params),
        )
        summary = {
            "sessions_file": str(Path(sessions_toml).resolve()),
            "field_of_view": sf.name,
            "cell_matching": method,
            "params": to_dict(params),
            "sessions": rows,
        }
        write_json(summary, tmp / "summary.json")
    files = sorted(str(p) for p in out_dir.rglob("*") if p.is_file())
    log.info("ensembles stage wrote %d files to %s", len(files), out_dir)
    return {
        "out_dir": str(out_dir),
        "sessions": rows,
        "cell_matching": method,
        "n_ensembles": {r["session"]: r["n_ensembles"] for r in rows},
        "files": files,
    }
