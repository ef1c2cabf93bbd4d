"""Tracking spines across sessions by position along the dendrite and side (pure)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

__all__ = ["track_spines", "confirm_faint"]


def track_spines(
    detections: pd.DataFrame,
    session_labels: list[str],
    *,
    tolerance_um: float = 1.0,
) -> pd.DataFrame:
    """Give every detection a spine identity shared with its match in the previous session.

    Detections of consecutive sessions on the same dendrite and side are
    matched by arc length (cost ``|Δs|``, optimal one-to-one assignment,
    :func:`scipy.optimize.linear_sum_assignment`); pairs farther apart than
    ``tolerance_um`` are not matched. A spine absent from a session ends its
    track: if a spine appears again at that place later, it is a new spine
    (the convention of Holtmaat et al. 2005), which is what lets
    :func:`~ketamap.invivo.spines.metrics.return_to_lost_sites` see it.

    Parameters
    ----------
    detections : DataFrame
        ``dendrite, session, s_um, side`` (any other columns are kept).
    session_labels : list of str
        Sessions in time order.
    tolerance_um : float
        Largest arc-length difference of a match.

    Returns
    -------
    DataFrame
        ``detections`` with an integer ``spine_id`` column, unique within a
        dendrite.
    """
    out = detections.copy()
    out["spine_id"] = -1
    order = {s: i for i, s in enumerate(session_labels)}
    for _, g in out.groupby("dendrite", sort=False):
        next_id = 0
        prev = None
        for label in sorted(g["session"].unique(), key=order.__getitem__):
            cur = g[g["session"] == label]
            ids = np.full(len(cur), -1)
            if prev is not None and len(prev) and len(cur):
                s_cur, s_prev = cur["s_um"].to_numpy(), prev["s_um"].to_numpy()
                same = cur["side"].to_numpy()[:, None] == prev["side"].to_numpy()[None]
                shift = 0.0
                for _ in range(3):  # absorb a residual shift along the dendrite
                    ds = np.abs(s_cur[:, None] - shift - s_prev[None])
                    cost = np.where(same & (ds <= tolerance_um), ds, 1e6)
                    r, c = linear_sum_assignment(cost)
                    good = cost[r, c] < 1e6
                    if good.sum() < 3:
                        break
                    shift = float(np.median(s_cur[r[good]] - s_prev[c[good]]))
                ids[r[good]] = prev["spine_id"].to_numpy()[c[good]]
            # only when the previous session directly precedes this one do tracks continue
            if prev is not None and order[label] != order[prev["session"].iloc[0]] + 1:
                ids[:] = -1
            new = ids < 0
            ids[new] = np.arange(next_id, next_id + new.sum())
            next_id += int(new.sum())
            out.loc[cur.index, "spine_id"] = ids
            prev = out.loc[cur.index]
    out["spine_id"] = out["spine_id"].astype(int)
    return out


def confirm_faint(
    detections: pd.DataFrame,
    session_labels: list[str],
    *,
    threshold_sd: float,
    confirm_threshold_sd: float,
    tolerance_um: float = 1.0,
) -> pd.DataFrame:
    """Keep faint detections only where the same place shows a spine in an adjacent session.

    A detection with ``snr >= threshold_sd`` is always kept. A fainter one
    (``confirm_threshold_sd <= snr < threshold_sd``) is kept when a detection
    of at least ``confirm_threshold_sd`` lies at the same place in the
    session before or after — within ``tolerance_um`` along the dendrite and
    within ``tolerance_um`` in distance from the shaft, on the same side — as
    a careful annotator checks a faint spine against the neighbouring
    sessions. Comparing the distance from the shaft too keeps a faint blob
    far out in the background from being confirmed by a real spine at the
    same arc position.

    Parameters
    ----------
    detections : DataFrame
        ``session, s_um, side, snr`` (and ``distance_um``, used where
        present) of one dendrite.
    session_labels : list of str
        Sessions in time order.
    threshold_sd, confirm_threshold_sd : float
        The two thresholds, in noise SDs.
    tolerance_um : float
        Largest difference of a confirmation, along the dendrite and in
        distance from the shaft.

    Returns
    -------
    DataFrame
        The kept rows.
    """
    d = detections[detections["snr"] >= confirm_threshold_sd]
    if "distance_um" not in d:
        d = d.assign(distance_um=np.nan)
    keep = d["snr"].to_numpy() >= threshold_sd
    by = {k: g for k, g in d.groupby("session", sort=False)}
    empty = d.iloc[:0]
    cols = ["session", "s_um", "side", "distance_um"]
    for i, (sess, s, side, dist) in enumerate(d[cols].itertuples(index=False)):
        if keep[i]:
            continue
        k = session_labels.index(sess)
        for j in (k - 1, k + 1):
            if 0 <= j < len(session_labels):
                o = by.get(session_labels[j], empty)
                same = (o["side"] == side) & ((o["s_um"] - s).abs() <= tolerance_um)
                # the same place: also as far from the shaft (where both distances are known)
                same &= ~((o["distance_um"] - dist).abs() > tolerance_um)
                if same.any():
                    keep[i] = True
                    break
    return d[keep]
