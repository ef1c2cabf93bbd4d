"""Scoring a spine analysis against simulated ground truth (detection F1, tracking accuracy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

__all__ = ["match_points", "score_spines"]


def match_points(a: np.ndarray, b: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matches between point sets within ``tolerance`` (Hungarian on distance).

    Parameters
    ----------
    a, b : ndarray, shape (n, 2) and (m, 2)
    tolerance : float
        Largest distance of a match (same units as the points).

    Returns
    -------
    (ndarray, ndarray)
        Matched row indices into ``a`` and ``b``.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    cost = np.where(d <= tolerance, d, 1e6)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < 1e6
    return r[ok], c[ok]


def score_spines(
    truth: pd.DataFrame,
    spines: pd.DataFrame,
    session_labels: list[str],
    *,
    pixel_size_um: float,
    tolerance_um: float = 0.75,
) -> dict:
    """Score detection and identity tracking of an analysis against the truth.

    Parameters
    ----------
    truth : DataFrame
        Ground truth: ``dendrite, session, spine_id, head_y_px, head_x_px``.
    spines : DataFrame
        The analysis' detections: ``dendrite, session, spine_id, y_px, x_px``
        (pixels of each session's own image).
    session_labels : list of str
        Sessions in time order.
    pixel_size_um : float
        Pixel size.
    tolerance_um : float
        Largest distance between a detection and the true head it matches.

    Returns
    -------
    dict
        ``tp, fp, fn, precision, recall, f1`` of detection, and
        ``tracking_accuracy``: among detections matched to a true spine in a
        session after the first, the fraction whose link to the previous
        session (the detection with the same identity there, or none) is the
        true one (the detection matched to the same true spine, or none);
        ``n_links`` is the number of such detections.
    """
    tp = fp = fn = 0
    correct = total = 0
    for dend in sorted(truth["dendrite"].unique()):
        prev_map = None  # det spine_id in previous session -> truth id
        prev_truth_to_det = None
        for label in session_labels:
            t = truth[(truth.dendrite == dend) & (truth.session == label)]
            s = spines[(spines.dendrite == dend) & (spines.session == label)]
            ti, si = match_points(
                t[["head_y_px", "head_x_px"]].to_numpy(float),
                s[["y_px", "x_px"]].to_numpy(float),
                tolerance_um / pixel_size_um,
            )
            tp += len(ti)
            fp += len(s) - len(si)
            fn += len(t) - len(ti)
            tids = t["spine_id"].to_numpy()[ti]
            dids = s["spine_id"].to_numpy()[si]
            if prev_map is not None:
                for tid, did in zip(tids, dids, strict=True):
                    true_pred = prev_truth_to_det.get(tid)  # det id in prev (or None)
                    pred = did if did in prev_map else None
                    correct += int(true_pred == pred)
                    total += 1
            prev_map = dict(zip(s["spine_id"].to_numpy(), [None] * len(s), strict=True))
            prev_truth_to_det = dict(zip(tids, dids, strict=True))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tracking_accuracy": correct / total if total else float("nan"),
        "n_links": total,
    }
