"""One calcium-imaging session analysed, and sessions compared: the ensembles core.

:func:`analyse_session` is the pure core (traces in, events, coactivity and
ensembles out) with its parameters :class:`EnsembleParams`;
:func:`compare_sessions` compares the coordination measures of sessions on the
cells they share. The stage that reads a sessions file and writes the tables
is :func:`ketamap.pipelines.ensembles.run_ensembles`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sstats

from ketamap.invivo.ensembles.assemblies import (
    Assemblies,
    activation_strength,
    bin_activity,
    block_permutation_test,
    coactive_bins,
    coactivity_matrix,
    detect_assemblies,
)
from ketamap.invivo.ensembles.traces import (
    deconvolve,
    delta_f_over_f,
    detect_events,
    neuropil_correct,
    robust_noise,
)
from ketamap.params import bounds, validate
from ketamap.stats.multitest import holm

__all__ = [
    "EnsembleParams",
    "SessionResult",
    "analyse_session",
    "compare_sessions",
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
