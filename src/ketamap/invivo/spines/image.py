"""Image steps of spine analysis: registration, dendrite tracing, spine detection (pure).

Coordinates are pixels (y, x) of a 2D image; physical lengths are µm. A 3D
stack is maximum-projected along z (:func:`project`) before these steps.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree

from ketamap.errors import InputError, ParameterError
from ketamap.invivo.spines.params import SpineParams

__all__ = [
    "project",
    "Rigid",
    "register_rigid",
    "Centreline",
    "trace_dendrite",
    "detect_spines",
]

log = logging.getLogger(__name__)


def project(image: np.ndarray) -> np.ndarray:
    """Return a float32 2D image: the image itself, or the maximum projection of a (z, y, x) stack.

    Raises
    ------
    InputError
        For an image that is neither 2D nor 3D, or is empty.
    """
    a = np.asarray(image)
    if a.ndim == 3:
        a = a.max(axis=0)
    if a.ndim != 2 or min(a.shape) < 16:
        raise InputError(f"a spine image must be 2D (y, x) or 3D (z, y, x), got shape {a.shape}.")
    return a.astype(np.float32)


@dataclass(frozen=True)
class Rigid:
    """A rigid transform from reference pixels ``q`` to moving pixels ``p = matrix @ q + offset``.

    Attributes
    ----------
    matrix : ndarray, shape (2, 2)
    offset : ndarray, shape (2,)
    rotation_deg : float
    score : float
        Correlation of the registered images.
    """

    matrix: np.ndarray
    offset: np.ndarray
    rotation_deg: float = 0.0
    score: float = float("nan")

    def to_moving(self, q: np.ndarray) -> np.ndarray:
        """Map reference (y, x) points (n, 2) to moving-image pixels."""
        return np.asarray(q, float) @ self.matrix.T + self.offset

    def to_reference(self, p: np.ndarray) -> np.ndarray:
        """Map moving-image (y, x) points (n, 2) to reference pixels."""
        return (np.asarray(p, float) - self.offset) @ np.linalg.inv(self.matrix).T

    def warp(self, moving: np.ndarray) -> np.ndarray:
        """Resample ``moving`` onto the reference grid (linear interpolation)."""
        return ndi.affine_transform(
            moving, self.matrix, offset=self.offset, order=1, mode="nearest"
        )


def _prep(img: np.ndarray, pixel_size_um: float) -> np.ndarray:
    a = ndi.gaussian_filter(img.astype(np.float32), 0.2 / pixel_size_um)
    a = a - ndi.gaussian_filter(a, 4.0 / pixel_size_um)
    return np.clip(a, 0, None)


def _rotation(angle_deg: float, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.deg2rad(angle_deg)
    m = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return m, centre - m @ centre


def register_rigid(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    pixel_size_um: float,
    max_rotation_deg: float = 8.0,
) -> Rigid:
    """Rigidly register ``moving`` to ``reference`` (rotation search + cross-correlation).

    Each candidate rotation (1° steps on 2×-binned images, then 0.25° steps
    around the best at full resolution) is followed by a sub-pixel
    cross-correlation (:func:`skimage.registration.phase_cross_correlation`
    without spectral normalisation, which is more robust to noise) for the
    translation; the pair with the highest correlation of the
    background-subtracted images wins.

    Parameters
    ----------
    reference, moving : ndarray, shape (y, x)
        Images of the same dendrite.
    pixel_size_um : float
        Pixel size (sets the smoothing scales).
    max_rotation_deg : float
        Largest rotation searched, either way.

    Returns
    -------
    Rigid
        Reference → moving pixel transform.
    """
    from skimage.registration import phase_cross_correlation

    ref_full, mov_full = _prep(reference, pixel_size_um), _prep(moving, pixel_size_um)

    def trial(angle, ref, mov, factor, upsample):
        centre = (np.array(ref.shape) - 1) / 2.0
        m, off = _rotation(angle, centre)
        rot = ndi.affine_transform(mov, m, offset=off, order=1, mode="constant")
        with warnings.catch_warnings():  # an empty rotated image is scored, not fatal
            warnings.filterwarnings("ignore", "Could not determine RMS error", UserWarning)
            found = phase_cross_correlation(ref, rot, upsample_factor=upsample, normalization=None)
        shift = found[0]
        # ref(q) ~ rot(q - shift) = mov(m (q - shift) + off)
        total_off = off - m @ shift
        reg = ndi.affine_transform(mov, m, offset=total_off, order=1, mode="constant")
        valid = ndi.affine_transform(np.ones_like(mov), m, offset=total_off, order=0) > 0
        score = np.corrcoef(ref[valid], reg[valid])[0, 1] if valid.sum() > 100 else -1.0
        if factor != 1:  # back to full-resolution pixels: q_full = factor * q + c
            c = (factor - 1) / 2.0
            total_off = factor * total_off + c * (np.ones(2) - m @ np.ones(2))
        return float(score), Rigid(m, total_off, float(angle), float(score))

    # coarse search on 2x-binned images, then a fine one at full resolution
    h, w = (s // 2 * 2 for s in ref_full.shape)
    ref2 = ref_full[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    mov2 = mov_full[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    coarse = np.arange(-max_rotation_deg, max_rotation_deg + 1e-9, 1.0)
    best = max((trial(a, ref2, mov2, 2, 1) for a in coarse), key=lambda t: t[0])
    fine = best[1].rotation_deg + np.arange(-0.75, 0.76, 0.25)
    fine = np.unique(np.clip(fine, -max_rotation_deg, max_rotation_deg))
    best = max((trial(a, ref_full, mov_full, 1, 10) for a in fine), key=lambda t: t[0])
    return best[1]


@dataclass(frozen=True)
class Centreline:
    """A traced dendrite: points every ``step_px`` along the shaft.

    Attributes
    ----------
    points : ndarray, shape (n, 2)
        (y, x) pixels of the reference frame.
    pixel_size_um : float
    step_px : float
    """

    points: np.ndarray
    pixel_size_um: float
    step_px: float = 0.25

    @property
    def s_um(self) -> np.ndarray:
        """Arc length of every point (µm)."""
        return np.arange(len(self.points)) * self.step_px * self.pixel_size_um

    @property
    def length_um(self) -> float:
        """Total traced length (µm)."""
        return float(self.s_um[-1]) if len(self.points) else 0.0

    def pixel_maps(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Arc length and signed distance (µm) of every pixel of an image of ``shape``."""
        key = tuple(shape)
        cache = self.__dict__.setdefault("_maps", {})
        if key not in cache:
            yy, xx = np.mgrid[: shape[0], : shape[1]]
            s, d = self.project(np.column_stack([yy.ravel(), xx.ravel()]))
            cache[key] = (s.reshape(shape), d.reshape(shape))
        return cache[key]

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arc length (µm) and signed distance (µm, + on the left) of (n, 2) points."""
        pts = np.asarray(pts, float).reshape(-1, 2)
        _, i = cKDTree(self.points).query(pts)
        tang = np.gradient(self.points, axis=0)
        tang /= np.linalg.norm(tang, axis=1, keepdims=True) + 1e-12
        v = pts - self.points[i]
        cross = tang[i, 0] * v[:, 1] - tang[i, 1] * v[:, 0]
        dist = np.hypot(v[:, 0], v[:, 1])
        return self.s_um[i], np.sign(cross) * dist * self.pixel_size_um


def _longest_path(skel: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(skel)
    idx = -np.ones(skel.shape, int)
    idx[ys, xs] = np.arange(len(ys))
    rows, cols, w = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        y2, x2 = ys + dy, xs + dx
        ok = (y2 >= 0) & (y2 < skel.shape[0]) & (x2 >= 0) & (x2 < skel.shape[1])
        ok[ok] &= idx[y2[ok], x2[ok]] >= 0
        rows.append(idx[ys[ok], xs[ok]])
        cols.append(idx[y2[ok], x2[ok]])
        w.append(np.full(ok.sum(), np.hypot(dy, dx)))
    n = len(ys)
    g = coo_matrix(
        (np.concatenate(w), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    ).tocsr()
    d0 = dijkstra(g, directed=False, indices=0)
    a = int(np.nanargmax(np.where(np.isfinite(d0), d0, -1)))
    da, pred = dijkstra(g, directed=False, indices=a, return_predecessors=True)
    b = int(np.nanargmax(np.where(np.isfinite(da), da, -1)))
    path = [b]
    while path[-1] != a:
        path.append(int(pred[path[-1]]))
    return np.column_stack([ys[path], xs[path]]).astype(float)


def trace_dendrite(
    image: np.ndarray,
    *,
    pixel_size_um: float,
    shaft_sigma_um: float = 0.4,
    smooth_um: float = 1.0,
    step_px: float = 0.25,
) -> Centreline:
    """Trace the dendritic shaft: ridge filter → largest component → skeleton → longest path.

    Parameters
    ----------
    image : ndarray, shape (y, x)
        A clean view of the dendrite (e.g. the mean of registered sessions).
    pixel_size_um : float
        Pixel size.
    shaft_sigma_um : float
        Scale of the ridge filter (about the shaft's half-width).
    smooth_um : float
        Smoothing of the path before resampling.
    step_px : float
        Spacing of the returned centreline points.

    Returns
    -------
    Centreline

    Raises
    ------
    InputError
        When no dendrite-like ridge is found.
    """
    from skimage.filters import sato, threshold_otsu
    from skimage.morphology import skeletonize

    img = _prep(image, pixel_size_um)
    sig = shaft_sigma_um / pixel_size_um
    ridge = sato(img, sigmas=[sig, 1.5 * sig], black_ridges=False)
    if not np.isfinite(ridge).all() or ridge.max() <= 0:
        raise InputError("no dendrite found: the image has no ridge-like structure.")
    mask = ridge > threshold_otsu(ridge)
    lab, n = ndi.label(mask)
    if n == 0:
        raise InputError("no dendrite found: the image has no ridge-like structure.")
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (1 + int(np.argmax(sizes)))
    skel = skeletonize(mask)
    if skel.sum() < 10:
        raise InputError("no dendrite found: the traced shaft is shorter than 10 pixels.")
    path = _longest_path(skel)
    path = ndi.gaussian_filter1d(path, smooth_um / pixel_size_um, axis=0, mode="nearest")
    seg = np.hypot(*np.diff(path, axis=0).T)
    s = np.concatenate([[0], np.cumsum(seg)])
    grid = np.arange(0, s[-1], step_px)
    pts = np.column_stack([np.interp(grid, s, path[:, 0]), np.interp(grid, s, path[:, 1])])
    return Centreline(pts, float(pixel_size_um), float(step_px))


def detect_spines(
    image: np.ndarray,
    centreline: Centreline,
    *,
    params: SpineParams = SpineParams(),  # noqa: B008 - frozen, immutable default
    threshold_sd: float | None = None,
) -> pd.DataFrame:
    """Detect spine heads beside a traced shaft.

    The shaft is modelled as the median intensity at each distance from the
    centreline within ±2 µm along it, which follows changes of brightness and
    width but ignores the sparse spines; spines are the local maxima of the
    smoothed residual between ``min_distance_um`` and ``max_distance_um`` from
    the centreline that exceed ``threshold_sd`` robust noise SDs.

    Maxima are kept apart only by a small footprint (``min_separation_um``),
    so that a faint head on the flank of a bright one is still a maximum;
    which maxima belong to one spine is then decided by the intensity
    between them: two maxima closer than ``merge_um`` with no dip between
    them are one head, and a fainter maximum between the shaft and a brighter
    head (mostly radial from it, on the same side, within
    ``max_distance_um``) joined to it by a ridge that stays above
    ``neck_saddle_ratio`` of the fainter maximum is that spine's neck.

    Parameters
    ----------
    image : ndarray, shape (y, x)
        One session, in the frame of ``centreline``.
    centreline : Centreline
        The traced shaft.
    params : SpineParams
        The settings used here (the ``[params]`` table of a spines sessions file):
        ``min_distance_um`` and ``max_distance_um`` (where spine heads may lie,
        from the centreline), ``end_margin_um`` (the stretch at each end of the
        trace that is not analysed), ``spot_sigma_um`` (smoothing matched to a
        spine head), ``threshold_sd`` (detection threshold in noise SDs),
        ``merge_um`` and ``saddle_ratio`` (two maxima closer than ``merge_um`` are
        one spine unless the smoothed residual dips between them below
        ``saddle_ratio`` of the fainter one), ``min_separation_um`` (closest two
        detected heads may be, the ``min_distance`` of
        :func:`skimage.feature.peak_local_max`), ``min_shaft_ratio`` (smallest
        head amplitude as a fraction of the local shaft contrast: rejects faint
        bumps of the shaft outline when the image is bright) and
        ``neck_saddle_ratio`` (a fainter maximum nearer the shaft than a brighter
        head is that head's neck when the residual along the line between them
        stays above this fraction of the fainter maximum; lower than
        ``saddle_ratio`` because a neck is thin and dimmer than the point where it
        meets the shaft).
    threshold_sd : float, optional
        Overrides ``params.threshold_sd`` (the spines stage detects down to
        ``confirm_threshold_sd`` and confirms the faint ones across sessions).

    Returns
    -------
    DataFrame
        ``y_px, x_px, s_um, side, distance_um, amplitude, snr, shaft_ratio``
        (one row per spine; ``side`` is +1 or −1; ``shaft_ratio`` is the
        amplitude over the local shaft contrast); empty with these columns if
        none.
    """
    from skimage.feature import peak_local_max

    if not isinstance(params, SpineParams):
        raise ParameterError(f"params must be a SpineParams, got {type(params).__name__}.")
    min_distance_um, max_distance_um = params.min_distance_um, params.max_distance_um
    end_margin_um, spot_sigma_um = params.end_margin_um, params.spot_sigma_um
    threshold_sd = params.threshold_sd if threshold_sd is None else threshold_sd
    merge_um, saddle_ratio = params.merge_um, params.saddle_ratio
    neck_saddle_ratio, min_shaft_ratio = params.neck_saddle_ratio, params.min_shaft_ratio
    min_separation_um = params.min_separation_um
    px = centreline.pixel_size_um
    img = np.asarray(image, np.float32)
    s, d = centreline.pixel_maps(img.shape)
    near = np.abs(d) < max_distance_um + 2.0
    sb = np.floor(s[near] / 1.0).astype(int)
    db = np.round(d[near] / (0.5 * px)).astype(int)
    ok = (np.abs(d) >= min_distance_um) & (np.abs(d) <= max_distance_um)
    ok &= (s >= end_margin_um) & (s <= centreline.length_um - end_margin_um)
    cols = ["y_px", "x_px", "s_um", "side", "distance_um", "amplitude", "snr", "shaft_ratio"]
    if not ok.any():
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    min_px = max(1, int(round(min_separation_um / px)))
    exclude = np.zeros(int(near.sum()), bool)
    # two passes: the shaft model of the second ignores the heads found by the first, so a
    # faint spine next to a bright one is not absorbed into the shaft
    for _ in range(2):
        tab = pd.DataFrame({"sb": sb, "db": db, "v": img[near]})[~exclude]
        med = tab.groupby(["db", "sb"])["v"].median().unstack("sb")
        med = med.T.rolling(5, center=True, min_periods=1).median().T
        m = med.stack().rename("m").reindex(pd.MultiIndex.from_arrays([db, sb])).to_numpy()
        resid = np.zeros_like(img)
        resid[near] = img[near] - np.where(np.isfinite(m), m, np.nanmedian(m))
        rs = ndi.gaussian_filter(resid, spot_sigma_um / px)
        bg = rs[(np.abs(d) > 1.0) & near]
        sd = 1.4826 * np.median(np.abs(bg - np.median(bg))) if bg.size else 0.0
        if not sd > 0:
            return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
        first = peak_local_max(
            rs,
            min_distance=min_px,
            threshold_abs=threshold_sd * sd,
            labels=ok.astype(int),
            exclude_border=False,
        )
        heads = np.zeros(img.shape, bool)
        heads[first[:, 0], first[:, 1]] = True
        heads = ndi.binary_dilation(heads, iterations=max(1, int(round(0.6 / px))))
        exclude = heads[near]
    peaks = first
    if len(peaks) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    ps, pd_ = s[peaks[:, 0], peaks[:, 1]], d[peaks[:, 0], peaks[:, 1]]
    amp = rs[peaks[:, 0], peaks[:, 1]]
    # shaft contrast (centre minus surround) per 1 µm bin, for the relative amplitude
    far_rows = med.index[np.abs(med.index) * 0.5 * px > max_distance_um + 1.0]
    contrast = (med.loc[0] if 0 in med.index else med.max()) - med.loc[far_rows].median()
    c_peak = contrast.reindex(np.floor(ps).astype(int)).to_numpy(float)
    out = pd.DataFrame(
        {
            "y_px": peaks[:, 0].astype(float),
            "x_px": peaks[:, 1].astype(float),
            "s_um": ps,
            "side": np.sign(pd_).astype(int),
            "distance_um": np.abs(pd_),
            "amplitude": amp,
            "snr": amp / sd,
            "shaft_ratio": amp / np.where(c_peak > 0, c_peak, np.nan),
        }
    )
    out = out[~(out["shaft_ratio"] < min_shaft_ratio)]
    # two maxima of one object (a head with two bumps, a head and its neck) are not separated
    # by a dip: of such a pair, only the brighter is kept
    out = out.sort_values("amplitude", ascending=False).reset_index(drop=True)
    yx = out[["y_px", "x_px"]].to_numpy()
    s_pk, d_pk, side_pk = (out[c].to_numpy() for c in ("s_um", "distance_um", "side"))
    keep: list[int] = []
    for i in range(len(out)):
        merged = False
        for j in keep:
            dist = np.hypot(*(yx[i] - yx[j])) * px
            # a fainter maximum between the shaft and a brighter head, mostly radial from
            # it and joined to it by a ridge, is that spine's neck
            neck = (
                side_pk[i] == side_pk[j]
                and d_pk[j] - d_pk[i] >= abs(s_pk[j] - s_pk[i])
                and dist <= max_distance_um
            )
            if dist >= merge_um and not neck:
                continue
            ratio = saddle_ratio if dist < merge_um else neck_saddle_ratio
            frac = np.linspace(0, 1, max(16, int(2 * dist / px)))[:, None]
            line = np.round(yx[i] * (1 - frac) + yx[j] * frac).astype(int)
            if rs[line[:, 0], line[:, 1]].min() > ratio * out.at[i, "amplitude"]:
                merged = True
                break
        if not merged:
            keep.append(i)
    return out.loc[keep].sort_values("s_um").reset_index(drop=True)
