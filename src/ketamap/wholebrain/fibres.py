"""Segment labelled axons (e.g. TH+ fibres) in a light-sheet volume and measure their length.

The classical path, chunk by chunk (Dask), in float32:

1. optional subtraction of the autofluorescence channel, scaled by the robust (Tukey)
   slope of signal on background (as for cell detection);
2. **a local noise estimate**, one pass over the volume: it is cut into blocks of about
   ``noise_block_um``; in each, pairs of x-neighbours are split by their sum, and the
   noise SD is the MAD of the differences of the pairs whose sum is at most the
   block's median sum. For Gaussian noise the sum and the difference of a pair are
   independent, so keeping the pairs between fibres does not bias the estimate, and
   the fibres, whose pairs are bright, do not inflate it. Each block then takes the
   largest estimate of its 3 x 3 x 3 neighbourhood: a block across the tissue's edge
   (or between a quiet and a bright region) would otherwise take the quieter side's;
3. **spikes** (hot pixels, cosmic hits) are clamped: no voxel may stand above all six
   face neighbours by more than ``spike_snr`` noise SDs (the microscope blurs every
   real structure over several voxels);
4. **enhancement that respects anisotropic voxels**: a Gaussian matched to the imaged
   fibre, of SD ``smoothing`` x ``s_i`` per axis, where ``s_i = sqrt(psf_i² + v_i²/12 +
   (d/4)²)`` µm is the SD of a fibre's image (PSF, voxel box, fibre diameter ``d``),
   then the Hessian by central differences, *whitened* per axis (``H_ij t_i t_j`` with
   ``t_i`` the total SD of the smoothed fibre in voxels). In whitened coordinates the
   image of a thin line is isotropic whatever its orientation and the light-sheet's
   axial blur, so one response serves fibres along z and in the imaging plane. With
   eigenvalues ``l1 >= l2 >= l3`` the tubeness is ``R = -l2 - |l1|`` if ``l1 < 0``,
   else ``-l2 - l1 / 2``: a bright line (``l1 ~ 0``, ``l2 ~ l3 << 0``) responds with
   its smoothed peak, planes (``l2 ~ 0``) and the centre of blobs (``l1 ~ l2``) do
   not, and a varicosity on a fibre leaves the fibre's own response;
5. **a local, noise-based decision**: ``R`` is divided by the local noise SD times the
   SD of ``R`` for unit white noise (measured once per filter, on a fixed-seed noise
   volume). Voxels above ``threshold_snr`` seed; the voxels connected to a seed through
   voxels above ``hysteresis_snr`` join them. A threshold in noise units does not
   depend on how many fibres a region holds, so one default serves a sparse cortex
   and a dense striatum, where a global percentile cannot (the noise estimate of step
   2 is not raised by the fibres either). ``R`` is computed only where it can pass:
   ``R <= -trace(H) / 2``, and the whitened Laplacian is cheap;
6. the tissue mask (:func:`~ketamap.wholebrain.tissue.find_tissue`) and the somata
   (balls of ``soma_exclusion_diameter_um`` around given soma centres, e.g. the cells
   of :func:`~ketamap.wholebrain.detect.detect_cells`) are excluded;
7. **skeleton**: 3D thinning (:func:`skimage.morphology.skeletonize`) of the detected
   voxels; pieces of skeleton shorter than ``min_length_um`` are dropped (what is left
   of a hot pixel or a noise speck);
8. **mask**: every skeleton voxel moves onto the ridge it stands for (Newton steps of
   the logarithm of the smoothed image across the fibre: the image of a line is a
   Gaussian across it, whose logarithm is a quadratic that central differences fit
   exactly), the points are joined along the skeleton, and the seeds that are ridge
   voxels themselves (their ridge point lies within them) are added, so that two
   fibres the thinning merged keep their own; the mask is every voxel within
   ``mask_radius_vox`` voxels of that centreline (ellipsoidal distance, the voxel size
   as the unit on each axis): the imaged axon's footprint rounded to the grid.

Every step is local, so the volume is processed in chunks with an overlap that covers
the filter, the thinning, the short pieces and the centreline; each chunk writes only
its core, so nothing is counted twice at chunk borders. (The hysteresis follows a path
only within a chunk and its overlap, and the thinning sees the detection only there: a
dim stretch whose seeds all lie beyond the overlap, or a skeleton near a chunk's face,
can differ between chunkings; measured: total length within 0.25 % under three
chunkings.)

**Length** (:func:`skeleton_lengths`): the skeleton's voxels are joined to their 26
neighbours (an edge that short-cuts two shorter edges through a third skeleton voxel is
dropped: a digital curve's corners would otherwise be counted twice), the voxel
centres (µm, with the voxel size) are smoothed along the curve (``length_smoothing``
passes of averaging each voxel that has two neighbours with them: removes the
staircase of the digital curve, which overestimates a straight line's length by up to
8 % in the plane and 20 % across anisotropic voxels), and every edge's length is
shared by its two ends. Summed per region by :func:`fibre_length_table`.

Arrays are (z, y, x); physical sizes are in micrometres.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import sparse

from ketamap.errors import InputError, ParameterError
from ketamap.io.volumes import check_volume, lazy_array
from ketamap.params import bounds, validate
from ketamap.space import check_voxel_size

__all__ = [
    "FibreParams",
    "segment_fibres",
    "skeleton_lengths",
    "fibre_length_table",
    "write_fibre_outputs",
    "labels_on_sample_grid",
    "FIBRE_MASK_FILE",
    "SKELETON_FILE",
]

log = logging.getLogger(__name__)

FIBRE_MASK_FILE = "fibre_mask.ome.zarr"
SKELETON_FILE = "skeleton.ome.zarr"

_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 SDs
_NULL_SHAPE = (48, 96, 96)  # white-noise volume that calibrates the response's noise SD
_NULL_SEED = 20240611
_SKELETON_MARGIN = 2  # voxels of context the thinning needs around the region it keeps
_MIN_NOISE_PAIRS = 16  # a noise block needs this many selected pairs, else its neighbours'
_HALF = 0.5
_MIDPOINTS = (0.25, 0.5, 0.75)  # points added along each skeleton edge for the mask
_REGION_PAD = 2  # voxels of the smoothed image kept around the region
_SUM_VOXELS = 2**18  # voxels summed per region at once (bounds the temporaries)
_SLAB_ROWS = 8  # chunk rows (along z) computed at once when results are stored or summed
# the 13 "forward" neighbour offsets of the 26-neighbourhood
_FORWARD = np.array([o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0)])


@dataclass(frozen=True)
class FibreParams:
    """Parameters of :func:`segment_fibres`.

    Parameters
    ----------
    psf_sigma_um : tuple of float
        Blur of the microscope per axis (z, y, x), as a Gaussian SD in µm (the
        light-sheet's axial blur in z). Sets, with the voxel size and the fibre
        diameter, the width of a fibre's image that the filter is matched to.
    fibre_diameter_um : float
        Typical fibre diameter (µm); adds ``(d / 4)²`` to the image's variance per axis
        (small beside the PSF for 0.5-2 µm axons).
    smoothing : float
        SD of the smoothing Gaussian as a multiple of the fibre image's SD, per axis
        (1: the matched filter).
    threshold_snr : float
        Seed threshold on the tubeness, in units of its local noise SD (the block's
        noise SD times the response's SD for unit white noise).
    hysteresis_snr : float
        Lower threshold (same units) for voxels connected to a seed.
    noise_block_um : float
        Edge of the blocks over which the noise SD is estimated (µm).
    min_length_um : float
        Pieces of skeleton shorter than this are dropped (hot pixels, noise specks);
        0 keeps all.
    spike_snr : float
        A voxel is lowered to at most the largest of its six face neighbours plus this
        many noise SDs before filtering (hot pixels, cosmic hits); 0 disables.
    mask_radius_vox : float
        The mask holds the voxels within this many voxels of the found centreline
        (ellipsoidal distance, the voxel size as the unit on each axis).
    length_smoothing : int
        Passes of averaging the skeleton's voxel positions along the curve before
        their length is summed (0: the raw digital curve).
    soma_exclusion_diameter_um : float
        Diameter (µm) of the ball removed around every given soma centre.
    tissue_mask : bool
        Find the tissue on a coarse grid (from the background channel when given) and
        drop fibres outside it.
    tissue_block_um : float
        Block size of the coarse tissue mask (µm).
    chunk_size_vox : tuple of int
        Core size (z, y, x) of the chunks processed at once (voxels).
    """

    psf_sigma_um: tuple[float, float, float] = field(
        default=(3.0, 1.0, 1.0),
        metadata=bounds(ge=0, le=100, doc="Blur of the microscope (z, y, x), Gaussian SD in µm."),
    )
    fibre_diameter_um: float = field(
        default=1.0, metadata=bounds(gt=0, le=50, doc="Typical fibre diameter (µm).")
    )
    smoothing: float = field(
        default=1.0,
        metadata=bounds(gt=0, le=5, doc="Smoothing SD as a multiple of the fibre image's SD."),
    )
    threshold_snr: float = field(
        default=3.0, metadata=bounds(gt=0, doc="Seed threshold in local noise SDs.")
    )
    hysteresis_snr: float = field(
        default=1.5, metadata=bounds(gt=0, doc="Growth threshold in local noise SDs.")
    )
    noise_block_um: float = field(
        default=50.0, metadata=bounds(gt=0, doc="Block size of the noise estimate (µm).")
    )
    min_length_um: float = field(
        default=6.0, metadata=bounds(ge=0, le=200, doc="Shortest piece of skeleton kept (µm).")
    )
    spike_snr: float = field(
        default=5.0,
        metadata=bounds(ge=0, doc="Spike clamp: excess over the 6 neighbours, in noise SDs."),
    )
    mask_radius_vox: float = field(
        default=1.0,
        metadata=bounds(gt=0, le=5, doc="Mask radius around the centreline (voxels)."),
    )
    length_smoothing: int = field(
        default=2, metadata=bounds(ge=0, le=20, doc="Smoothing passes before length.")
    )
    soma_exclusion_diameter_um: float = field(
        default=20.0, metadata=bounds(ge=0, doc="Ball removed around each soma (µm).")
    )
    tissue_mask: bool = field(
        default=True, metadata=bounds(doc="Drop fibres outside the tissue (the void).")
    )
    tissue_block_um: float = field(
        default=50.0, metadata=bounds(gt=0, doc="Block size of the coarse tissue mask (µm).")
    )
    chunk_size_vox: tuple[int, int, int] = field(
        default=(64, 384, 384),
        metadata=bounds(ge=1, doc="Core chunk size (z, y, x) processed at once (voxels)."),
    )

    def __post_init__(self):
        validate(self)
        if self.hysteresis_snr > self.threshold_snr:
            raise ParameterError(
                f"FibreParams.hysteresis_snr ({self.hysteresis_snr}) must not exceed "
                f"threshold_snr ({self.threshold_snr})."
            )


@dataclass(frozen=True)
class _Plan:
    """Filter sizes in voxels and the calibration of the response."""

    sigma_vox: tuple[float, float, float]  # smoothing Gaussian
    radius_vox: tuple[int, int, int]  # its kernel radius
    scale: tuple[float, float, float]  # whitening: total SD of the smoothed fibre (voxels)
    null_sd: float  # SD of the tubeness for unit white noise
    noise_block: tuple[int, int, int]  # voxels per noise block (x even)
    margin: tuple[int, int, int]  # context around the core whose mask and skeleton are final
    depth: tuple[int, int, int]  # overlap of the chunks
    min_shape: tuple[int, int, int]  # thinnest volume the filter can work on


def _image_sigma_um(vs, params: FibreParams) -> np.ndarray:
    return np.sqrt(
        np.asarray(params.psf_sigma_um) ** 2
        + np.asarray(vs) ** 2 / 12.0
        + (params.fibre_diameter_um / 4.0) ** 2
    )


def _plan(vs: tuple[float, float, float], params: FibreParams) -> _Plan:
    vs_a = np.asarray(vs, dtype=float)
    img = _image_sigma_um(vs_a, params)
    sig_um = params.smoothing * img
    sigma_vox = tuple(float(s) for s in sig_um / vs_a)
    radius = tuple(int(_TRUNCATE * s + 0.5) for s in sigma_vox)
    scale = tuple(float(s) for s in np.sqrt(img**2 + sig_um**2) / vs_a)
    block = [max(2, int(round(params.noise_block_um / v))) for v in vs_a]
    block[2] += block[2] % 2
    reach = [int(math.ceil(params.mask_radius_vox))] * 3
    comp = [int(math.ceil(params.min_length_um / v)) for v in vs_a]
    # what the final mask and skeleton of the core need around it: the centreline's reach,
    # its smoothing along the curve, whole short pieces, the thinning's context, the growth
    margin = tuple(
        r + params.length_smoothing + 1 + c + _SKELETON_MARGIN for r, c in zip(reach, comp)
    )
    # ... and the smoothed image on the margin and two voxels around it (the ridge steps)
    depth = tuple(m + g + _REGION_PAD for m, g in zip(margin, radius))
    return _Plan(
        sigma_vox=sigma_vox,
        radius_vox=radius,
        scale=scale,
        null_sd=_null_sd(sigma_vox, radius, scale),
        noise_block=tuple(block),
        margin=margin,
        depth=depth,
        min_shape=tuple(2 * r + 3 for r in radius),
    )


@functools.lru_cache(maxsize=32)
def _null_sd(sigma_vox, radius, scale) -> float:
    """SD of the tubeness of unit white noise, for this filter (a fixed-seed simulation)."""
    rng = np.random.default_rng(_NULL_SEED)
    x = rng.standard_normal(_NULL_SHAPE).astype(np.float32)
    g = ndi.gaussian_filter(x, sigma_vox, mode="reflect", radius=radius)
    inner = tuple(slice(r + 2, n - r - 2) for r, n in zip(radius, g.shape))
    pos = np.argwhere(np.ones(g[inner].shape, dtype=bool)) + [s.start for s in inner]
    hessian, _ = _derivatives(g, pos, scale)
    return float(np.std(_tubeness(*_eigenvalues(hessian))))


# ---------------------------------------------------------------------------- the filter
def _derivatives(g: np.ndarray, pos: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """Whitened Hessian (n, 6: zz, yy, xx, zy, zx, yx) and gradient (n, 3) at voxels ``pos``.

    Central differences of ``g``; at the array's faces the missing neighbour is the
    face voxel itself (scipy's "reflect"), as the Gaussian filter treats the faces.
    """
    n = np.asarray(g.shape)
    pos = np.asarray(pos, dtype=np.int64).reshape(-1, 3)

    def at(offset) -> np.ndarray:
        q = pos + offset
        q = np.where(q < 0, -q - 1, q)
        q = np.where(q >= n, 2 * n - q - 1, q)
        return g[q[:, 0], q[:, 1], q[:, 2]].astype(np.float64)

    return _differences(at, len(pos), scale)


def _differences(at, count: int, scale) -> tuple[np.ndarray, np.ndarray]:
    """Whitened Hessian (n, 6) and gradient (n, 3) from ``at(offset)`` (values, n)."""
    e = np.eye(3, dtype=np.int64)
    c = at(np.zeros(3, dtype=np.int64))
    plus = [at(e[a]) for a in range(3)]
    minus = [at(-e[a]) for a in range(3)]
    s = np.asarray(scale, dtype=np.float64)
    hessian = np.empty((count, 6))
    grad = np.empty((count, 3))
    for a in range(3):
        hessian[:, a] = (plus[a] + minus[a] - 2.0 * c) * s[a] * s[a]
        grad[:, a] = (plus[a] - minus[a]) * 0.5 * s[a]
    for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        cross = at(e[a] + e[b]) - at(e[a] - e[b]) - at(e[b] - e[a]) + at(-e[a] - e[b])
        hessian[:, 3 + k] = cross * 0.25 * s[a] * s[b]
    return hessian, grad


def _log_derivatives(reg, pos: np.ndarray, scale, level: np.ndarray):
    """Whitened Hessian and gradient of ``ln(g - level)`` at voxels ``pos`` of a region.

    The image of a thin line is a Gaussian across it, so its logarithm is a quadratic,
    whose central differences are exact: the Newton step on the logarithm finds the
    ridge of a sampled line to a small fraction of a voxel, where the step on ``g``
    itself is biased by the sampling (by up to a third of a voxel at these scales).
    Values are floored at 5 % of the centre's (above the level).
    """
    idx = reg.index(pos)
    top = reg.values(idx, (0, 0, 0)) - level
    floor = np.maximum(0.05 * top, 1e-6)

    def at(offset) -> np.ndarray:
        return np.log(np.maximum(reg.values(idx, offset) - level, floor))

    return _differences(at, len(idx), scale)


def _eigenvalues(h: np.ndarray):
    """Eigenvalues l1 >= l2 >= l3 of symmetric 3 x 3 matrices (closed form, float64)."""
    a11, a22, a33, a12, a13, a23 = (h[:, k] for k in range(6))
    q = (a11 + a22 + a33) / 3.0
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p1 = a12 * a12 + a13 * a13 + a23 * a23
    p = np.sqrt((b11 * b11 + b22 * b22 + b33 * b33 + 2.0 * p1) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    det = (
        b11 * (b22 * b33 - a23 * a23)
        - a12 * (a12 * b33 - a23 * a13)
        + a13 * (a12 * a23 - b22 * a13)
    )
    phi = np.arccos(np.clip(det / (2.0 * safe**3), -1.0, 1.0)) / 3.0
    l1 = q + 2.0 * p * np.cos(phi)
    l3 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return l1, 3.0 * q - l1 - l3, l3


def _tubeness(l1, l2, l3) -> np.ndarray:
    """-l2 less a penalty for curvature along the line (|l1| if negative, l1 / 2 if not).

    The penalty keeps ``R <= -trace / 2``, which the candidate test relies on.
    """
    return -l2 - np.where(l1 < 0, -l1, _HALF * l1)


def _ridge_offsets(hessian: np.ndarray, grad: np.ndarray, scale) -> np.ndarray:
    """Newton step (voxels, each axis clipped to +-1) to the ridge, across the fibre.

    The fibre's direction is the eigenvector of the largest eigenvalue; in the plane
    across it, the step follows the directions of negative curvature only (closed
    forms: no per-matrix LAPACK call).
    """
    h = hessian
    l1, _, _ = _eigenvalues(h)
    a11, a22, a33, a12, a13, a23 = (h[:, k] for k in range(6))
    r0 = np.stack([a11 - l1, a12, a13], axis=1)
    r1 = np.stack([a12, a22 - l1, a23], axis=1)
    r2 = np.stack([a13, a23, a33 - l1], axis=1)
    cands = [np.cross(r0, r1), np.cross(r0, r2), np.cross(r1, r2)]
    norms = np.stack([np.einsum("ij,ij->i", c, c) for c in cands], axis=1)
    best = np.argmax(norms, axis=1)
    e1 = np.choose(best[:, None], cands)
    size = np.sqrt(norms.max(axis=1))
    degenerate = size <= 1e-12 * np.maximum(np.abs(h).max(axis=1), 1e-300)
    e1 = np.where(degenerate[:, None], [1.0, 0.0, 0.0], e1 / np.where(size > 0, size, 1.0)[:, None])
    # a basis (u, v) of the plane across the fibre
    helper = np.where((np.abs(e1[:, 0]) < 0.9)[:, None], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    u = np.cross(e1, helper)
    u /= np.linalg.norm(u, axis=1)[:, None]
    v = np.cross(e1, u)

    def quad(p, q):  # p^T H q
        return (
            p[:, 0] * (a11 * q[:, 0] + a12 * q[:, 1] + a13 * q[:, 2])
            + p[:, 1] * (a12 * q[:, 0] + a22 * q[:, 1] + a23 * q[:, 2])
            + p[:, 2] * (a13 * q[:, 0] + a23 * q[:, 1] + a33 * q[:, 2])
        )

    muu, muv, mvv = quad(u, u), quad(u, v), quad(v, v)
    gu, gv = np.einsum("ij,ij->i", u, grad), np.einsum("ij,ij->i", v, grad)
    # 2 x 2 eigen-decomposition: eigenvector (cos t, sin t) in the (u, v) basis
    half = 0.5 * (muu - mvv)
    root = np.sqrt(half * half + muv * muv)
    theta = 0.5 * np.arctan2(muv, half)
    step = np.zeros((len(h), 3))
    for lam, c, s_ in (
        (0.5 * (muu + mvv) + root, np.cos(theta), np.sin(theta)),
        (0.5 * (muu + mvv) - root, -np.sin(theta), np.cos(theta)),
    ):
        ok = lam < 0
        coef = np.zeros(len(h))
        coef[ok] = -(c[ok] * gu[ok] + s_[ok] * gv[ok]) / lam[ok]
        step += coef[:, None] * (c[:, None] * u + s_[:, None] * v)
    return np.clip(step * np.asarray(scale), -1.0, 1.0)


def _ridge(reg, pos: np.ndarray, plan: _Plan, level_grid: np.ndarray, start, steps: int = 2):
    """Sub-voxel ridge points (region voxels) of the region voxels ``pos``: Newton steps.

    A second step starts from the voxel nearest the first step's point (kept within
    one voxel of the region). ``start`` is the region's first voxel in the volume.
    """
    cells = [
        np.clip((pos[:, a] + start[a]) // plan.noise_block[a], 0, level_grid.shape[a] - 1)
        for a in range(3)
    ]
    level = level_grid[tuple(cells)].astype(np.float64)
    point = pos.astype(np.float64)
    at = pos
    for _ in range(steps):
        hessian, grad = _log_derivatives(reg, at, plan.scale, level)
        point = at + _ridge_offsets(hessian, grad, plan.scale)
        nxt = np.clip(np.rint(point).astype(np.int64), -1, np.asarray(reg.shape))
        if (nxt == at).all():
            break
        at = nxt
    return point


# ---------------------------------------------------------------------------- noise grid
def _block_noise(x: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    """Robust noise SD and level of every block of ``x`` (a chunk on the block grid).

    Pairs of x-neighbours (0, 1), (2, 3) ... on every other plane and row (blocks of at
    least 4 voxels on those axes); the noise SD is 1.4826 x the MAD of the differences of
    the pairs whose sum is at most the block's median sum, divided by sqrt(2); the level
    is half that median sum. Returns an array (2, *grid); NaN where a block has fewer
    than 16 such pairs.
    """
    grid = tuple(-(-n // b) for n, b in zip(x.shape, block))
    sz = 2 if block[0] >= 4 else 1
    sy = 2 if block[1] >= 4 else 1
    bz, by, bx = -(-block[0] // sz), -(-block[1] // sy), block[2] // 2
    v = x[::sz, ::sy, :]
    # pad every axis to whole blocks (NaN), pairs along x inside each block
    shape = (grid[0] * bz, grid[1] * by, grid[2] * block[2])
    full = np.full(shape, np.nan, dtype=np.float32)
    full[: v.shape[0], : v.shape[1], : v.shape[2]] = v
    full = full.reshape(grid[0], bz, grid[1], by, grid[2] * bx, 2)
    total = full.sum(axis=-1)
    diff = full[..., 0] - full[..., 1]
    del full

    def per_block(a: np.ndarray) -> np.ndarray:  # (gz, gy, gx, m): the block's pairs
        return (
            a.reshape(grid[0], bz, grid[1], by, grid[2], bx)
            .transpose(0, 2, 4, 1, 3, 5)
            .reshape(*grid, -1)
        )

    total, diff = per_block(total), per_block(diff)
    middle = _nan_median(total)
    diff = np.where(total <= middle[..., None], diff, np.nan)
    centre = _nan_median(diff)
    mad = _nan_median(np.abs(diff - centre[..., None]))
    enough = np.sum(np.isfinite(diff), axis=-1) >= _MIN_NOISE_PAIRS
    out = np.full((2, *grid), np.nan, dtype=np.float32)
    out[0][enough] = (1.4826 / math.sqrt(2.0)) * mad[enough]
    out[1][enough] = 0.5 * middle[enough]
    return out


def _nan_median(a: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN (the lower middle value; NaN if none)."""
    n = np.sum(np.isfinite(a), axis=-1)
    srt = np.sort(np.where(np.isfinite(a), a, np.inf), axis=-1)
    k = np.maximum((n - 1) // 2, 0)
    med = np.take_along_axis(srt, k[..., None], axis=-1)[..., 0]
    return np.where(n > 0, med, np.nan)


def _fill_noise(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise SD and level grids, NaN blocks filled from the nearest estimated block.

    A volume without any estimate gets noise 1 and level 0; the noise is kept above
    1e-3 of its median (a block of constant voxels has none).
    """
    noise, level = stats[0], stats[1]
    bad = ~np.isfinite(noise)
    if bad.all():
        return np.ones_like(noise), np.zeros_like(level)
    if bad.any():
        _, idx = ndi.distance_transform_edt(bad, return_indices=True)
        noise, level = noise[tuple(idx)], level[tuple(idx)]
    positive = noise[noise > 0]
    floor = float(np.median(positive)) * 1e-3 if positive.size else 1.0
    # a block that straddles two kinds of tissue (or tissue and the void) gets the noisier
    # of its neighbours: its darker half is the quieter kind, which would set its noise
    noise = ndi.maximum_filter(np.maximum(noise, floor), size=3, mode="nearest")
    return noise.astype(np.float32), level.astype(np.float32)


def _axis_chunks(n: int, size: int, depth: int, grid: int) -> tuple[int, ...]:
    """Chunks along one axis: multiples of ``grid`` (but the last), each >= ``depth``."""
    size = max(size, depth, grid)
    size = -(-size // grid) * grid
    count = max(1, -(-n // size))
    bounds_ = [min(n, i * size) for i in range(count)] + [n]
    chunks = [b - a for a, b in zip(bounds_[:-1], bounds_[1:]) if b > a]
    if len(chunks) > 1 and chunks[-1] < depth:  # a thin remainder joins its neighbour
        chunks[-2] += chunks.pop()
    return tuple(chunks)


# ---------------------------------------------------------------------------- skeleton graph
def _inside(pts: np.ndarray, lo, hi) -> np.ndarray:
    """Whether each point (n, 3) lies in the box lo <= p < hi (per axis)."""
    ok = (pts[:, 0] >= lo[0]) & (pts[:, 0] < hi[0])
    ok &= (pts[:, 1] >= lo[1]) & (pts[:, 1] < hi[1])
    ok &= (pts[:, 2] >= lo[2]) & (pts[:, 2] < hi[2])
    return ok


class _PointIndex:
    """Which of the voxels ``pts`` (int, (n, 3)) sits at a voxel: a dense map, -1 elsewhere.

    The map covers the box of ``shape`` and one voxel around it, so that the 26
    neighbours of any voxel of the box can be looked up without bounds tests.
    """

    def __init__(self, pts: np.ndarray, shape):
        pshape = tuple(int(n) + 2 for n in shape)
        self.strides = np.array([pshape[1] * pshape[2], pshape[2], 1], dtype=np.int64)
        self.flat = (np.asarray(pts, dtype=np.int64) + 1) @ self.strides
        self.map = np.full(math.prod(pshape), -1, dtype=np.int32)
        self.map[self.flat] = np.arange(len(self.flat), dtype=np.int32)

    def at(self, offset, which=None) -> np.ndarray:
        """Index of the point at each point (or ``which`` of them) moved by ``offset``."""
        flat = self.flat if which is None else self.flat[which]
        return self.map[flat + int(np.dot(offset, self.strides))]


def _edges(pts: np.ndarray, shape) -> np.ndarray:
    """Edges (i, j) between 26-neighbouring voxels ``pts``, without short-cut edges.

    An edge whose offset has several non-zero components is dropped when a skeleton
    voxel sits at one of its proper sub-offsets (the path through it is made of
    shorter edges).
    """
    if len(pts) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    index = _PointIndex(pts, shape)
    out = []
    for o in _FORWARD:
        j = index.at(o)
        i = np.flatnonzero(j >= 0)
        if len(i) == 0:
            continue
        keep = np.ones(len(i), dtype=bool)
        nz = np.flatnonzero(o)
        for r in range(1, len(nz)):
            for sub in itertools.combinations(nz, r):
                so = np.zeros(3, dtype=np.int64)
                so[list(sub)] = o[list(sub)]
                keep &= index.at(so, i) < 0
        out.append(np.stack([i[keep], j[i[keep]]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _adjacency(n: int, edges: np.ndarray) -> sparse.csr_matrix:
    e = np.concatenate([edges, edges[:, ::-1]]) if len(edges) else np.zeros((0, 2), int)
    return sparse.csr_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))


def _smooth(pos: np.ndarray, adj: sparse.csr_matrix, passes: int) -> np.ndarray:
    """Average each voxel of exactly two neighbours with them, ``passes`` times."""
    if passes == 0 or adj.nnz == 0:
        return pos
    deg = np.asarray(adj.sum(axis=1)).ravel()
    move = deg == 2
    out = pos.copy()
    for _ in range(passes):
        mean = (adj @ out) / np.maximum(deg, 1)[:, None]
        out[move] = 0.5 * out[move] + 0.5 * mean[move]
    return out


def _point_lengths(pos_um: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Half the length of every edge at each of its ends (µm)."""
    out = np.zeros(len(pos_um))
    if len(edges):
        half = 0.5 * np.linalg.norm(pos_um[edges[:, 0]] - pos_um[edges[:, 1]], axis=1)
        np.add.at(out, edges[:, 0], half)
        np.add.at(out, edges[:, 1], half)
    return out


def _graph(pts: np.ndarray, shape, vs, passes: int):
    """Edges, smoothed positions (µm), adjacency of skeleton voxels."""
    edges = _edges(pts, shape)
    adj = _adjacency(len(pts), edges)
    pos = _smooth(pts * np.asarray(vs, dtype=float), adj, passes)
    return edges, pos, adj


# ---------------------------------------------------------------------------- one chunk
def _as_float(block, background, scale: float, *, pad_lo, origin) -> np.ndarray:
    """``block - scale x background`` in float32; NaN or inf raise one sentence."""
    if background is not None:
        x = np.multiply(background, np.float32(-scale), dtype=np.float32)
        np.add(x, block, out=x, casting="unsafe")
    else:
        x = np.asarray(block).astype(np.float32, copy=True)
    floats = any(
        a is not None and np.issubdtype(np.asarray(a).dtype, np.floating)
        for a in (block, background)
    )
    if floats and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        where = tuple(int(o - p + i) for o, p, i in zip(origin, pad_lo, bad))
        raise InputError(
            f"The volume holds NaN or infinite values (first at voxel (z, y, x) = {where}); "
            "replace them before fibre segmentation."
        )
    return x


def _components(pts: np.ndarray, shape) -> np.ndarray:
    """Connected-component label (26-neighbours) of each voxel of ``pts`` (int, (n, 3))."""
    index = _PointIndex(pts, shape)
    rows, cols = [], []
    for o in _FORWARD:
        j = index.at(o)
        i = np.flatnonzero(j >= 0)
        rows.append(i)
        cols.append(j[i])
    r, c = np.concatenate(rows), np.concatenate(cols)
    adj = sparse.csr_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(pts),) * 2)
    return sparse.csgraph.connected_components(adj, directed=False)[1]


def _clamp_spikes(x: np.ndarray, bound: np.ndarray) -> None:
    """Lower every voxel to at most the largest of its 6 neighbours plus ``bound``, in place.

    A microscope blurs every real structure over several voxels, so a voxel that stands
    above all its face neighbours by many noise SDs is a hot pixel or a cosmic hit.
    """
    top = np.full(x.shape, -np.inf, dtype=np.float32)
    for axis in range(3):
        if x.shape[axis] < 2:
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        np.maximum(top[tuple(lo)], x[tuple(hi)], out=top[tuple(lo)])
        np.maximum(top[tuple(hi)], x[tuple(lo)], out=top[tuple(hi)])
    top += bound
    np.minimum(x, top, out=x)
    del top


def _fill_ellipsoids(mask: np.ndarray, centres: np.ndarray, semi: np.ndarray, value=True) -> None:
    """Set ``mask`` to ``value`` within the ellipsoids (semi-axes in voxels) of centres."""
    if len(centres) == 0:
        return
    centres = np.asarray(centres, dtype=np.float64)
    semi = np.asarray(semi, dtype=np.float64)
    reach = np.floor(semi + 0.5).astype(np.int64)
    base = np.rint(centres).astype(np.int64)
    frac = (base - centres) / semi  # the offset of the centre's voxel, in semi-axes
    dims = np.asarray(mask.shape)
    near = _inside(base, -reach, dims + reach)
    margin = 2 * reach  # around the mask: spares the bounds tests
    base, frac = base[near] + margin, frac[near]
    padded = np.zeros(tuple(dims + 2 * margin), dtype=bool)
    pstr = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.int64)
    flat = base @ pstr
    pf = padded.ravel()
    f0, f1, f2 = (np.ascontiguousarray(frac[:, k]) for k in range(3))
    for off in itertools.product(*(range(-r, r + 1) for r in reach)):
        o = np.asarray(off) / semi
        d2 = (f0 + o[0]) ** 2
        d2 += (f1 + o[1]) ** 2
        d2 += (f2 + o[2]) ** 2
        pf[flat[d2 <= 1.0] + int(np.asarray(off) @ pstr)] = True
    inner = padded[tuple(slice(int(m), int(m + n)) for m, n in zip(margin, dims))]
    mask[inner] = value


class _Region:
    """The smoothed image on a region and two voxels around it, for flat-index stencils.

    Every per-voxel array of the region (response bounds, noise, states) is kept on the
    same padded grid, so one flat index addresses them all.
    """

    def __init__(self, g: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        shape = np.asarray(g.shape)
        p = _REGION_PAD
        a, b = np.maximum(lo - p, 0), np.minimum(hi + p, shape)
        view = g[tuple(slice(int(i), int(j)) for i, j in zip(a, b))]
        pad = [(int(i - (lo[k] - p)), int((hi[k] + p) - j)) for k, (i, j) in enumerate(zip(a, b))]
        # a face of the block repeats its voxel (scipy's "reflect" for the first layer)
        padded = np.pad(view, pad, mode="edge") if any(map(any, pad)) else view
        self.flat = np.ascontiguousarray(padded).ravel()
        self.pshape = padded.shape
        self.shape = tuple(int(n) for n in hi - lo)
        self.strides = np.array([self.pshape[1] * self.pshape[2], self.pshape[2], 1], np.int64)
        self.inner = (slice(p, -p),) * 3

    def padded_full(self, value, dtype) -> np.ndarray:
        """Return a new array on the padded grid, filled with ``value``."""
        return np.full(self.pshape, value, dtype=dtype)

    def index(self, pts: np.ndarray) -> np.ndarray:
        """Flat indices of region voxels (up to one voxel outside the region allowed)."""
        q = np.clip(np.asarray(pts, dtype=np.int64), -1, np.asarray(self.shape))
        return (q + _REGION_PAD) @ self.strides

    def coords(self, idx: np.ndarray) -> np.ndarray:
        """Region voxel coordinates (n, 3) of flat indices."""
        return np.stack(np.unravel_index(idx, self.pshape), axis=1) - _REGION_PAD

    def values(self, idx: np.ndarray, offset) -> np.ndarray:
        """Return the image at flat indices ``idx`` (from :meth:`index`) moved by ``offset``."""
        return self.flat[idx + int(np.dot(offset, self.strides))].astype(np.float64)

    def trace(self, scale) -> np.ndarray:
        """Whitened Laplacian (central differences) on the padded grid (inf off the region)."""
        g = self.flat.reshape(self.pshape)
        out = self.padded_full(np.inf, np.float32)
        core = out[self.inner]
        p = _REGION_PAD
        centre = g[self.inner]
        s2 = np.asarray(scale, dtype=np.float32) ** 2
        np.multiply(centre, np.float32(-2.0 * s2.sum()), out=core)
        tmp = np.empty_like(core)
        for axis in range(3):
            for step in (-1, 1):
                sl = [slice(p, -p)] * 3
                sl[axis] = slice(p + step, g.shape[axis] - p + step)
                np.multiply(g[tuple(sl)], s2[axis], out=tmp)
                core += tmp
        return out

    def tubeness(self, idx: np.ndarray, scale) -> np.ndarray:
        """Tubeness at flat indices ``idx``."""
        hessian = _differences(lambda o: self.values(idx, o), len(idx), scale)[0]
        return _tubeness(*_eigenvalues(hessian))


_NEIGHBOURS = np.array([o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)])


def _hysteresis(reg: _Region, trace, sd, seeds: np.ndarray, params: FibreParams, scale):
    """Grow the seeds through 26-neighbours whose response passes ``hysteresis_snr``.

    All arrays and indices are on the region's padded grid: ``trace`` is the whitened
    Laplacian in units of the response's local noise SD ``sd`` (inf off the region), and
    the response is evaluated lazily, only at neighbours of accepted voxels whose
    Laplacian allows it (``R <= -trace / 2``). Returns the flat indices of the accepted
    voxels, the seeds first.
    """
    offsets = _NEIGHBOURS @ reg.strides
    tflat, dflat = trace.ravel(), sd.ravel()
    seen = np.zeros(len(tflat), dtype=bool)
    last = np.empty(len(tflat), dtype=np.int32)  # de-duplicates a step's neighbours
    # voxels within one voxel of the padded grid's faces are never looked at (inf trace)
    bound = np.float32(-2.0 * params.hysteresis_snr)
    frontier = np.asarray(seeds, dtype=np.int64)
    seen[frontier] = True
    found = [frontier]
    while len(frontier):
        nb = (frontier[:, None] + offsets[None, :]).ravel()
        nb = nb[~seen[nb]]
        if len(nb) == 0:
            break
        order = np.arange(len(nb), dtype=np.int32)
        last[nb] = order
        nb = nb[last[nb] == order]
        seen[nb] = True
        nb = nb[tflat[nb] <= bound]
        if len(nb) == 0:
            break
        frontier = nb[reg.tubeness(nb, scale) >= params.hysteresis_snr * dflat[nb]]
        found.append(frontier)
    return np.concatenate(found)


def _segment_block(
    block,
    background,
    *,
    plan: _Plan,
    params: FibreParams,
    vs,
    bg_scale: float,
    noise_grid: np.ndarray,
    level_grid: np.ndarray,
    tissue,
    somata: np.ndarray,
    pad_lo,
    core_shape,
    origin,
) -> np.ndarray:
    """Mask (bit 0) and skeleton (bit 1) of one chunk's core, as uint8."""
    x = _as_float(block, background, bg_scale, pad_lo=pad_lo, origin=origin)
    out = np.zeros(core_shape, dtype=np.uint8)
    shape = np.asarray(x.shape)
    start = np.asarray(origin) - np.asarray(pad_lo)  # global index of the block's voxel 0
    # the region whose detection is final: the core and the margin, within the block
    lo = np.maximum(np.asarray(pad_lo) - plan.margin, 0)
    hi = np.minimum(np.asarray(pad_lo) + core_shape + np.asarray(plan.margin), shape)
    region = tuple(int(n) for n in hi - lo)
    box = tuple(slice(int(a + st), int(b + st)) for a, b, st in zip(lo, hi, start))
    in_tissue = None
    if tissue is not None:
        cells = tuple(slice(b.start // k, -(-b.stop // k)) for b, k in zip(box, tissue.block_vox))
        coarse = tissue.mask[cells]
        if not coarse.any():
            return out
        if not coarse.all():  # only a region that crosses the tissue's edge is masked
            in_tissue = tissue.full_resolution(box)
    if params.spike_snr > 0:
        block_cells = [
            np.clip((np.arange(n) + st) // k, 0, m - 1)
            for n, st, k, m in zip(shape, start, plan.noise_block, noise_grid.shape)
        ]
        bound = noise_grid[np.ix_(*block_cells)]
        bound *= np.float32(params.spike_snr)
        _clamp_spikes(x, bound)
        del bound
    g = ndi.gaussian_filter(x, plan.sigma_vox, mode="reflect", radius=plan.radius_vox)
    del x
    reg = _Region(g, lo, hi)
    del g
    trace = reg.trace(plan.scale)  # padded grid
    # the response's local noise SD: the block's noise SD (nearest block) x the filter's
    cells = [
        np.clip((np.arange(a, b) + st) // k, 0, n - 1)
        for a, b, st, k, n in zip(lo, hi, start, plan.noise_block, noise_grid.shape)
    ]
    sd = reg.padded_full(1.0, np.float32)
    np.multiply(noise_grid[np.ix_(*cells)], np.float32(plan.null_sd), out=sd[reg.inner])
    core_trace = trace[reg.inner]
    core_trace /= sd[reg.inner]  # in units of the response's local noise SD
    barrier = None if in_tissue is None else ~in_tissue
    if len(somata):  # no fibre within the exclusion ball of a soma
        ball = np.full(3, 0.5 * params.soma_exclusion_diameter_um) / np.asarray(vs)
        if barrier is None:
            barrier = np.zeros(region, dtype=bool)
        _fill_ellipsoids(barrier, somata - (start + lo), ball)
    if barrier is not None:  # the void and the somata are never fibre
        core_trace[barrier] = np.inf
        del barrier
    # seeds: R <= -trace / 2, so only -trace >= 2 x threshold can pass
    cand = np.flatnonzero(trace.ravel() <= np.float32(-2.0 * params.threshold_snr))
    if len(cand) == 0:
        return out
    seeds = cand[reg.tubeness(cand, plan.scale) >= params.threshold_snr * sd.ravel()[cand]]
    del cand
    if len(seeds) == 0:
        return out
    flat = _hysteresis(reg, trace, sd, seeds, params, plan.scale)
    del trace, sd
    pts = reg.coords(flat)
    detected = np.zeros(region, dtype=bool)
    detected[tuple(pts.T)] = True
    from skimage.morphology import skeletonize

    spts = np.argwhere(skeletonize(detected))
    del detected
    if len(spts) == 0:
        return out
    edges, pos_um, adj = _graph(spts, region, vs, params.length_smoothing)
    strong = pts[: len(seeds)]  # the seeds come first (region coordinates)
    if params.min_length_um > 0:  # whole pieces of skeleton shorter than min_length_um go
        n_sk, sk_comp = sparse.csgraph.connected_components(adj, directed=False)
        length = np.bincount(sk_comp, weights=_point_lengths(pos_um, edges), minlength=n_sk)
        ok = length[sk_comp] >= params.min_length_um
        if not ok.all():
            spts = spts[ok]
            if len(spts) == 0:
                return out
            edges, _, _ = _graph(spts, region, vs, params.length_smoothing)
            # and the seeds of detected pieces whose skeleton went with them
            comp = _components(pts, region)
            index = _PointIndex(pts, region)
            at = index.map[(spts + 1) @ index.strides]
            alive = np.zeros(comp.max() + 1, dtype=bool)
            alive[comp[at[at >= 0]]] = True
            strong = strong[alive[comp[: len(seeds)]]]
    # the centreline: the skeleton's voxels moved onto their ridge and joined along the
    # skeleton, and the seeds that are ridge voxels (their ridge point lies within them),
    # so that fibres the thinning merged keep their own
    ridge = _ridge(reg, spts, plan, level_grid, start + lo)
    pieces = [ridge]
    if len(edges):
        t = np.array(_MIDPOINTS)
        a, b = ridge[edges[:, 0]], ridge[edges[:, 1]]
        pieces.append((a[:, None, :] + t[None, :, None] * (b - a)[:, None, :]).reshape(-1, 3))
    if len(strong):
        points = _ridge(reg, strong, plan, level_grid, start + lo, steps=1)
        pieces.append(points[(np.abs(points - strong) <= 0.5).all(axis=1)])
    del reg
    mask = np.zeros(region, dtype=bool)
    _fill_ellipsoids(mask, np.concatenate(pieces), np.full(3, params.mask_radius_vox))
    if len(somata):
        _fill_ellipsoids(mask, somata - (start + lo), ball, False)
    if in_tissue is not None:
        mask &= in_tissue
    core = tuple(slice(int(p - a), int(p - a + c)) for p, a, c in zip(pad_lo, lo, core_shape))
    out[mask[core]] = 1
    first = np.array([c.start for c in core])
    in_core = _inside(spts, first, first + np.asarray(core_shape))
    out[tuple((spts[in_core] - first).T)] |= 2
    return out


# ---------------------------------------------------------------------------- public API
def _as_dask(array, name: str) -> da.Array:
    arr = check_volume(array, name)
    if isinstance(arr, np.ndarray):
        arr = lazy_array(arr, chunks=arr.shape)
    return arr


def _somata_vox(somata) -> np.ndarray:
    if somata is None:
        return np.zeros((0, 3))
    if isinstance(somata, pd.DataFrame):
        missing = [c for c in ("z_vox", "y_vox", "x_vox") if c not in somata]
        if missing:
            raise InputError(
                f"somata must have the columns z_vox, y_vox, x_vox (a cells table); "
                f"{', '.join(missing)} missing."
            )
        pts = somata[["z_vox", "y_vox", "x_vox"]].to_numpy(dtype=float)
    else:
        try:
            pts = np.asarray(somata, dtype=float)
        except (TypeError, ValueError):
            pts = np.zeros((1, 1))
        if pts.size == 0:
            pts = pts.reshape(0, 3)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.isfinite(pts).all():
        raise InputError(
            "somata must be a cells table or an (n, 3) array of finite (z, y, x) voxel "
            f"coordinates, got shape {pts.shape}."
        )
    return pts


def segment_fibres(
    signal,
    *,
    voxel_size_um,
    params: FibreParams = FibreParams(),  # noqa: B008 - frozen, immutable default
    background=None,
    tissue=None,
    somata=None,
):
    """Segment fibres in a 3D volume: the fibre mask, its skeleton and a QC record.

    Parameters
    ----------
    signal : array_like or dask.array.Array, shape (z, y, x)
        The fibre channel (integer or float; computed in float32).
    voxel_size_um : tuple of float
        Voxel size (z, y, x) in µm.
    params : FibreParams
    background : array_like or dask.array.Array, optional
        Autofluorescence channel on the same grid, subtracted after scaling by the
        robust slope of signal on background.
    tissue : TissueMask, optional
        From :func:`~ketamap.wholebrain.tissue.find_tissue` (e.g. the detect stage's
        mask); computed here when None and ``params.tissue_mask``.
    somata : DataFrame or array of shape (n, 3), optional
        Soma centres (``z_vox, y_vox, x_vox``, e.g. the cells of
        :func:`~ketamap.wholebrain.detect.detect_cells`): a ball of
        ``soma_exclusion_diameter_um`` around each is not fibre.

    Returns
    -------
    mask, skeleton : numpy.ndarray or dask.array.Array of uint8, shape (z, y, x)
        1 where a voxel is fibre / on the skeleton. NumPy in, NumPy out (computed);
        a Dask input gives lazy Dask arrays that share one computation: compute or
        store them together (:func:`write_fibre_outputs`, ``dask.compute(mask,
        skeleton)``), or the segmentation runs twice.
    qc : dict
        ``background_scale``, the noise SD (``noise_sd_median``, ``noise_sd_p10``,
        ``noise_sd_p90`` over the noise blocks, input units), ``response_null_sd``,
        the filter (``sigma_vox``, ``scale_vox``), ``overlap_vox``, ``chunks``, the
        tissue numbers and ``tissue`` (the :class:`TissueMask` or None); for a NumPy
        input also ``n_fibre_voxels``, ``n_skeleton_voxels`` and ``length_um`` (see
        :func:`skeleton_lengths`).

    Raises
    ------
    ParameterError
        If ``voxel_size_um`` or ``params`` is invalid.
    InputError
        If a volume is not 3D and numeric, holds NaN or infinite values, is thinner
        than the filter, or ``background`` / ``tissue`` cover another shape.
    """
    vs = check_voxel_size(voxel_size_um)
    if not isinstance(params, FibreParams):
        raise ParameterError(f"params must be a FibreParams, got {type(params).__name__}.")
    eager = not isinstance(signal, da.Array)
    sig = _as_dask(signal, "signal")
    bg = None
    if background is not None:
        bg = _as_dask(background, "background")
        if bg.shape != sig.shape:
            raise InputError(
                f"background has shape {bg.shape} but signal has shape {sig.shape}; "
                "both channels must be on the same grid."
            )
    plan = _plan(vs, params)
    for a, (n, m) in enumerate(zip(sig.shape, plan.min_shape)):
        if n < m:
            raise InputError(
                f"The volume is {n} voxels along {'zyx'[a]} but the fibre filter needs at "
                f"least {m} (its Gaussian of {plan.sigma_vox[a]:.2g} voxels and the "
                "Hessian); give a thicker volume."
            )
    if tissue is not None and tuple(tissue.shape) != tuple(sig.shape):
        raise InputError(
            f"The tissue mask covers shape {tuple(tissue.shape)} but the signal has shape "
            f"{sig.shape}; compute it from this volume."
        )
    somata_vox = _somata_vox(somata)

    from ketamap.wholebrain.detect import _background_scale

    scale = _background_scale(sig, bg) if bg is not None else 0.0
    if tissue is None and params.tissue_mask:
        from ketamap.wholebrain.tissue import find_tissue

        tissue = find_tissue(
            bg if bg is not None else sig, voxel_size_um=vs, block_um=params.tissue_block_um
        )
    # chunks on the noise-block grid, as big as asked, each at least the overlap
    chunks = tuple(
        _axis_chunks(n, c, d, b)
        for n, c, d, b in zip(sig.shape, params.chunk_size_vox, plan.depth, plan.noise_block)
    )
    depth = tuple(0 if len(c) == 1 else d for c, d in zip(chunks, plan.depth))
    x = sig.rechunk(chunks)
    b = bg.rechunk(chunks) if bg is not None else None
    noise_grid, level_grid = _noise_grid(x, b, scale, plan.noise_block)
    log.info(
        "segment_fibres: shape %s, voxel %s µm, smoothing %s vox, overlap %s, %d chunks, "
        "noise SD median %.4g",
        sig.shape,
        vs,
        tuple(round(s, 2) for s in plan.sigma_vox),
        depth,
        math.prod(len(c) for c in chunks),
        float(np.median(noise_grid)),
    )
    overlapped = [
        da.overlap.overlap(v, depth=dict(enumerate(depth)), boundary="none")
        for v in ((x,) if b is None else (x, b))
    ]
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in chunks]

    def run(*blocks, block_id=None):
        key = block_id
        pad_lo = tuple(depth[a] if key[a] > 0 else 0 for a in range(3))
        core_shape = tuple(chunks[a][key[a]] for a in range(3))
        origin = tuple(int(starts[a][key[a]]) for a in range(3))
        return _segment_block(
            blocks[0],
            blocks[1] if len(blocks) > 1 else None,
            plan=plan,
            params=params,
            vs=vs,
            bg_scale=scale,
            noise_grid=noise_grid,
            level_grid=level_grid,
            tissue=tissue,
            somata=somata_vox,
            pad_lo=pad_lo,
            core_shape=core_shape,
            origin=origin,
        )

    packed = da.map_blocks(
        run, *overlapped, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8)
    )
    mask = packed & np.uint8(1)
    skeleton = (packed >> np.uint8(1)) & np.uint8(1)
    qc = _qc(noise_grid, tissue, plan, scale, depth, chunks)
    if eager:
        mask, skeleton = dask.compute(mask, skeleton)
        qc["n_fibre_voxels"] = int(mask.sum())
        qc["n_skeleton_voxels"] = int(skeleton.sum())
        qc["length_um"] = float(
            skeleton_lengths(skeleton, vs, smoothing=params.length_smoothing).sum()
        )
    return mask, skeleton, qc


def _noise_grid(x: da.Array, b: da.Array | None, scale: float, block):
    """Return the noise SD and level grids of ``x - scale b`` (one pass over the volume)."""

    def per_chunk(xb, bb=None):
        v = xb.astype(np.float32)
        if bb is not None:
            v = v - np.float32(scale) * bb.astype(np.float32)
        return _block_noise(v, block)

    out_chunks = ((2,),) + tuple(tuple(-(-c // k) for c in cs) for cs, k in zip(x.chunks, block))
    args = (x,) if b is None else (x, b)
    grid = da.map_blocks(
        per_chunk, *args, chunks=out_chunks, new_axis=0, dtype=np.float32
    ).compute()
    return _fill_noise(np.asarray(grid))


def _qc(noise_grid, tissue, plan: _Plan, scale, depth, chunks) -> dict:
    def num(v):
        return None if v is None or not np.isfinite(v) else float(v)

    values = noise_grid.ravel()
    return {
        "background_scale": float(scale),
        "noise_sd_median": num(np.median(values)),
        "noise_sd_p10": num(np.percentile(values, 10)),
        "noise_sd_p90": num(np.percentile(values, 90)),
        "response_null_sd": plan.null_sd,
        "sigma_vox": list(plan.sigma_vox),
        "scale_vox": list(plan.scale),
        "noise_block_vox": list(plan.noise_block),
        "overlap_vox": list(depth),
        "chunks": [len(c) for c in chunks],
        "tissue_fraction": None if tissue is None else num(tissue.tissue_fraction),
        "tissue": tissue,
    }


def skeleton_lengths(skeleton, voxel_size_um, *, smoothing: int = 2):
    """Return the length (µm) that every skeleton voxel stands for, chunk by chunk.

    See the module docstring: 26-neighbour edges without short-cuts, positions smoothed
    ``smoothing`` times along the curve, each edge's length shared by its ends.

    Parameters
    ----------
    skeleton : array_like or dask.array.Array of int or bool, shape (z, y, x)
        Non-zero on the skeleton.
    voxel_size_um : tuple of float
    smoothing : int
        Passes of averaging along the curve (>= 0).

    Returns
    -------
    numpy.ndarray or dask.array.Array of float32
        0 off the skeleton; NumPy in, NumPy out. Its sum is the total length.

    Examples
    --------
    >>> sk = np.zeros((3, 3, 12), np.uint8)
    >>> sk[1, 1, 1:11] = 1
    >>> float(skeleton_lengths(sk, (4.0, 2.0, 2.0)).sum())
    18.0
    """
    vs = check_voxel_size(voxel_size_um)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, np.integer)) or smoothing < 0:
        raise ParameterError(f"smoothing must be a whole number >= 0, got {smoothing!r}.")
    arr = check_volume(skeleton, "skeleton")
    depth = int(smoothing) + 2

    def block_lengths(block):
        pts = np.argwhere(np.asarray(block) != 0)
        out = np.zeros(block.shape, dtype=np.float32)
        if len(pts):
            edges, pos, _ = _graph(pts, block.shape, vs, int(smoothing))
            out[tuple(pts.T)] = _point_lengths(pos, edges)
        return out

    if isinstance(arr, np.ndarray):
        return block_lengths(arr)
    return arr.map_overlap(
        block_lengths, depth=depth, boundary="none", dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )  # fmt: skip


def _slabs(n_rows: int, per_slab: int = _SLAB_ROWS) -> list[range]:
    """Split ``n_rows`` chunk rows along z into slabs of ``per_slab``, computed in turn.

    Dask's scheduling of an overlapping graph keeps a share of the whole volume alive
    (measured: about a tenth); computing slab by slab bounds memory by the slab, at the
    cost of computing the chunks next to a slab's faces twice.
    """
    return [range(i, min(i + per_slab, n_rows)) for i in range(0, n_rows, per_slab)]


def _region_sums(labels, hemispheres, lengths, mask, intensity) -> pd.DataFrame:
    """Per (label, hemisphere): voxels, fibre voxels, length and fibre intensity sums.

    A few planes at a time, so the temporaries stay small beside the block.
    """
    arrays = [labels, hemispheres, lengths, mask, intensity]
    arrays = [None if a is None else np.asarray(a) for a in arrays]
    n_z = arrays[0].shape[0]
    step = max(1, _SUM_VOXELS // max(1, int(np.prod(arrays[0].shape[1:]))))
    parts = []
    for z0 in range(0, n_z, step):
        lab, hem, length, m, inten = (
            None if a is None else a[z0 : z0 + step].ravel() for a in arrays
        )
        keys, inverse = np.unique(lab.astype(np.int64) * 4 + hem, return_inverse=True)
        n = len(keys)
        fibre = None if m is None else (m != 0)
        part = {
            "key": keys,
            "voxels": np.bincount(inverse, minlength=n).astype(np.float64),
            "length_um": np.bincount(inverse, weights=length, minlength=n),
            "fibre_voxels": np.zeros(n) if fibre is None else np.bincount(
                inverse, weights=fibre, minlength=n
            ),
            "intensity_sum": np.zeros(n) if inten is None or fibre is None else np.bincount(
                inverse, weights=np.where(fibre, inten, 0.0), minlength=n
            ),
        }  # fmt: skip
        parts.append(pd.DataFrame(part))
    return pd.concat(parts, ignore_index=True).groupby("key", as_index=False).sum()


def fibre_length_table(
    skeleton,
    labels,
    hemispheres,
    voxel_size_um,
    ontology,
    *,
    mask=None,
    intensity=None,
    smoothing: int = 2,
) -> pd.DataFrame:
    """Tabulate fibre length, voxel fraction and intensity per region, every level, per side.

    Everything is measured in the sample's own space: ``labels`` and ``hemispheres``
    are the atlas warped onto the volume's grid. Leaf sums per (region, hemisphere) are
    rolled up to every ancestor, as :func:`~ketamap.wholebrain.quantify.count_regions`
    does for cells.

    Parameters
    ----------
    skeleton : array_like or dask.array.Array, shape (z, y, x)
        From :func:`segment_fibres`.
    labels : array_like or dask.array.Array of int, same shape
        Leaf region id of every voxel (0 = outside the brain).
    hemispheres : array_like or dask.array.Array of int, same shape
        1 left, 2 right.
    voxel_size_um : tuple of float
    ontology : Ontology
        The atlas' ontology (for the roll-up and the names).
    mask : array_like or dask.array.Array, optional
        The fibre mask, for the voxel fraction and the intensities.
    intensity : array_like or dask.array.Array, optional
        Intensity of every voxel (e.g. the signal less the scaled background), for the
        fibre intensities; needs ``mask``.
    smoothing : int
        As in :func:`skeleton_lengths` (use the segmentation's ``length_smoothing``).

    Returns
    -------
    DataFrame
        One row per region with volume: ``region_id, acronym, name, level, parent_id``;
        for each side ``_left``, ``_right`` and both (no suffix): ``volume{}_mm3``,
        ``fibre_voxels{}``, ``voxel_fraction{}`` (fibre voxels / voxels: the Allen
        "projection density"), ``length{}_um``, ``length_density{}_mm_per_mm3``,
        ``intensity{}`` (mean intensity of the fibre voxels: the Allen "projection
        intensity") and ``energy{}`` (summed fibre intensity / voxels, = voxel
        fraction x intensity: the Allen "projection energy"). NaN where undefined.

    Raises
    ------
    InputError
        If the volumes have different shapes.
    AtlasError
        If a label is not in the ontology.
    """
    vs = check_voxel_size(voxel_size_um)
    vols = {"skeleton": skeleton, "labels": labels, "hemispheres": hemispheres}
    if mask is not None:
        vols["mask"] = mask
    if intensity is not None:
        if mask is None:
            raise InputError("intensity needs the fibre mask (mask=...) to be averaged over.")
        vols["intensity"] = intensity
    arrs = {k: check_volume(v, k) for k, v in vols.items()}
    shape = tuple(arrs["skeleton"].shape)
    for k, v in arrs.items():
        if tuple(v.shape) != shape:
            raise InputError(
                f"{k} has shape {tuple(v.shape)} but the skeleton has shape {shape}; all "
                "volumes must be on the same grid."
            )
    arrs["lengths"] = skeleton_lengths(arrs.pop("skeleton"), vs, smoothing=smoothing)
    names = ("labels", "hemispheres", "lengths", "mask", "intensity")
    if not any(isinstance(v, da.Array) for v in arrs.values()):
        sums = _region_sums(*(arrs.get(k) for k in names))
    else:  # block by block, on the chunks of the first Dask volume, one slab at a time
        ref = next(v.chunks for v in arrs.values() if isinstance(v, da.Array))
        blocks = {
            k: (v if isinstance(v, da.Array) else lazy_array(np.asarray(v), chunks=ref))
            .rechunk(ref)
            .to_delayed()
            for k, v in arrs.items()
        }
        sums = []
        for rows in _slabs(len(ref[0])):
            parts = [
                dask.delayed(_region_sums)(
                    *(blocks[k][key] if k in blocks else None for k in names)
                )
                for key in np.ndindex(blocks["labels"].shape)
                if key[0] in rows
            ]
            sums.append(pd.concat(dask.compute(*parts), ignore_index=True))
            sums[-1] = sums[-1].groupby("key", as_index=False).sum()
        sums = pd.concat(sums, ignore_index=True).groupby("key", as_index=False).sum()
    return _roll_up(
        sums, vs, ontology, with_mask=mask is not None, with_intensity=intensity is not None
    )


_SIDES = {1: "left", 2: "right"}


def _roll_up(
    sums: pd.DataFrame, vs, ontology, *, with_mask: bool, with_intensity: bool
) -> pd.DataFrame:
    from ketamap.errors import AtlasError

    leaf = sums.assign(region_id=sums["key"] // 4, hemisphere=sums["key"] % 4)
    leaf = leaf[leaf["region_id"] != 0]
    unknown = set(leaf["region_id"].unique().tolist()) - set(ontology.ids.tolist())
    if unknown:
        raise AtlasError(f"Labels not in the atlas ontology: {sorted(unknown)[:10]}.")
    cols = ["voxels", "fibre_voxels", "length_um", "intensity_sum"]
    pairs = ontology.ancestor_pairs().rename(columns={"id": "region_id"})
    rolled = leaf.merge(pairs, on="region_id").groupby(["ancestor_id", "hemisphere"])[cols].sum()
    wide = rolled.unstack("hemisphere", fill_value=0.0)
    voxel_mm3 = float(np.prod(vs)) * 1e-9
    out = pd.DataFrame(index=wide.index.rename("region_id"))
    for side in ("left", "right", None):
        hs = [h for h, s in _SIDES.items() if side in (None, s)]
        suffix = f"_{side}" if side else ""

        def total(col, hs=hs):
            present = [h for h in hs if h in wide[col]]
            return wide[col][present].sum(axis=1) if present else pd.Series(0.0, index=wide.index)

        vox = total("voxels").to_numpy(float)
        fib = total("fibre_voxels").to_numpy(float)
        length = total("length_um").to_numpy(float)
        inten = total("intensity_sum").to_numpy(float)
        vol = vox * voxel_mm3
        out[f"volume{suffix}_mm3"] = vol
        nan = np.full(len(vox), np.nan)
        if with_mask:
            out[f"fibre_voxels{suffix}"] = fib.astype(np.int64)
            out[f"voxel_fraction{suffix}"] = np.divide(fib, vox, out=nan.copy(), where=vox > 0)
        out[f"length{suffix}_um"] = length
        out[f"length_density{suffix}_mm_per_mm3"] = np.divide(
            length * 1e-3, vol, out=nan.copy(), where=vol > 0
        )
        if with_intensity:
            out[f"intensity{suffix}"] = np.divide(inten, fib, out=nan.copy(), where=fib > 0)
            out[f"energy{suffix}"] = np.divide(inten, vox, out=nan.copy(), where=vox > 0)
    out = out.reset_index()
    table = ontology.table.set_index("id")
    ids = out["region_id"].to_numpy()
    out.insert(1, "acronym", table.loc[ids, "acronym"].to_numpy())
    out.insert(2, "name", table.loc[ids, "name"].to_numpy())
    out.insert(3, "level", table.loc[ids, "depth"].to_numpy().astype(np.int64))
    out.insert(4, "parent_id", table.loc[ids, "parent_id"].to_numpy())
    return out.sort_values(["level", "region_id"], kind="stable").reset_index(drop=True)


def labels_on_sample_grid(registration, packed, *, chunks=(64, 384, 384)):
    """Return the region id and hemisphere of every raw sample voxel, lazily.

    Parameters
    ----------
    registration : Registration
        The sample's registration.
    packed : numpy.ndarray of int
        The atlas annotation times 4 plus the hemisphere, warped onto the prepared
        sample grid (:func:`~ketamap.wholebrain.register.warp_labels_to_sample` of
        ``annotation * 4 + hemispheres``, as the register stage computes it for the
        region volumes).
    chunks : tuple of int
        Dask chunks of the result (e.g. those of the skeleton).

    Returns
    -------
    labels, hemispheres : dask.array.Array
        On the raw grid (``registration.sample_shape_vox``): each voxel takes the
        prepared voxel nearest its centre (reorientation and scaling are separable per
        axis, so a block costs one gather). int64 and int8.

    Raises
    ------
    InputError
        If ``packed`` is not on the registration's prepared grid.
    """
    from brainglobe_space import AnatomicalSpace

    from ketamap.wholebrain.transforms import raw_to_prepared_vox

    packed = np.asarray(packed)
    prepared = tuple(int(n) for n in registration.prepared_shape_vox)
    if packed.shape != prepared:
        raise InputError(
            f"The warped labels have shape {packed.shape} but the registration's prepared "
            f"grid is {prepared}; warp the annotation with this registration."
        )
    shape = tuple(int(n) for n in registration.sample_shape_vox)
    probe = AnatomicalSpace(registration.sample_orientation, shape=(2, 3, 4))
    matrix = probe.transformation_matrix_to(
        AnatomicalSpace(registration.atlas_orientation, shape=(2, 3, 4))
    )
    raw_of = np.abs(np.asarray(matrix)[:3, :3]).argmax(axis=1)  # prepared axis i <- raw axis
    perm = [int(np.flatnonzero(raw_of == a)[0]) for a in range(3)]  # raw axis a -> prepared
    index = []
    for a, n in enumerate(shape):  # each raw axis maps onto one prepared axis
        line = np.zeros((n, 3))
        line[:, a] = np.arange(n)
        q = raw_to_prepared_vox(
            line,
            shape_vox=shape,
            voxel_size_um=registration.sample_voxel_size_um,
            orientation=registration.sample_orientation,
            atlas_orientation=registration.atlas_orientation,
            atlas_resolution_um=registration.atlas_resolution_um,
        )
        b = perm[a]
        index.append(np.clip(np.rint(q[:, b]).astype(np.int64), 0, prepared[b] - 1))
    view = np.transpose(packed, perm)  # raw axis order

    def block(block_info=None):
        loc = block_info[None]["array-location"]
        return view[np.ix_(*(ix[a:b] for ix, (a, b) in zip(index, loc)))].astype(np.int64)

    norm = da.core.normalize_chunks(chunks, shape)
    lab = da.map_blocks(block, chunks=norm, dtype=np.int64, meta=np.empty((0, 0, 0), np.int64))
    return lab // 4, (lab % 4).astype(np.int8)


def write_fibre_outputs(mask, skeleton, folder, *, voxel_size_um, chunks=(64, 128, 128)) -> dict:
    """Write ``fibre_mask.ome.zarr`` and ``skeleton.ome.zarr`` into a folder, atomically.

    Both are uint8 (1 = fibre / skeleton) on the input's grid, written chunk by chunk;
    Dask inputs from one :func:`segment_fibres` call are computed once for both, a slab
    of chunk rows at a time, so memory stays bounded by the chunk size.

    Parameters
    ----------
    mask, skeleton : numpy.ndarray or dask.array.Array
    folder : path-like
        Output folder (created if needed).
    voxel_size_um : tuple of float
    chunks : tuple of int
        Zarr chunk shape.

    Returns
    -------
    dict
        ``{"fibre_mask": path, "skeleton": path}``.
    """
    from ketamap.io.volumes import write_ome_zarr

    vs = check_voxel_size(voxel_size_um)
    folder = Path(folder)
    paths = {"fibre_mask": folder / FIBRE_MASK_FILE, "skeleton": folder / SKELETON_FILE}
    if not (isinstance(mask, da.Array) or isinstance(skeleton, da.Array)):
        for key, image in (("fibre_mask", mask), ("skeleton", skeleton)):
            write_ome_zarr(np.asarray(image, np.uint8), paths[key], voxel_size_um=vs, chunks=chunks)
        return paths
    # one pass for both (they share the segmentation): into a scratch store, then the images
    import tempfile

    import zarr

    folder.mkdir(parents=True, exist_ok=True)
    both = da.stack([da.asarray(mask).astype(np.uint8), da.asarray(skeleton).astype(np.uint8)])
    with tempfile.TemporaryDirectory(prefix=".fibres-", dir=folder) as tmp:
        store = zarr.open(
            str(Path(tmp) / "both.zarr"), mode="w", shape=both.shape, dtype=np.uint8,
            chunks=(1, *(c[0] for c in both.chunks[1:])),
        )  # fmt: skip
        bounds_ = np.concatenate([[0], np.cumsum(both.chunks[1])])
        for rows in _slabs(len(both.chunks[1])):
            z0, z1 = int(bounds_[rows[0]]), int(bounds_[rows[-1] + 1])
            da.store(both[:, z0:z1], store, regions=(slice(None), slice(z0, z1)), lock=True)
        scratch = da.from_zarr(store)
        for k, key in enumerate(("fibre_mask", "skeleton")):
            write_ome_zarr(scratch[k], paths[key], voxel_size_um=vs, chunks=chunks)
    return paths
