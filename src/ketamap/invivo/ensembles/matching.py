"""Match cells across imaging sessions of one field of view.

Two sessions of the same field of view are never imaged in exactly the same
place: the brain moves by a few micrometres and rotates slightly between days,
suite2p detects a slightly different ROI set each time and numbers it in its
own order. :func:`match_cells` finds which ROI of session *b* is which ROI of
session *a*:

1. **Register the mean images.** Both images are high-pass filtered (a
   Gaussian background removed, as suite2p does before registering), then for
   every rotation on a grid (``±max_rotation_deg`` in ``rotation_step_deg``
   steps) image *b* is rotated about its centre and the translation is found by
   phase cross-correlation (:func:`skimage.registration.phase_cross_correlation`,
   sub-pixel). The rotation whose registered images correlate best wins.
2. **Move the footprints** of *b* (suite2p ``stat``: ``ypix, xpix, lam``) into
   the frame of *a* with that rigid transform (nearest pixel).
3. **Match** by the weighted Jaccard index of the footprints
   (``Σ min(wa, wb) / Σ max(wa, wb)`` with each ``lam`` normalised to sum 1),
   maximised over one-to-one assignments (Hungarian algorithm,
   :func:`scipy.optimize.linear_sum_assignment`); pairs below ``min_jaccard``
   are left unmatched (cells lost or gained).
4. **Refine** (default): an affine transform is fitted by least squares to the
   centroids of the pairs found (one pass of outlier rejection), footprints
   are moved again and matched again; this corrects residual rotation,
   scaling or shear that the grid missed. Then each footprint is shifted by
   the median residual of its 8 nearest matched neighbours, which corrects
   smooth non-rigid distortion, and the footprints are matched a last time.

:func:`track_cells` extends this to many sessions: every session is registered
to the first, and its cells are matched against all cells seen so far (each
with its latest footprint), so a cell absent in one session is found again
later; unmatched ROIs become new cells. The result gives every ROI a
``global_cell`` id.

Coordinates are (y, x) in pixels; transforms map session-*b* pixel coordinates
to session-*a* (reference) coordinates: ``p_a = A @ p_b + t``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from ketamap.errors import InputError, ParameterError

__all__ = [
    "Footprint",
    "RigidFit",
    "footprints_from_stat",
    "footprint_image",
    "register_mean_images",
    "transform_footprints",
    "footprint_jaccard",
    "match_footprints",
    "match_cells",
    "track_cells",
]

log = logging.getLogger(__name__)

#: One ROI footprint: integer pixel rows, columns and weights summing to 1.
Footprint = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RigidFit:
    """A transform from session-*b* to session-*a* pixel coordinates.

    Attributes
    ----------
    matrix : ndarray, shape (2, 2)
        Linear part ``A`` acting on (y, x).
    offset : ndarray, shape (2,)
        Translation ``t`` in pixels: ``p_a = A @ p_b + t``.
    rotation_deg : float
        Rotation angle (of the grid search, or of the affine refit when
        refined), about the centre of image *b*.
    shift_px : tuple of float
        (dy, dx) by which the centre of image *b* moves.
    correlation : float
        Pearson correlation of the high-passed images after registration.
    """

    matrix: np.ndarray
    offset: np.ndarray
    rotation_deg: float
    shift_px: tuple[float, float]
    correlation: float

    def apply(self, yx: np.ndarray) -> np.ndarray:
        """Map (n, 2) coordinates of *b* into the frame of *a*."""
        return np.asarray(yx, dtype=float) @ self.matrix.T + self.offset


def footprints_from_stat(stat: Sequence) -> list[Footprint]:
    """Footprints from suite2p ``stat`` entries (dicts with ``ypix, xpix`` and optional ``lam``).

    Parameters
    ----------
    stat : sequence of dict
        One entry per ROI, as in ``stat.npy``.

    Returns
    -------
    list of Footprint
        ``(ypix int64, xpix int64, weights float64 summing to 1)`` per ROI.

    Raises
    ------
    InputError
        If an entry has no ``ypix``/``xpix`` or mismatched lengths.
    """
    out = []
    for i, s in enumerate(stat):
        try:
            y = np.asarray(s["ypix"], dtype=np.int64).ravel()
            x = np.asarray(s["xpix"], dtype=np.int64).ravel()
        except (KeyError, TypeError, IndexError) as e:
            raise InputError(f"ROI {i} of the footprints has no ypix/xpix pixel lists.") from e
        lam = s.get("lam") if isinstance(s, dict) else None
        w = np.ones(len(y)) if lam is None else np.asarray(lam, dtype=float).ravel()
        if len(y) != len(x) or len(w) != len(y):
            raise InputError(f"ROI {i} of the footprints has ypix, xpix and lam of unequal length.")
        w = np.clip(w, 0, None)
        total = w.sum()
        w = w / total if total > 0 else np.full(len(w), 1.0 / max(len(w), 1))
        out.append((y, x, w))
    return out


def footprint_image(footprints: Sequence[Footprint], shape: tuple[int, int]) -> np.ndarray:
    """Render footprints into an image (used when a session has no mean image).

    Returns
    -------
    ndarray of float32, shape ``shape``
        Sum of each ROI's weights, scaled to a peak of 1 per ROI.
    """
    img = np.zeros(shape, dtype=np.float32)
    for y, x, w in footprints:
        ok = (y >= 0) & (y < shape[0]) & (x >= 0) & (x < shape[1])
        if ok.any():
            np.add.at(img, (y[ok], x[ok]), (w[ok] / max(w.max(), 1e-12)).astype(np.float32))
    return img


def _highpass(img: np.ndarray, sigma_px: float) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    out = img - ndimage.gaussian_filter(img, sigma_px)
    sd = out.std()
    return out / sd if sd > 0 else out


def _rotation(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


def _warp(img: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape) -> np.ndarray:
    """Image of *b* in the frame of *a* for ``p_a = matrix @ p_b + offset`` (NaN outside)."""
    inv = np.linalg.inv(matrix)
    return ndimage.affine_transform(
        img, inv, offset=-inv @ offset, output_shape=shape, order=1, cval=np.nan
    )


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 16:
        return -1.0
    x, y = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else -1.0


def register_mean_images(
    mean_a: np.ndarray,
    mean_b: np.ndarray,
    *,
    max_rotation_deg: float = 4.0,
    rotation_step_deg: float = 0.5,
    highpass_px: float = 8.0,
) -> RigidFit:
    """Rigid registration of mean image *b* onto mean image *a* (pure).

    Parameters
    ----------
    mean_a, mean_b : ndarray, shape (y, x)
        Mean (or footprint) images; they may differ in size.
    max_rotation_deg, rotation_step_deg : float
        Rotation grid searched (``0`` disables the search).
    highpass_px : float
        SD of the Gaussian background removed before registering.

    Returns
    -------
    RigidFit
    """
    from skimage.registration import phase_cross_correlation

    if max_rotation_deg < 0 or rotation_step_deg <= 0:
        raise ParameterError("max_rotation_deg must be >= 0 and rotation_step_deg > 0.")
    a = _highpass(mean_a, highpass_px)
    b = _highpass(mean_b, highpass_px)
    # pad to a common shape for the phase correlation
    shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    a_pad = np.zeros(shape, np.float32)
    a_pad[: a.shape[0], : a.shape[1]] = a
    n = int(np.floor(max_rotation_deg / rotation_step_deg + 1e-9))
    angles = np.arange(-n, n + 1) * rotation_step_deg
    c = (np.asarray(b.shape, dtype=float) - 1) / 2
    best = None
    for theta in angles:
        R = _rotation(theta)
        rb = np.nan_to_num(_warp(b, R, c - R @ c, shape), nan=0.0)
        shift, _, _ = phase_cross_correlation(a_pad, rb, upsample_factor=10, normalization=None)
        offset = c - R @ c + shift
        score = _corr(a, _warp(b, R, offset, a.shape))
        if best is None or score > best[0]:
            best = (score, theta, R, offset, shift)
    score, theta, R, offset, shift = best
    return RigidFit(R, offset, float(theta), (float(shift[0]), float(shift[1])), float(score))


def transform_footprints(
    footprints: Sequence[Footprint], fit_matrix: np.ndarray, fit_offset: np.ndarray
) -> list[Footprint]:
    """Move footprints by ``p -> matrix @ p + offset`` (nearest pixel, weights merged)."""
    out = []
    for y, x, w in footprints:
        p = np.column_stack([y, x]).astype(float) @ np.asarray(fit_matrix).T + fit_offset
        yx = np.rint(p).astype(np.int64)
        if len(yx):
            uniq, inv = np.unique(yx, axis=0, return_inverse=True)
            ww = np.bincount(inv.ravel(), weights=w, minlength=len(uniq))
            out.append((uniq[:, 0], uniq[:, 1], ww / ww.sum()))
        else:
            out.append((y, x, w))
    return out


def _pixel_table(footprints: Sequence[Footprint], name: str) -> pd.DataFrame:
    n = [len(f[0]) for f in footprints]
    if not footprints or sum(n) == 0:
        return pd.DataFrame(
            {name: np.zeros(0, int), "y": np.zeros(0, int), "x": np.zeros(0, int), "w": np.zeros(0)}
        )
    return pd.DataFrame(
        {
            name: np.repeat(np.arange(len(footprints)), n),
            "y": np.concatenate([f[0] for f in footprints]),
            "x": np.concatenate([f[1] for f in footprints]),
            "w": np.concatenate([f[2] for f in footprints]),
        }
    )


def footprint_jaccard(fp_a: Sequence[Footprint], fp_b: Sequence[Footprint]) -> pd.DataFrame:
    """Weighted Jaccard of every overlapping pair of footprints (same frame).

    Returns
    -------
    DataFrame
        ``a, b, jaccard`` for pairs sharing at least one pixel (positions in
        the input lists).
    """
    ta, tb = _pixel_table(fp_a, "a"), _pixel_table(fp_b, "b")
    m = ta.merge(tb, on=["y", "x"], suffixes=("_a", "_b"))
    if m.empty:
        return pd.DataFrame({"a": np.zeros(0, int), "b": np.zeros(0, int), "jaccard": np.zeros(0)})
    m["mn"] = np.minimum(m["w_a"], m["w_b"])
    g = m.groupby(["a", "b"], sort=True)["mn"].sum().reset_index()
    # both footprints sum to 1, so Σ max = 2 − Σ min
    g["jaccard"] = g["mn"] / (2.0 - g["mn"])
    return g[["a", "b", "jaccard"]]


def match_footprints(
    fp_a: Sequence[Footprint], fp_b: Sequence[Footprint], *, min_jaccard: float = 0.2
) -> pd.DataFrame:
    """One-to-one matching of footprints in one frame (Hungarian, max total Jaccard).

    Returns
    -------
    DataFrame
        ``a, b, jaccard`` for the pairs kept (``jaccard >= min_jaccard``), sorted by ``a``.
    """
    pairs = footprint_jaccard(fp_a, fp_b)
    pairs = pairs[pairs.jaccard >= min_jaccard]
    if pairs.empty:
        return pairs.reset_index(drop=True)
    ua, ia = np.unique(pairs["a"].to_numpy(), return_inverse=True)
    ub, ib = np.unique(pairs["b"].to_numpy(), return_inverse=True)
    score = np.zeros((len(ua), len(ub)))
    score[ia, ib] = pairs["jaccard"].to_numpy()
    r, c = linear_sum_assignment(score, maximize=True)
    keep = score[r, c] >= min_jaccard
    out = pd.DataFrame({"a": ua[r[keep]], "b": ub[c[keep]], "jaccard": score[r[keep], c[keep]]})
    return out.sort_values("a").reset_index(drop=True)


def _centroids(footprints: Sequence[Footprint]) -> np.ndarray:
    if not footprints:
        return np.zeros((0, 2))
    return np.array([[np.sum(y * w), np.sum(x * w)] for y, x, w in footprints])


def _affine_refit(fp_a, fp_b, pairs: pd.DataFrame, fit: RigidFit, center) -> RigidFit:
    """Least-squares affine from matched centroids of *b* (own frame) to *a*.

    ``rotation_deg`` and ``shift_px`` of the result are read off the affine:
    its rotation angle and where it moves the image centre ``center``.
    """
    if len(pairs) < 6:
        return fit
    pb = _centroids([fp_b[i] for i in pairs["b"]])
    pa = _centroids([fp_a[i] for i in pairs["a"]])
    X = np.column_stack([pb, np.ones(len(pb))])
    coef, *_ = np.linalg.lstsq(X, pa, rcond=None)
    resid = np.linalg.norm(X @ coef - pa, axis=1)
    # one pass of outlier rejection (3 × median residual, at least 1 px)
    ok = resid <= max(3 * np.median(resid), 1.0)
    if ok.sum() >= 6:
        coef, *_ = np.linalg.lstsq(X[ok], pa[ok], rcond=None)
    A, t = coef[:2].T.copy(), coef[2].copy()
    c = np.asarray(center, dtype=float)
    shift = A @ c + t - c
    angle = float(np.degrees(np.arctan2(A[1, 0], A[0, 0])))
    return RigidFit(A, t, angle, (float(shift[0]), float(shift[1])), fit.correlation)


def match_cells(
    mean_a: np.ndarray | None,
    stat_a: Sequence,
    mean_b: np.ndarray | None,
    stat_b: Sequence,
    *,
    min_jaccard: float = 0.2,
    max_rotation_deg: float = 4.0,
    rotation_step_deg: float = 0.5,
    refine: bool = True,
    return_moved: bool = False,
) -> tuple:
    """Match the ROIs of session *b* to those of session *a* (pure).

    Parameters
    ----------
    mean_a, mean_b : ndarray, shape (y, x), or None
        Mean images; when None, the footprints rendered as an image are
        registered instead.
    stat_a, stat_b : sequence of dict or of Footprint
        suite2p ``stat`` entries (``ypix, xpix, lam``) or footprint tuples.
    min_jaccard : float
        Smallest weighted footprint Jaccard accepted as the same cell.
    max_rotation_deg, rotation_step_deg : float
        Rotation grid of the registration.
    refine : bool
        Refit an affine transform on the matched centroids, correct the
        remaining smooth non-rigid shift locally, and match again.
    return_moved : bool
        Also return the footprints of *b* moved into the frame of *a*.

    Returns
    -------
    pairs : DataFrame
        ``cell_a, cell_b, overlap`` (positions in ``stat_a``/``stat_b``;
        ``overlap`` is the weighted Jaccard), sorted by ``cell_a``.
    fit : RigidFit
        The global transform from *b* to *a* (before the local correction).
    moved : list of Footprint
        Only with ``return_moved``: footprints of *b* in the frame of *a*.

    Examples
    --------
    >>> import numpy as np
    >>> yy, xx = np.mgrid[0:64, 0:64]
    >>> stat = [{"ypix": yy[(yy - cy) ** 2 + (xx - cx) ** 2 < 9],
    ...          "xpix": xx[(yy - cy) ** 2 + (xx - cx) ** 2 < 9]}
    ...         for cy, cx in [(10, 12), (30, 40), (50, 20), (20, 50)]]
    >>> pairs, fit = match_cells(None, stat, None, stat[::-1])
    >>> pairs["cell_b"].tolist()
    [3, 2, 1, 0]
    """
    if not 0 < min_jaccard <= 1:
        raise ParameterError(f"min_jaccard must be in (0, 1], got {min_jaccard!r}.")
    fp_a = _as_footprints(stat_a)
    fp_b = _as_footprints(stat_b)
    img_a = mean_a if mean_a is not None else footprint_image(fp_a, _extent(fp_a, fp_b))
    img_b = mean_b if mean_b is not None else footprint_image(fp_b, _extent(fp_a, fp_b))
    fit = register_mean_images(
        img_a, img_b, max_rotation_deg=max_rotation_deg, rotation_step_deg=rotation_step_deg
    )
    moved = transform_footprints(fp_b, fit.matrix, fit.offset)
    pairs = match_footprints(fp_a, moved, min_jaccard=min_jaccard)
    if refine:
        fit = _affine_refit(fp_a, fp_b, pairs, fit, (np.asarray(img_b.shape) - 1) / 2)
        moved = transform_footprints(fp_b, fit.matrix, fit.offset)
        pairs = match_footprints(fp_a, moved, min_jaccard=min_jaccard)
        moved = _local_correction(fp_a, moved, pairs)
        pairs = match_footprints(fp_a, moved, min_jaccard=min_jaccard)
    pairs = pairs.rename(columns={"a": "cell_a", "b": "cell_b", "jaccard": "overlap"})
    if return_moved:
        return pairs, fit, moved
    return pairs, fit


def _local_correction(fp_a, moved, pairs: pd.DataFrame, k: int = 8) -> list[Footprint]:
    """Shift each moved footprint by the median residual of its k nearest matched cells.

    Corrects smooth non-rigid distortion (brain deformation, scan nonlinearity)
    that one affine transform leaves: the residual ``centroid_a − centroid_b``
    of matched pairs varies slowly over the field, so each cell borrows the
    median residual of its neighbours (not its own, which would bias towards
    its current partner).
    """
    from scipy.spatial import cKDTree

    if len(pairs) < k + 1:
        return list(moved)
    cb = _centroids([moved[i] for i in pairs["b"]])
    resid = _centroids([fp_a[i] for i in pairs["a"]]) - cb
    tree = cKDTree(cb)
    allc = _centroids(moved)
    _, nn = tree.query(allc, k=k + 1)
    out = []
    matched = dict(zip(pairs["b"].tolist(), range(len(pairs)), strict=True))
    for i, (y, x, w) in enumerate(moved):
        idx = [j for j in nn[i] if j != matched.get(i, -1)][:k]
        d = np.rint(np.median(resid[idx], axis=0)).astype(np.int64)
        out.append((y + d[0], x + d[1], w))
    return out


def _as_footprints(stat: Sequence) -> list[Footprint]:
    if len(stat) and isinstance(stat[0], tuple):
        return list(stat)
    return footprints_from_stat(stat)


def _extent(*fps) -> tuple[int, int]:
    ymax = max((int(f[0].max()) for fp in fps for f in fp if len(f[0])), default=0)
    xmax = max((int(f[1].max()) for fp in fps for f in fp if len(f[1])), default=0)
    return ymax + 8, xmax + 8


def track_cells(
    means: Sequence[np.ndarray | None],
    stats: Sequence[Sequence],
    *,
    min_jaccard: float = 0.2,
    max_rotation_deg: float = 4.0,
    rotation_step_deg: float = 0.5,
    refine: bool = True,
) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Give every ROI of every session a global cell id (pure).

    Session 0 is the reference frame. Each later session is registered to it
    (:func:`match_cells`), its footprints are moved into the reference frame
    and matched one-to-one against every cell seen so far (with its most
    recent footprint); unmatched ROIs become new cells.

    Parameters
    ----------
    means : sequence of ndarray or None
        Mean image of each session.
    stats : sequence of sequence
        Footprints (suite2p ``stat`` entries) of each session.
    min_jaccard, max_rotation_deg, rotation_step_deg, refine
        As in :func:`match_cells`.

    Returns
    -------
    global_ids : list of ndarray of int
        For each session, the global id of each ROI (in input order).
    registration : DataFrame
        One row per session: ``shift_y_px, shift_x_px, rotation_deg,
        correlation, n_rois, n_matched, median_overlap`` (session 0: identity).
    """
    if len(means) != len(stats) or not stats:
        raise ParameterError("track_cells needs one mean image (or None) per footprint list.")
    fps = [_as_footprints(s) for s in stats]
    pool = list(fps[0])
    ids = [np.arange(len(fps[0]))]
    rows = [
        {
            "shift_y_px": 0.0,
            "shift_x_px": 0.0,
            "rotation_deg": 0.0,
            "correlation": 1.0,
            "n_rois": len(fps[0]),
            "n_matched": len(fps[0]),
            "median_overlap": 1.0,
        }
    ]
    for k in range(1, len(fps)):
        if not fps[k] or not fps[0]:  # nothing to register on: every ROI is a new cell
            ids.append(np.arange(len(pool), len(pool) + len(fps[k]), dtype=np.int64))
            pool += list(fps[k])
            rows.append(
                {
                    "shift_y_px": np.nan,
                    "shift_x_px": np.nan,
                    "rotation_deg": np.nan,
                    "correlation": np.nan,
                    "n_rois": len(fps[k]),
                    "n_matched": 0,
                    "median_overlap": np.nan,
                }
            )
            continue
        _, fit, moved = match_cells(
            means[0],
            fps[0],
            means[k],
            fps[k],
            min_jaccard=min_jaccard,
            max_rotation_deg=max_rotation_deg,
            rotation_step_deg=rotation_step_deg,
            refine=refine,
            return_moved=True,
        )
        pairs = match_footprints(pool, moved, min_jaccard=min_jaccard)
        gid = np.full(len(moved), -1, dtype=np.int64)
        gid[pairs["b"].to_numpy()] = pairs["a"].to_numpy()
        for b, a in zip(pairs["b"], pairs["a"], strict=True):
            pool[a] = moved[b]  # keep the latest footprint of each cell
        for b in np.nonzero(gid < 0)[0]:
            gid[b] = len(pool)
            pool.append(moved[b])
        ids.append(gid)
        rows.append(
            {
                "shift_y_px": fit.shift_px[0],
                "shift_x_px": fit.shift_px[1],
                "rotation_deg": fit.rotation_deg,
                "correlation": fit.correlation,
                "n_rois": len(moved),
                "n_matched": len(pairs),
                "median_overlap": float(pairs["jaccard"].median()) if len(pairs) else float("nan"),
            }
        )
        log.info(
            "session %d: %d of %d ROIs matched to earlier cells (rotation %.1f°)",
            k,
            len(pairs),
            len(moved),
            fit.rotation_deg,
        )
    return ids, pd.DataFrame(rows)
