"""Voxel-wise cell-density maps and group tests with family-wise error control.

Cells in atlas space become a density map per mouse (cells/mm³, Gaussian or
spherical kernel); two groups of maps are compared voxel by voxel with a
two-sample t statistic, and the family-wise error over the whole brain mask is
controlled by permuting group labels and keeping, per permutation, the
maximum of a cluster statistic: threshold-free cluster enhancement (TFCE,
Smith & Nichols 2009) or cluster mass (Bullmore et al. 1999). Arrays are
(z, y, x) in the atlas orientation. See ``docs/statistics.md`` for the
measured family-wise error rate.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage

from ketamap.errors import InputError, ParameterError, StatsError
from ketamap.params import bounds, validate

__all__ = [
    "VoxelParams",
    "VoxelTest",
    "atlas_grid",
    "atlas_points_um",
    "density_map",
    "group_maps",
    "voxel_test",
    "tfce",
    "CLUSTER_COLUMNS",
]

logger = logging.getLogger(__name__)

CLUSTER_COLUMNS = (
    "cluster", "sign", "n_voxels", "volume_mm3", "statistic", "peak_t", "peak_z_vox",
    "peak_y_vox", "peak_x_vox", "p_fwe",
)  # fmt: skip
_CONNECTIVITY = {6: 1, 18: 2, 26: 3}
_BATCH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class VoxelParams:
    """Parameters of the voxel-wise density maps and tests.

    Attributes
    ----------
    enabled : bool
        Compute voxel maps in the stats stage.
    resolution_um : float
        Voxel size of the density maps (isotropic); the atlas is resampled to
        this grid by block averaging (a multiple of the atlas voxel size is
        used, rounded to the nearest integer factor).
    radius_um : float
        Kernel radius: the Gaussian's standard deviation, or the sphere's radius.
    kernel : {"gaussian", "sphere"}
        Smoothing kernel of :func:`density_map`.
    method : {"tfce", "cluster_mass"}
        Cluster statistic whose permutation maximum controls the family-wise error.
    n_permutations : int
        Label permutations; when the two groups have fewer distinct
        relabellings than this, all of them are enumerated (an exact test).
    cluster_forming_p : float
        Two-sided voxel p-value that sets the cluster-forming threshold of
        ``cluster_mass``.
    tfce_steps : int
        Threshold steps of TFCE (step = maximum |t| / ``tfce_steps``).
    connectivity : {6, 18, 26}
        Neighbourhood of a voxel when forming clusters.
    log_offset_per_mm3 : float
        Maps are compared as ``log(density + offset)``, so that a fold change
        weighs the same in dense and sparse regions.
    alpha : float
        Family-wise error level at which voxels and clusters are called.
    seed : int
        Seed of the random permutations.
    """

    enabled: bool = field(default=True, metadata=bounds(doc="compute voxel maps"))
    resolution_um: float = field(default=100.0, metadata=bounds(gt=0, doc="map voxel size"))
    radius_um: float = field(default=250.0, metadata=bounds(gt=0, doc="kernel radius"))
    kernel: str = field(
        default="gaussian", metadata=bounds(choices=("gaussian", "sphere"), doc="kernel")
    )
    method: str = field(
        default="cluster_mass",
        metadata=bounds(choices=("tfce", "cluster_mass"), doc="FWE statistic"),
    )
    n_permutations: int = field(default=200, metadata=bounds(ge=1, doc="label permutations"))
    cluster_forming_p: float = field(
        default=0.01, metadata=bounds(gt=0, lt=1, doc="cluster-forming voxel p")
    )
    tfce_steps: int = field(default=25, metadata=bounds(ge=2, doc="TFCE threshold steps"))
    connectivity: int = field(default=26, metadata=bounds(choices=(6, 18, 26), doc="neighbours"))
    log_offset_per_mm3: float = field(default=1.0, metadata=bounds(gt=0, doc="log offset"))
    alpha: float = field(default=0.05, metadata=bounds(gt=0, lt=1, doc="FWE level"))
    seed: int = field(default=0, metadata=bounds(ge=0, doc="permutation seed"))

    def __post_init__(self):
        validate(self)


class VoxelTest(NamedTuple):
    """Result of :func:`voxel_test` (unpacks as ``t, p_fwe, clusters, ...``)."""

    t: np.ndarray
    """Two-sample t per voxel (group b minus group a), float32, 0 outside the mask."""
    p_fwe: np.ndarray
    """Family-wise corrected p per voxel, float32, 1 outside the mask."""
    clusters: pd.DataFrame
    """One row per cluster; columns :data:`CLUSTER_COLUMNS`."""
    n_permutations: int
    """Relabellings used (the observed labelling included)."""
    exact: bool
    """True when every distinct relabelling was enumerated."""


def _as_tuple3(value, name: str) -> tuple[float, float, float]:
    arr = np.broadcast_to(np.asarray(value, dtype=float), (3,))
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ParameterError(f"{name} must be three positive numbers (z, y, x), got {value!r}.")
    return tuple(float(v) for v in arr)


def atlas_grid(
    annotation: np.ndarray,
    atlas_resolution_um: float | tuple[float, float, float],
    resolution_um: float,
) -> tuple[tuple[int, int, int], tuple[float, float, float], np.ndarray]:
    """Build the coarse grid of the density maps: block factor, voxel size, brain mask.

    Parameters
    ----------
    annotation : ndarray of int, shape (z, y, x)
        Atlas labels; 0 is outside the brain.
    atlas_resolution_um : float or tuple of 3 float
        Atlas voxel size.
    resolution_um : float
        Wanted map voxel size; each axis uses the nearest whole multiple of
        the atlas voxel (at least 1).

    Returns
    -------
    factor : tuple of 3 int
        Atlas voxels per map voxel along each axis.
    voxel_size_um : tuple of 3 float
        Map voxel size.
    mask : ndarray of bool
        Map voxels at least half inside the brain; shape ``ceil(shape / factor)``.

    Examples
    --------
    >>> f, v, m = atlas_grid(np.ones((5, 4, 4), int), 50.0, 100.0)
    >>> f, v, m.shape
    ((2, 2, 2), (100.0, 100.0, 100.0), (3, 2, 2))
    """
    res = _as_tuple3(atlas_resolution_um, "atlas_resolution_um")
    factor = tuple(max(1, int(round(resolution_um / r))) for r in res)
    inside = np.asarray(annotation) > 0
    pad = [(0, (-n) % f) for n, f in zip(inside.shape, factor, strict=True)]
    padded = np.pad(inside, pad).astype(np.float32)
    shape = [n // f for n, f in zip(padded.shape, factor, strict=True)]
    blocks = padded.reshape(shape[0], factor[0], shape[1], factor[1], shape[2], factor[2])
    mask = blocks.mean(axis=(1, 3, 5)) >= 0.5
    return factor, tuple(r * f for r, f in zip(res, factor, strict=True)), mask


def atlas_points_um(
    points_atlas_vox: ArrayLike,
    atlas_resolution_um: float | tuple[float, float, float],
    factor: tuple[int, int, int],
) -> np.ndarray:
    """Atlas voxel coordinates to µm on the grid of :func:`atlas_grid`.

    Map voxel ``i`` covers atlas voxels ``i * f ... i * f + f - 1``; the
    returned positions put its centre at ``i * f * resolution``, as
    :func:`density_map` expects.

    Parameters
    ----------
    points_atlas_vox : array_like, shape (n, 3)
        Cell positions (z, y, x) in atlas voxels.
    atlas_resolution_um : float or tuple of 3 float
        Atlas voxel size.
    factor : tuple of 3 int
        Block factor from :func:`atlas_grid`.

    Returns
    -------
    ndarray of float64, shape (n, 3)
    """
    res = np.asarray(_as_tuple3(atlas_resolution_um, "atlas_resolution_um"))
    f = np.asarray(factor, dtype=float)
    pts = np.asarray(points_atlas_vox, dtype=float).reshape(-1, 3)
    return (pts - (f - 1) / 2) * res


def density_map(
    points_um: ArrayLike,
    shape: tuple[int, int, int],
    *,
    voxel_size_um: float | tuple[float, float, float],
    radius_um: float,
    kernel: str = "gaussian",
    weights: ArrayLike | None = None,
) -> np.ndarray:
    """Cell density on a regular grid, in cells/mm³ (or weight per mm³).

    Parameters
    ----------
    points_um : array_like, shape (n, 3)
        Cell positions (z, y, x) in µm in the grid's space; voxel ``i`` is
        centred at ``i * voxel_size_um``. Points outside the grid are dropped.
    shape : tuple of 3 int
        Grid shape (z, y, x).
    voxel_size_um : float or tuple of 3 float
        Grid voxel size.
    radius_um : float
        Gaussian standard deviation, or sphere radius, in µm; 0: no smoothing
        (each voxel's own sum divided by its volume).
    kernel : {"gaussian", "sphere"}
        ``"gaussian"``: counts smoothed by a normalised Gaussian;
        ``"sphere"``: cells within ``radius_um`` divided by the sphere's volume.
    weights : array_like, shape (n,), optional
        What each point stands for (e.g. the fibre length in mm of a skeleton
        voxel, for a length density in mm/mm³); default 1 (cells).

    Returns
    -------
    ndarray of float32, shape ``shape``
        Cells (or weight) per mm³. Its sum times the voxel volume (mm³) equals
        the number of cells (summed weight) inside the grid, less what the
        kernel spreads past the edge.

    Raises
    ------
    InputError
        If ``points_um`` is not an (n, 3) array of finite numbers, or
        ``weights`` is not one finite number per point.
    ParameterError
        If ``shape``, ``voxel_size_um``, ``radius_um`` or ``kernel`` is invalid.

    Examples
    --------
    >>> d = density_map([[500.0, 500.0, 500.0]], (11, 11, 11), voxel_size_um=100,
    ...                 radius_um=100)
    >>> round(float(d.sum()) * 0.1**3, 3)   # one cell
    1.0
    """
    pts = np.asarray(points_um, dtype=float)
    if pts.size == 0:
        pts = np.zeros((0, 3))
    elif pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points_um must have shape (n, 3), got {pts.shape}.")
    if not np.all(np.isfinite(pts)):
        raise InputError("points_um holds NaN or infinite coordinates.")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ParameterError(f"shape must be three positive ints (z, y, x), got {shape!r}.")
    shape = tuple(int(s) for s in shape)
    vox = _as_tuple3(voxel_size_um, "voxel_size_um")
    if not (isinstance(radius_um, (int, float)) and radius_um >= 0):
        raise ParameterError(f"radius_um must be a number >= 0, got {radius_um!r}.")
    if kernel not in ("gaussian", "sphere"):
        raise ParameterError(f'kernel must be "gaussian" or "sphere", got {kernel!r}.')
    if weights is None:
        w = np.ones(len(pts))
    else:
        w = np.asarray(weights, dtype=float).ravel()
        if w.shape != (len(pts),) or not np.all(np.isfinite(w)):
            raise InputError(
                f"weights must be one finite number per point ({len(pts)}), got "
                f"{np.shape(weights)}."
            )
    idx = np.rint(pts / np.asarray(vox)).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    counts = np.zeros(shape, np.float32)
    if inside.any():  # sum per voxel (bincount over the voxels hit: no dense temporary)
        flat = np.ravel_multi_index(tuple(idx[inside].T), shape)
        hit, inverse = np.unique(flat, return_inverse=True)
        counts.ravel()[hit] = np.bincount(inverse, weights=w[inside], minlength=len(hit))
    voxel_mm3 = float(np.prod(vox)) * 1e-9
    if radius_um == 0:
        return (counts / voxel_mm3).astype(np.float32)
    if kernel == "gaussian":
        sigma = [radius_um / v for v in vox]
        out = ndimage.gaussian_filter(counts, sigma, mode="constant", truncate=4.0)
        return (out / voxel_mm3).astype(np.float32)
    reach = [int(math.floor(radius_um / v)) for v in vox]
    grids = np.meshgrid(
        *[np.arange(-r, r + 1) * v for r, v in zip(reach, vox, strict=True)], indexing="ij"
    )
    ball = (sum(g**2 for g in grids) <= radius_um**2).astype(np.float32)
    out = ndimage.convolve(counts, ball, mode="constant", cval=0.0)
    return (out / (ball.sum() * voxel_mm3)).astype(np.float32)


def group_maps(maps: ArrayLike, groups) -> dict[str, np.ndarray]:
    """Mean map per group.

    Parameters
    ----------
    maps : array_like, shape (n_subjects, z, y, x)
        One map per subject.
    groups : sequence of str, length n_subjects
        Group of each subject.

    Returns
    -------
    dict of str to ndarray of float32, shape (z, y, x)
        Mean per group, in the order groups first appear.

    Raises
    ------
    InputError
        If the number of maps and of group labels differ.
    """
    arr = np.asarray(maps)
    labels = [str(g) for g in groups]
    if arr.ndim != 4 or arr.shape[0] != len(labels):
        raise InputError(
            f"group_maps needs one (z, y, x) map per group label, got maps of shape "
            f"{arr.shape} and {len(labels)} labels."
        )
    out = {}
    for g in dict.fromkeys(labels):
        sel = np.array([lab == g for lab in labels])
        out[g] = arr[sel].mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


def tfce(
    stat: np.ndarray,
    *,
    steps: int = 25,
    extent_exponent: float = 0.5,
    height_exponent: float = 2.0,
    connectivity: int = 26,
) -> np.ndarray:
    """Threshold-free cluster enhancement of a signed statistic map.

    Positive and negative values are enhanced separately (the result keeps
    the sign). Each sign's range ``(0, max]`` is cut in ``steps`` equal steps.

    Parameters
    ----------
    stat : ndarray, shape (z, y, x)
        Statistic map (e.g. t); zero outside the brain.
    steps : int
        Threshold steps per sign.
    extent_exponent, height_exponent : float
        E and H of Smith & Nichols (defaults 0.5 and 2 as in FSL).
    connectivity : {6, 18, 26}
        Voxel neighbourhood.

    Returns
    -------
    ndarray of float32
        Same shape as ``stat``; extent is counted in voxels.

    References
    ----------
    Smith SM, Nichols TE (2009). Threshold-free cluster enhancement.
    NeuroImage 44:83-98. doi:10.1016/j.neuroimage.2008.03.061

    Examples
    --------
    >>> s = np.zeros((5, 5, 5)); s[2, 2, 2] = 2.0
    >>> float(tfce(s, steps=2)[2, 2, 2])   # (1**2 + 2**2) * 1 * 1
    5.0
    """
    if connectivity not in _CONNECTIVITY:
        raise ParameterError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])
    stat = np.asarray(stat, dtype=np.float32)
    out = np.zeros(stat.shape, np.float32)
    for sign in (1.0, -1.0):
        v = stat * sign
        top = float(v.max(initial=0.0))
        if top <= 0:
            continue
        dh = top / steps
        where = np.nonzero(v > 0)
        if not where[0].size:
            continue
        lo = [int(w.min()) for w in where]
        hi = [int(w.max()) + 1 for w in where]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        vb = v[box]
        acc = np.zeros(vb.shape, np.float64)
        for k in range(1, steps + 1):
            h = dh * k
            supra = vb >= h - 1e-6 * dh
            lab, n = ndimage.label(supra, structure)
            if n == 0:
                break
            sizes = np.bincount(lab.ravel()).astype(np.float64)
            sizes[0] = 0.0
            acc += (sizes**extent_exponent * (h**height_exponent) * dh)[lab]
        out[box] += np.float32(sign) * acc.astype(np.float32)
    return out


def _t_rows(x: np.ndarray, member_b: np.ndarray) -> np.ndarray:
    """Pooled-variance t (b minus a) for each row of a 0/1 membership matrix."""
    n = x.shape[0]
    nb = member_b.sum(axis=1, keepdims=True).astype(np.float64)
    na = n - nb
    tot, tot2 = x.sum(axis=0), (x * x).sum(axis=0)
    sb = member_b @ x
    sb2 = member_b @ (x * x)
    sa, sa2 = tot - sb, tot2 - sb2
    mb, ma = sb / nb, sa / na
    ss = (sb2 - nb * mb**2) + (sa2 - na * ma**2)
    var = np.maximum(ss, 0.0) / (n - 2) * (1.0 / na + 1.0 / nb)
    scale = np.maximum(np.abs(mb), np.abs(ma))
    ok = var > (1e-12 * np.maximum(scale, 1e-30)) ** 2
    t = np.where(ok, (mb - ma) / np.sqrt(np.where(ok, var, 1.0)), 0.0)
    return t.astype(np.float32)


def _clusters(stat: np.ndarray, threshold: float, structure) -> list[tuple]:
    """Supra-threshold clusters per sign as (sign, label image, count) triples."""
    out = []
    for sign in (1.0, -1.0):
        lab, n = ndimage.label(stat * sign > threshold, structure)
        out.append((sign, lab, n))
    return out


def _cluster_mass_max(t: np.ndarray, threshold: float, structure) -> float:
    best = 0.0
    for _sign, lab, n in _clusters(t, threshold, structure):
        if n:
            mass = np.bincount(lab.ravel(), weights=np.abs(t).ravel())[1:]
            best = max(best, float(mass.max()))
    return best


def voxel_test(
    maps_a: ArrayLike,
    maps_b: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    params: VoxelParams = VoxelParams(),  # noqa: B008 - frozen, immutable default
    voxel_size_um: float | tuple[float, float, float] | None = None,
) -> VoxelTest:
    """Voxel-wise two-sample t test with family-wise error control by permutation.

    Parameters
    ----------
    maps_a, maps_b : array_like, shape (n_a, z, y, x) and (n_b, z, y, x)
        Maps of the two groups (e.g. log densities); ``a`` is the reference.
    mask : array_like of bool, shape (z, y, x), optional
        Voxels tested (the brain); default: voxels not constant across maps.
    params : VoxelParams
        ``method`` (``"tfce"``: voxel p from the maximum |TFCE| over the brain;
        ``"cluster_mass"``: clusters of ``|t| > t_c``, two-sided
        ``cluster_forming_p``, p from the maximum cluster mass, the sum of |t|),
        ``n_permutations`` (random relabellings, the observed one included; when the
        groups have at most this many distinct relabellings, all are enumerated),
        ``tfce_steps``, ``connectivity``, ``alpha`` (the FWE level at which clusters
        are reported) and ``seed``; the map fields are not used here.
    voxel_size_um : float or tuple of 3 float, optional
        Gives the clusters' ``volume_mm3`` (NaN without it).
    seed : int
        Seed of the random relabellings.

    Returns
    -------
    VoxelTest
        ``t`` (b minus a, float32), ``p_fwe`` (float32), ``clusters`` (one
        row per cluster: supra-threshold clusters for ``cluster_mass``,
        connected voxels with ``p_fwe < alpha`` for ``tfce``), the number of
        relabellings and whether the test is exact.

    Raises
    ------
    InputError
        If the maps' shapes differ, the mask does not match, or it is empty.
    StatsError
        If a group has fewer than 2 maps.
    ParameterError
        For an unknown method or an invalid count.

    Notes
    -----
    The statistic is the pooled-variance t, exchangeable under the null of
    identical group distributions, so the permutation test is exact up to the
    Monte-Carlo error of random relabellings. A voxel's p is
    ``(1 + #{max_perm >= stat}) / (1 + n_random)`` for random relabellings and
    ``#{max >= stat} / n_all`` when all are enumerated.

    References
    ----------
    Nichols TE, Holmes AP (2002). Hum Brain Mapp 15:1-25. doi:10.1002/hbm.1058
    Smith SM, Nichols TE (2009). NeuroImage 44:83-98.
    doi:10.1016/j.neuroimage.2008.03.061

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(4, 6, 6, 6)), rng.normal(size=(4, 6, 6, 6))
    >>> b[:, 1:5, 1:5, 1:5] += 4.0
    >>> res = voxel_test(a, b, params=VoxelParams(method="tfce", n_permutations=100))
    >>> bool(res.p_fwe[3, 3, 3] < 0.05), res.exact, res.n_permutations
    (True, True, 70)
    """
    a = np.asarray(maps_a, dtype=np.float32)
    b = np.asarray(maps_b, dtype=np.float32)
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise InputError(
            f"maps_a and maps_b must be stacks of (z, y, x) maps of one shape, got "
            f"{a.shape} and {b.shape}."
        )
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise StatsError(
            f"A voxel test needs at least 2 maps per group, got {a.shape[0]} and {b.shape[0]}."
        )
    if not isinstance(params, VoxelParams):
        raise ParameterError(f"params must be a VoxelParams, got {type(params).__name__}.")
    method, n_permutations, seed = params.method, params.n_permutations, params.seed
    connectivity, cluster_forming_p = params.connectivity, params.cluster_forming_p
    tfce_steps, alpha = params.tfce_steps, params.alpha
    shape = a.shape[1:]
    x_all = np.concatenate([a, b])
    if mask is None:
        m = np.any(x_all != x_all[:1], axis=0)
    else:
        m = np.asarray(mask, dtype=bool)
        if m.shape != shape:
            raise InputError(f"mask has shape {m.shape}, the maps {shape}.")
    if not m.any():
        raise InputError("The voxel mask is empty: there is nothing to test.")
    where = np.nonzero(m)
    box = tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)
    mb = m[box]
    x = x_all[(slice(None),) + box][:, mb].astype(np.float64)
    n, na = x.shape[0], a.shape[0]
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity])
    from scipy import stats as sstats  # here: the maps (density_map) do not need it

    t_crit = float(sstats.t.ppf(1 - cluster_forming_p / 2, n - 2))

    n_distinct = math.comb(n, na)
    exact = n_distinct <= int(n_permutations)
    observed = np.zeros(n, np.float64)
    observed[na:] = 1.0
    if exact:
        members = np.zeros((n_distinct, n), np.float64)
        for i, combo in enumerate(itertools.combinations(range(n), n - na)):
            members[i, list(combo)] = 1.0
        # put the observed labelling first
        obs_i = int(np.flatnonzero((members == observed).all(axis=1))[0])
        members[[0, obs_i]] = members[[obs_i, 0]]
    else:
        rng = np.random.default_rng(seed)
        members = np.zeros((int(n_permutations), n), np.float64)
        members[0] = observed
        for i in range(1, int(n_permutations)):
            members[i, rng.permutation(n)[na:]] = 1.0

    def to_volume(row: np.ndarray) -> np.ndarray:
        vol = np.zeros(mb.shape, np.float32)
        vol[mb] = row
        return vol

    def enhanced(vol: np.ndarray) -> np.ndarray:
        return tfce(vol, steps=tfce_steps, connectivity=connectivity)

    batch = max(1, _BATCH_BYTES // max(1, 8 * x.shape[1]))
    maxima = np.zeros(len(members), np.float64)
    t_obs = stat_obs = None
    for start in range(0, len(members), batch):
        rows = _t_rows(x, members[start : start + batch])
        for j, row in enumerate(rows):
            vol = to_volume(row)
            if method == "tfce":
                e = enhanced(vol)
                maxima[start + j] = float(np.abs(e).max(initial=0.0))
                if start + j == 0:
                    t_obs, stat_obs = vol, e
            else:
                maxima[start + j] = _cluster_mass_max(vol, t_crit, structure)
                if start + j == 0:
                    t_obs = vol
    null = np.sort(maxima if exact else maxima[1:])

    def p_of(values: np.ndarray) -> np.ndarray:
        ge = len(null) - np.searchsorted(null, values * (1 - 1e-6), side="left")
        if exact:
            return ge / len(null)
        return (1.0 + ge) / (1.0 + len(null))

    p_box = np.ones(mb.shape, np.float64)
    vox_mm3 = (
        float(np.prod(_as_tuple3(voxel_size_um, "voxel_size_um"))) * 1e-9
        if voxel_size_um is not None
        else float("nan")
    )
    frames = []
    offset = np.array([s.start for s in box])
    if method == "tfce":
        p_box[mb] = p_of(np.abs(stat_obs[mb]))
        for sign in (1.0, -1.0):
            lab, k = ndimage.label((p_box < alpha) & (stat_obs * sign > 0), structure)
            if k:
                stat_sum = np.bincount(lab.ravel(), weights=np.abs(stat_obs).ravel())[1:]
                p_min = ndimage.minimum(p_box, lab, np.arange(1, k + 1))
                frames.append(_cluster_table(lab, k, sign, stat_sum, p_min, t_obs, offset, vox_mm3))
    else:
        for sign, lab, k in _clusters(t_obs, t_crit, structure):
            if not k:
                continue
            mass = np.bincount(lab.ravel(), weights=np.abs(t_obs).ravel())[1:]
            p_cl = p_of(mass)
            inside = lab > 0
            p_box[inside] = np.minimum(p_box[inside], p_cl[lab[inside] - 1])
            frames.append(_cluster_table(lab, k, sign, mass, p_cl, t_obs, offset, vox_mm3))
    clusters = pd.concat(frames, ignore_index=True) if frames else _empty_clusters()
    if len(clusters):
        clusters = clusters.sort_values(["p_fwe", "statistic"], ascending=[True, False])
        clusters["cluster"] = np.arange(1, len(clusters) + 1)
    clusters = clusters.astype({"cluster": np.int64, "n_voxels": np.int64}).reset_index(drop=True)
    t_full = np.zeros(shape, np.float32)
    t_full[box] = t_obs
    p_full = np.ones(shape, np.float32)
    p_full[box] = p_box.astype(np.float32)
    p_full[~m] = 1.0
    logger.info(
        "voxel test (%s): %d voxels, %d relabellings%s, %d clusters",
        method, int(m.sum()), len(members), " (exact)" if exact else "", len(clusters),
    )  # fmt: skip
    return VoxelTest(t_full, p_full, clusters, len(members), exact)


def _empty_clusters() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float) for c in CLUSTER_COLUMNS}).assign(
        sign=pd.Series(dtype=object)
    )


def _cluster_table(lab, k, sign, statistic, p, t_obs, offset, vox_mm3) -> pd.DataFrame:
    """One row per labelled cluster, peaks found with one pass per statistic."""
    index = np.arange(1, k + 1)
    n_vox = np.bincount(lab.ravel(), minlength=k + 1)[1:]
    peaks = np.asarray(ndimage.maximum_position(t_obs * sign, lab, index), dtype=np.int64)
    peaks = peaks.reshape(-1, 3)
    return pd.DataFrame(
        {
            "cluster": index,
            "sign": "increase" if sign > 0 else "decrease",
            "n_voxels": n_vox.astype(np.int64),
            "volume_mm3": n_vox * vox_mm3,
            "statistic": np.asarray(statistic, float),
            "peak_t": t_obs[tuple(peaks.T)].astype(float),
            "peak_z_vox": peaks[:, 0] + offset[0],
            "peak_y_vox": peaks[:, 1] + offset[1],
            "peak_x_vox": peaks[:, 2] + offset[2],
            "p_fwe": np.asarray(p, float),
        }
    )
