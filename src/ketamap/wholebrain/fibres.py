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
   of a hot pixel or a noise speck), and so are pieces that lie on a blob over most of
   their voxels (a soma that was not given): on its flank, where the image changes
   along the ridge as fast as across it (``blob_flank_ratio``), or where the ridge is
   wider than a fibre's (``max_width_ratio``), or pieces that are surfaces rather than
   curves (``hollow_test``: a blob's detection is hollow and thins to a closed shell);
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
can differ between chunkings; measured: total length within 0.3 % under three
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
from typing import NamedTuple

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
from ketamap.wholebrain.detect import minus_background, overlapped_blocks

__all__ = [
    "FibreParams",
    "segment_fibres",
    "skeleton_lengths",
    "fibre_length_table",
    "write_fibre_outputs",
    "labels_on_sample_grid",
    "AtlasFibreMap",
    "fibre_density_atlas",
    "FIBRE_MASK_FILE",
    "SKELETON_FILE",
    "FIBRE_DENSITY_ATLAS_FILE",
]

log = logging.getLogger(__name__)

FIBRE_MASK_FILE = "fibre_mask.ome.zarr"
SKELETON_FILE = "skeleton.ome.zarr"
FIBRE_DENSITY_ATLAS_FILE = "fibre_density_atlas.ome.zarr"

_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 SDs
_NULL_SHAPE = (48, 96, 96)  # white-noise volume that calibrates the response's noise SD
_NULL_SEED = 20240611
_SKELETON_MARGIN = 2  # voxels of context the thinning needs around the region it keeps
_MIN_NOISE_PAIRS = 16  # a noise block needs this many selected pairs, else its neighbours'
_HALF = 0.5
_MIDPOINTS = (0.25, 0.5, 0.75)  # points added along each skeleton edge for the mask
_REGION_PAD = 2  # voxels of the smoothed image kept around the region
_SUM_VOXELS = 2**16  # voxels summed per region at once (bounds the temporaries)
_SLAB_ROWS = 8  # chunk rows (along z) computed at once when results are stored or summed
_PLANES = 1  # z planes per step of the voxel-wise passes of a chunk (temporaries stay in L2)
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
        Edge of the blocks over which the noise SD is estimated (µm; rounded to whole
        voxels, at least 2, and up to an even number along x and along every axis of 4
        voxels or more, where every other plane or row is read).
    min_length_um : float
        Pieces of skeleton shorter than this are dropped (hot pixels, noise specks);
        0 keeps all.
    blob_flank_ratio : float
        A piece of skeleton is dropped when, over more than half of its voxels, the
        image's gradient along the fibre exceeds this many times its curvature across
        it (both in units of the fibre image's SD). On a fibre the ratio is near 0
        (about 0.3 at a bead); on the flank of a blob wider than a fibre (a soma that
        was not given in ``somata``) it is about the blob's SD in those units, >= 1,
        and the flank looks like a tube to the Hessian. 0 keeps every piece.
    max_width_ratio : float
        A piece of skeleton is dropped when, over more than half of its voxels, the
        cross-section of the smoothed image is wider than this many times that of a
        fibre of ``fibre_diameter_um`` (the width of a Gaussian ridge of its height and
        curvature, calibrated on rendered lines for the voxel size and PSF): a soma's
        body, a chain of touching somata, a process much thicker than an axon. Fibres
        of 0.5-2 µm stay within a few per cent of the calibration; 0 keeps every piece.
    hollow_test : bool
        Drop a piece of skeleton when more than half of its voxels have four or more
        skeleton neighbours: it is a surface, not a curve. The detection of a blob is
        hollow (at its centre the curvature is the same along every axis, so there is
        no tubeness) and the thinning keeps the cavity, so a soma that was not given
        thins to a small closed shell; a fibre thins to a curve (two neighbours, three
        at a branch).
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
        Core size (z, y, x) of the chunks processed at once (voxels). Every chunk is
        read with an overlap of about 12 planes along z and 13 voxels along y and x
        (at 4 x 2 x 2 µm): 128 planes keep the overlapped block at 1.35 x its core
        (64 planes: 1.57 x); the stage's peak memory grew by 4 % with them
        (``benchmarks/bench_fibre_memory.py``).
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
    blob_flank_ratio: float = field(
        default=1.0,
        metadata=bounds(ge=0, doc="Drop skeleton pieces on a blob's flank (image SDs); 0: off."),
    )
    max_width_ratio: float = field(
        default=1.4,
        metadata=bounds(ge=0, doc="Drop skeleton pieces wider than this x a fibre; 0: off."),
    )
    hollow_test: bool = field(
        default=True, metadata=bounds(doc="Drop skeleton pieces that are surfaces (hollow blobs).")
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
        default=(128, 384, 384),
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
    fibre_width: float  # the width estimate of _on_blob at a fibre's ridge
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
    # even along x (pairs of voxels) and along every axis read on every other plane or row
    # (_noise_strides), so that each block holds whole pairs and exactly its own planes
    # and rows: an odd block would let the rows of one block drift into the next
    block = [b + b % 2 if (a == 2 or b >= 4) else b for a, b in enumerate(block)]
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
        fibre_width=_fibre_width(tuple(float(v) for v in img / vs_a), sigma_vox, radius, scale),
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


@functools.lru_cache(maxsize=32)
def _fibre_width(img_vox, sigma_vox, radius, scale) -> float:
    """Return the width estimate of :func:`_on_blob` on a fibre of the typical diameter.

    Straight lines along x and along y (images of SD ``img_vox`` per axis across them,
    through a voxel centre and half a voxel off it on each axis across), smoothed as the
    data are; the median of the estimate at the voxel nearest each line. About 1.3 at
    4 x 2 x 2 µm: the smoothed image has unit SD in whitened units, but its curvature is
    sampled at steps of one voxel, which is not small beside it.
    """
    widths = []
    for along in (2, 1):
        across = [a for a in range(3) if a != along]
        n = [2 * r + 2 * int(math.ceil(4 * s)) + 7 for r, s in zip(radius, img_vox)]
        n[along] = 2 * radius[along] + 5
        centre = [k // 2 for k in n]
        grid = np.meshgrid(*(np.arange(k, dtype=float) for k in n), indexing="ij")
        for off in itertools.product((0.0, 0.5), repeat=2):
            r2 = sum(((grid[a] - centre[a] - o) / img_vox[a]) ** 2 for a, o in zip(across, off))
            g = ndi.gaussian_filter(np.exp(-0.5 * r2), sigma_vox, mode="reflect", radius=radius)
            hessian, _ = _derivatives(g, np.array([centre]), scale)
            l2 = _eigenvalues(hessian)[1][0]
            widths.append(math.sqrt(g[tuple(centre)] / -l2))
    return float(np.median(widths))


# ---------------------------------------------------------------------------- the filter
# the voxels of the central differences: the centre, +e_a, -e_a, then for each pair of
# axes (a, b) = (z, y), (z, x), (y, x): e_a + e_b, e_a - e_b, e_b - e_a, -e_a - e_b
_STENCIL = np.array(
    [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (-1, 0, 0), (0, -1, 0), (0, 0, -1)]
    + [(1, 1, 0), (1, -1, 0), (-1, 1, 0), (-1, -1, 0)]
    + [(1, 0, 1), (1, 0, -1), (-1, 0, 1), (-1, 0, -1)]
    + [(0, 1, 1), (0, 1, -1), (0, -1, 1), (0, -1, -1)],
    dtype=np.int64,
)
_PAIRS = ((0, 1), (0, 2), (1, 2))
_BATCH = 8192  # points whose derivatives are computed at once (temporaries stay in cache)


def _batches(n: int, size: int = _BATCH):
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def _derivatives(g: np.ndarray, pos: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """Whitened Hessian (6, n: zz, yy, xx, zy, zx, yx) and gradient (3, n) at voxels ``pos``.

    Central differences of ``g``; at the array's faces the missing neighbour is the
    face voxel itself (scipy's "reflect"), as the Gaussian filter treats the faces.
    """
    n = np.asarray(g.shape)
    pos = np.asarray(pos, dtype=np.int64).reshape(-1, 3)
    values = np.empty((len(_STENCIL), len(pos)))
    for k, offset in enumerate(_STENCIL):
        q = pos + offset
        q = np.where(q < 0, -q - 1, q)
        q = np.where(q >= n, 2 * n - q - 1, q)
        values[k] = g[q[:, 0], q[:, 1], q[:, 2]]
    return _differences(values, scale)


def _differences(v: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """Whitened Hessian (6, n) and gradient (3, n) from the values (19, n) at ``_STENCIL``."""
    s = np.asarray(scale, dtype=np.float64)
    c = v[0]
    hessian = np.empty((6, v.shape[1]))
    grad = np.empty((3, v.shape[1]))
    for a in range(3):
        plus, minus = v[1 + a], v[4 + a]
        hessian[a] = (plus + minus - 2.0 * c) * s[a] * s[a]
        grad[a] = (plus - minus) * 0.5 * s[a]
    for k, (a, b) in enumerate(_PAIRS):
        r = 7 + 4 * k
        cross = v[r] - v[r + 1] - v[r + 2] + v[r + 3]
        hessian[3 + k] = cross * 0.25 * s[a] * s[b]
    return hessian, grad


def _log_derivatives(reg, idx: np.ndarray, scale, level: np.ndarray):
    """Whitened Hessian and gradient of ``ln(g - level)`` at flat indices ``idx`` of a region.

    The image of a thin line is a Gaussian across it, so its logarithm is a quadratic,
    whose central differences are exact: the Newton step on the logarithm finds the
    ridge of a sampled line to a small fraction of a voxel, where the step on ``g``
    itself is biased by the sampling (by up to a third of a voxel at these scales).
    Values are floored at 5 % of the centre's (above the level).
    """
    v = reg.stencil(idx)
    v -= level
    floor = np.maximum(0.05 * v[0], 1e-6)
    np.maximum(v, floor, out=v)
    return _differences(np.log(v, out=v), scale)


def _eigenvalues(h: np.ndarray):
    """Eigenvalues l1 >= l2 >= l3 of symmetric 3 x 3 matrices (6, n; closed form, float64)."""
    a11, a22, a33, a12, a13, a23 = h
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


def _cross(p, q):
    """Cross products of vectors given as three component arrays."""
    return (p[1] * q[2] - p[2] * q[1], p[2] * q[0] - p[0] * q[2], p[0] * q[1] - p[1] * q[0])


def _dot(p, q):
    """Dot products of vectors given as three component arrays."""
    return p[0] * q[0] + p[2] * q[2] + p[1] * q[1]


def _fibre_axis(h: np.ndarray, l1: np.ndarray) -> list[np.ndarray]:
    """Return the unit eigenvectors (three component arrays) of the largest eigenvalues.

    Closed form: the cross products of the rows of ``H - l1`` lie along it (the longest
    of the three is taken); (1, 0, 0) where ``H - l1`` vanishes.
    """
    a11, a22, a33, a12, a13, a23 = h
    r0, r1, r2 = (a11 - l1, a12, a13), (a12, a22 - l1, a23), (a13, a23, a33 - l1)
    cands = [_cross(r0, r1), _cross(r0, r2), _cross(r1, r2)]
    norms = [_dot(c, c) for c in cands]
    second = norms[1] > norms[0]  # the longest of the three (the first of equals)
    top = np.where(second, norms[1], norms[0])
    third = norms[2] > top
    top = np.where(third, norms[2], top)
    e1 = [np.where(third, c2, np.where(second, c1, c0)) for c0, c1, c2 in zip(*cands)]
    size = np.sqrt(top)
    degenerate = size <= 1e-12 * np.maximum(np.abs(h).max(axis=0), 1e-300)
    safe = np.where(size > 0, size, 1.0)
    return [np.where(degenerate, d, c / safe) for c, d in zip(e1, (1.0, 0.0, 0.0))]


def _on_blob(reg, idx: np.ndarray, level: np.ndarray, plan, params) -> tuple:
    """Return the votes of the skeleton voxels at flat indices ``idx`` that they lie on a blob.

    In whitened units (the smoothed fibre image has unit SD on every axis):

    * **flank**: the gradient along the fibre's axis over the curvature across it
      (``-l2``) exceeds ``params.blob_flank_ratio``. It is 0 on a fibre (its brightness
      is constant along it; a bead gives about 0.3) and about the blob's own SD (>= 1)
      on the flank of a blob wider than a fibre, where the curvature along the radius
      vanishes and the two around it make the flank look like a tube; also where
      ``l2 >= 0`` (no ridge);
    * **wide**: the width ``sqrt((g - level) / -l2)`` of the cross-section (a Gaussian
      ridge of peak ``g - level`` above the background level) exceeds
      ``params.max_width_ratio`` times a fibre's (``plan.fibre_width``): a soma's body,
      a chain of touching somata, a thick process.

    A test whose parameter is 0 gives no votes. Returns two boolean arrays.
    """
    flank = np.zeros(len(idx), dtype=bool)
    wide = np.zeros(len(idx), dtype=bool)
    widest = params.max_width_ratio * plan.fibre_width
    for part in _batches(len(idx)):
        values = reg.stencil(idx[part])
        hessian, grad = _differences(values, plan.scale)
        l1, l2, _ = _eigenvalues(hessian)
        if params.blob_flank_ratio > 0:
            along = np.abs(_dot(_fibre_axis(hessian, l1), grad))
            flank[part] = ~(along < params.blob_flank_ratio * -l2)
        if params.max_width_ratio > 0:
            wide[part] = values[0] - level[part] > widest**2 * np.maximum(-l2, 0.0)
    return flank, wide


def _ridge_offsets(hessian: np.ndarray, grad: np.ndarray, scale) -> np.ndarray:
    """Newton step (voxels, (n, 3), each axis clipped to +-1) to the ridge, across the fibre.

    ``hessian`` (6, n) and ``grad`` (3, n) as from :func:`_differences`. The fibre's
    direction is the eigenvector of the largest eigenvalue; in the plane across it, the
    step follows the directions of negative curvature only (closed forms: no per-matrix
    LAPACK call).
    """
    h = hessian
    n = h.shape[1]
    a11, a22, a33, a12, a13, a23 = h
    e1 = _fibre_axis(h, _eigenvalues(h)[0])
    # a basis (u, v) of the plane across the fibre
    first = np.abs(e1[0]) < 0.9
    helper = (np.where(first, 1.0, 0.0), np.where(first, 0.0, 1.0), np.zeros(n))
    u = _cross(e1, helper)
    length = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
    u = tuple(c / length for c in u)
    v = _cross(e1, u)

    def quad(p, q):  # p^T H q
        return (
            p[0] * (a11 * q[0] + a12 * q[1] + a13 * q[2])
            + p[1] * (a12 * q[0] + a22 * q[1] + a23 * q[2])
            + p[2] * (a13 * q[0] + a23 * q[1] + a33 * q[2])
        )

    muu, muv, mvv = quad(u, u), quad(u, v), quad(v, v)
    gu, gv = _dot(u, grad), _dot(v, grad)
    # 2 x 2 eigen-decomposition: eigenvector (cos t, sin t) in the (u, v) basis
    half = 0.5 * (muu - mvv)
    root = np.sqrt(half * half + muv * muv)
    theta = 0.5 * np.arctan2(muv, half)
    cos, sin = np.cos(theta), np.sin(theta)
    step = [np.zeros(n)] * 3
    for lam, c, s_ in (
        (0.5 * (muu + mvv) + root, cos, sin),
        (0.5 * (muu + mvv) - root, -sin, cos),
    ):
        coef = np.zeros(n)
        np.divide(-(c * gu + s_ * gv), lam, out=coef, where=lam < 0)
        step = [st + coef * (c * uk + s_ * vk) for st, uk, vk in zip(step, u, v)]
    return np.clip(np.stack(step, axis=1) * np.asarray(scale), -1.0, 1.0)


def _levels(pos: np.ndarray, plan: _Plan, level_grid: np.ndarray, start) -> np.ndarray:
    """Background level (float64) of the noise block of each region voxel of ``pos``."""
    cells = [
        np.clip((pos[:, a] + start[a]) // plan.noise_block[a], 0, level_grid.shape[a] - 1)
        for a in range(3)
    ]
    return level_grid[tuple(cells)].astype(np.float64)


def _ridge_step(reg, pos: np.ndarray, plan: _Plan, level: np.ndarray) -> np.ndarray:
    """One Newton step from the region voxels ``pos`` towards their ridge (points, (n, 3)).

    ``pos`` may lie up to one voxel outside the region; ``level`` is each one's
    background level (:func:`_levels` of the voxel the steps started from).
    """
    point = np.empty(pos.shape)
    for part in _batches(len(pos)):
        hessian, grad = _log_derivatives(reg, reg.index(pos[part]), plan.scale, level[part])
        point[part] = pos[part] + _ridge_offsets(hessian, grad, plan.scale)
    return point


def _centreline(reg, spts, seeds, plan: _Plan, level_grid, start):
    """Ridge points of the skeleton voxels ``spts`` and the seeds' one-step points.

    Each skeleton voxel takes two Newton steps (the second from the voxel nearest the
    first's point, kept within one voxel of the region, where it moved to another
    voxel); the seeds (flat indices of the region, ascending) take one. The first step
    of a skeleton voxel that is a seed is the seed's. Returns the skeleton's points and
    the seeds' coordinates and points (region voxels).
    """
    strong = reg.coords(seeds)
    first = _ridge_step(reg, strong, plan, _levels(strong, plan, level_grid, start))
    level = _levels(spts, plan, level_grid, start)
    ridge = np.empty(spts.shape)
    own = np.arange(len(spts))
    if len(seeds):
        idx = reg.index(spts)
        k = np.minimum(np.searchsorted(seeds, idx), len(seeds) - 1)
        shared = seeds[k] == idx
        ridge[shared] = first[k[shared]]
        own = own[~shared]
    ridge[own] = _ridge_step(reg, spts[own], plan, level[own])
    nxt = np.clip(np.rint(ridge).astype(np.int64), -1, np.asarray(reg.shape))
    moved = np.flatnonzero((nxt != spts).any(axis=1))
    ridge[moved] = _ridge_step(reg, nxt[moved], plan, level[moved])
    return ridge, strong, first


# ---------------------------------------------------------------------------- noise grid
def _block_noise(x: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    """Robust noise SD and level of every block of ``x`` (a chunk on the block grid).

    Pairs of x-neighbours (0, 1), (2, 3) ... on every other plane and row (blocks of at
    least 4 voxels on those axes); the noise SD is 1.4826 x the MAD of the differences of
    the pairs whose sum is at most the block's median sum, divided by sqrt(2); the level
    is half that median sum. Returns an array (2, *grid); NaN where a block has fewer
    than 16 such pairs.
    """
    sz, sy = _noise_strides(block)
    return _pair_noise(x[::sz, ::sy, :], x.shape, block)


def _noise_strides(block) -> tuple[int, int]:
    """Return the steps along z and y between the planes and rows whose pairs are read."""
    return (2 if block[0] >= 4 else 1, 2 if block[1] >= 4 else 1)


def _pair_noise(v: np.ndarray, shape, block) -> np.ndarray:
    """:func:`_block_noise` from the planes and rows it reads (``v``) of a chunk of ``shape``."""
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    sz, sy = _noise_strides(block)
    # a block is even along every strided axis (_plan): it reads exactly its own planes/rows
    bz, by, bx = -(-block[0] // sz), -(-block[1] // sy), block[2] // 2
    # pad every axis to whole blocks (NaN), pairs along x inside each block
    padded = (grid[0] * bz, grid[1] * by, grid[2] * block[2])
    if v.shape == padded and v.dtype == np.float32:
        full = v
    else:
        full = np.full(padded, np.nan, dtype=np.float32)
        full[: v.shape[0], : v.shape[1], : v.shape[2]] = v
    full = full.reshape(grid[0], bz, grid[1], by, grid[2], bx, 2)
    # the sums and differences of the pairs, written block by block: (gz, gy, gx, pairs)
    total = np.empty((*grid, bz, by, bx), dtype=np.float32)
    diff = np.empty_like(total)
    np.add(full[..., 0], full[..., 1], out=total.transpose(0, 3, 1, 4, 2, 5))
    np.subtract(full[..., 0], full[..., 1], out=diff.transpose(0, 3, 1, 4, 2, 5))
    del full
    total, diff = total.reshape(*grid, -1), diff.reshape(*grid, -1)
    middle = _nan_median(total)
    diff[~(total <= middle[..., None])] = np.nan
    centre = _nan_median(diff)
    mad = _nan_median(np.abs(diff - centre[..., None]))
    enough = np.count_nonzero(np.isfinite(diff), axis=-1) >= _MIN_NOISE_PAIRS
    out = np.full((2, *grid), np.nan, dtype=np.float32)
    out[0][enough] = (1.4826 / math.sqrt(2.0)) * mad[enough]
    out[1][enough] = 0.5 * middle[enough]
    return out


def _nan_median(a: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN (the lower middle value; NaN if none)."""
    finite = np.isfinite(a)
    n = np.count_nonzero(finite, axis=-1)
    m = a.shape[-1]
    if m and n.min() == m:  # no NaN: the lower middle of every row
        return np.partition(a, (m - 1) // 2, axis=-1)[..., (m - 1) // 2]
    srt = np.sort(np.where(finite, a, np.inf), axis=-1)
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
def _coords(image: np.ndarray) -> np.ndarray:
    """Voxel coordinates (n, 3) of the non-zero voxels, in raster order (as np.argwhere)."""
    return np.stack(np.unravel_index(np.flatnonzero(image), image.shape), axis=1)


def _inside(pts: np.ndarray, lo, hi) -> np.ndarray:
    """Whether each point (n, 3) lies in the box lo <= p < hi (per axis)."""
    ok = (pts[:, 0] >= lo[0]) & (pts[:, 0] < hi[0])
    ok &= (pts[:, 1] >= lo[1]) & (pts[:, 1] < hi[1])
    ok &= (pts[:, 2] >= lo[2]) & (pts[:, 2] < hi[2])
    return ok


class _PointIndex:
    """Which of the voxels ``pts`` (int, (n, 3)) sits at a voxel (-1: none).

    An occupancy grid covers the box of ``shape`` and one voxel around it, so that the
    26 neighbours of any voxel of the box are tested without bounds tests; the index of
    an occupied voxel is found by bisection in the sorted flat indices.
    """

    def __init__(self, pts: np.ndarray, shape):
        pshape = tuple(int(n) + 2 for n in shape)
        self.strides = np.array([pshape[1] * pshape[2], pshape[2], 1], dtype=np.int64)
        self.flat = (np.asarray(pts, dtype=np.int64).reshape(-1, 3) + 1) @ self.strides
        self.occupied = np.zeros(math.prod(pshape), dtype=bool)
        self.occupied[self.flat] = True
        self.order = None  # points already in raster order (np.argwhere) need no sort
        if len(self.flat) > 1 and (np.diff(self.flat) < 0).any():
            self.order = np.argsort(self.flat, kind="stable")
        self.sorted = self.flat if self.order is None else self.flat[self.order]

    def exists(self, offset, which=None) -> np.ndarray:
        """Whether a point sits at each point (or ``which`` of them) moved by ``offset``."""
        flat = self.flat if which is None else self.flat[which]
        return self.occupied[flat + int(np.dot(offset, self.strides))]

    def at(self, offset, which=None) -> np.ndarray:
        """Index of the point at each point (or ``which`` of them) moved by ``offset``."""
        flat = self.flat if which is None else self.flat[which]
        q = flat + int(np.dot(offset, self.strides))
        hit = self.occupied[q]
        out = np.full(len(q), -1, dtype=np.int64)
        rank = np.searchsorted(self.sorted, q[hit])
        out[hit] = rank if self.order is None else self.order[rank]
        return out


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
        i = np.flatnonzero(index.exists(o))
        if len(i) == 0:
            continue
        keep = np.ones(len(i), dtype=bool)
        nz = np.flatnonzero(o)
        for r in range(1, len(nz)):
            for sub in itertools.combinations(nz, r):
                so = np.zeros(3, dtype=np.int64)
                so[list(sub)] = o[list(sub)]
                keep &= ~index.exists(so, i)
        i = i[keep]
        out.append(np.stack([i, index.at(o, i)], axis=1))
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
def _clamp_spikes(x: np.ndarray, bound_grid: np.ndarray, start, block) -> None:
    """Lower every voxel to at most the largest of its 6 neighbours plus its bound, in place.

    A microscope blurs every real structure over several voxels, so a voxel that stands
    above all its face neighbours by many noise SDs is a hot pixel or a cosmic hit.
    ``bound_grid`` holds the bound of every noise block (float32), ``start`` is the
    global index of ``x``'s first voxel and ``block`` the noise block (voxels). A
    plane at a time, so the temporaries stay in the cache; the bound of a voxel is
    looked up only where the voxel exceeds its neighbours by the smallest bound of the
    chunk (rare), and the voxels are lowered after all their neighbours were read.
    """
    shape = x.shape
    cells = [
        np.clip((np.arange(n) + st) // k, 0, m - 1)
        for n, st, k, m in zip(shape, start, block, bound_grid.shape)
    ]
    smallest = bound_grid[tuple(slice(int(c[0]), int(c[-1]) + 1) for c in cells)].min()
    top_buf = np.empty((_PLANES, *shape[1:]), dtype=np.float32)
    low_buf = np.empty_like(top_buf)
    where, value = [], []
    for z0 in range(0, shape[0], _PLANES):
        z1 = min(z0 + _PLANES, shape[0])
        top, xs = top_buf[: z1 - z0], x[z0:z1]
        top.fill(-np.inf)
        if shape[0] > 1:  # the planes below and above (none beyond the block's faces)
            a = max(z0, 1)
            np.maximum(top[a - z0 :], x[a - 1 : z1 - 1], out=top[a - z0 :])
            b = min(z1, shape[0] - 1)
            np.maximum(top[: b - z0], x[z0 + 1 : b + 1], out=top[: b - z0])
        for axis in (1, 2):
            if shape[axis] < 2:
                continue
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            np.maximum(top[tuple(lo)], xs[tuple(hi)], out=top[tuple(lo)])
            np.maximum(top[tuple(hi)], xs[tuple(lo)], out=top[tuple(hi)])
        low = low_buf[: z1 - z0]
        np.add(top, smallest, out=low)  # rounding is monotone: a superset of the spikes
        hit = np.flatnonzero(xs > low)
        if len(hit) == 0:
            continue
        z, y, xx = np.unravel_index(hit, top.shape)
        bound = bound_grid[cells[0][z + z0], cells[1][y], cells[2][xx]]
        ceiling = top.ravel()[hit] + bound
        over = xs[z, y, xx] > ceiling
        where.append(hit[over] + z0 * shape[1] * shape[2])
        value.append(ceiling[over])
    if where:  # x may be a view
        x[np.unravel_index(np.concatenate(where), shape)] = np.concatenate(value)


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
    if not near.all():
        near = np.flatnonzero(near)
        base, frac = base[near], frac[near]
    base += margin
    padded = np.zeros(tuple(dims + 2 * margin), dtype=bool)
    pstr = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1], dtype=np.int64)
    flat = base @ pstr
    pf = padded.ravel()
    steps = [np.arange(-r, r + 1) for r in reach]
    for part in _batches(len(flat), 4 * _BATCH):
        # squared distance along each axis from the centres to the voxels at each offset
        sq = [(frac[part, a][None, :] + (steps[a] / semi[a])[:, None]) ** 2 for a in range(3)]
        at = flat[part]
        for i, j in itertools.product(range(len(steps[0])), range(len(steps[1]))):
            zy = sq[0][i] + sq[1][j]
            row = int(steps[0][i] * pstr[0] + steps[1][j] * pstr[1])
            for k, dx in enumerate(steps[2]):
                pf[at[zy + sq[2][k] <= 1.0] + (row + int(dx))] = True
    inner = padded[tuple(slice(int(m), int(m + n)) for m, n in zip(margin, dims))]
    if value:
        np.logical_or(mask, inner, out=mask)
    else:
        np.logical_and(mask, ~inner, out=mask)


def _repeat_faces(grid: np.ndarray, before, after) -> None:
    """Fill the ``before`` / ``after`` outer layers of ``grid`` with its inner faces, in place.

    A face of the block repeats its voxel (scipy's "reflect" for the first layer).
    """
    for axis, (b, a) in enumerate(zip(before, after)):
        n = grid.shape[axis]
        for width, face, edge in ((b, b, slice(0, b)), (a, n - a - 1, slice(n - a, n))):
            if width:
                src = [slice(None)] * 3
                dst = [slice(None)] * 3
                src[axis], dst[axis] = slice(face, face + 1), edge
                grid[tuple(dst)] = grid[tuple(src)]


class _Region:
    """The smoothed image around a region, for flat-index stencils.

    ``g`` (C-contiguous, not copied) holds the region ``[lo, hi)`` and at least
    ``_REGION_PAD`` voxels around it on every side. Every per-voxel array of the region
    (response bounds, noise, states) is kept on ``g``'s grid, so one flat index
    addresses them all.
    """

    def __init__(self, g: np.ndarray, lo: np.ndarray, hi: np.ndarray):
        lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
        if (lo < _REGION_PAD).any() or (hi + _REGION_PAD > np.asarray(g.shape)).any():
            raise ValueError("the region needs _REGION_PAD voxels of image around it")
        self.flat = g.reshape(-1)  # a view: g is C-contiguous
        self.pshape = g.shape
        self.lo, self.hi = lo, hi
        self.shape = tuple(int(n) for n in hi - lo)
        self.strides = np.array([self.pshape[1] * self.pshape[2], self.pshape[2], 1], np.int64)
        self.inner = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def index(self, pts: np.ndarray) -> np.ndarray:
        """Flat indices of region voxels (up to one voxel outside the region allowed)."""
        q = np.clip(np.asarray(pts, dtype=np.int64), -1, np.asarray(self.shape))
        return (q + self.lo) @ self.strides

    def coords(self, idx: np.ndarray) -> np.ndarray:
        """Region voxel coordinates (n, 3) of flat indices."""
        return np.stack(np.unravel_index(idx, self.pshape), axis=1) - self.lo

    def stencil(self, idx: np.ndarray) -> np.ndarray:
        """Return the image (float64, (19, n)) at the voxels of ``_STENCIL`` around ``idx``."""
        out = np.empty((len(_STENCIL), len(idx)))
        for k, offset in enumerate(_STENCIL @ self.strides):
            out[k] = self.flat[idx + offset]
        return out

    def set_noise(self, planes: np.ndarray, zrow: np.ndarray) -> None:
        """Keep the response's local noise SD: ``planes[zrow[z]]`` is plane ``z``'s (y, x) map.

        The noise is constant over noise blocks, so a plane per block along z holds it.
        """
        (lz, ly, lx), (hz, hy, hx) = self.lo, self.hi
        gz, gy, gx = self.pshape
        self._sd_flat = np.pad(
            planes, ((0, 0), (ly, gy - hy), (lx, gx - hx)), constant_values=1.0
        ).reshape(len(planes), -1)
        self._sd_row = np.pad(zrow, (lz, gz - hz), mode="edge")

    def sd(self, idx: np.ndarray) -> np.ndarray:
        """Return the response's local noise SD at flat indices ``idx``."""
        z, r = np.divmod(idx, self.strides[0])
        return self._sd_flat[self._sd_row[z], r]

    def candidates(self, scale, grow: float, seed: float) -> tuple[np.ndarray, np.ndarray]:
        """Find the voxels whose whitened Laplacian allows a response of ``grow`` / ``seed``.

        The response ``R <= -trace / 2`` (in units of its local noise SD,
        :meth:`set_noise`), so only voxels with ``-trace >= 2 x`` a threshold can pass
        it. Returns a flat boolean array on the grid (``-trace >= 2 grow``, False off
        the region) and the flat indices (ascending) with ``-trace >= 2 seed``
        (``seed >= grow``). The trace (central differences) is computed a whole
        plane at a time, as flat runs (the neighbours along every axis are the same
        runs shifted), so the temporaries stay in the cache and it is never held whole.
        """
        g = self.flat
        grows = np.zeros(self.pshape, dtype=bool)
        flat = grows.reshape(-1)
        lz, hz = int(self.lo[0]), int(self.hi[0])
        plane = int(self.strides[0])
        s2 = np.asarray(scale, dtype=np.float32) ** 2
        centre_weight = np.float32(-2.0 * s2.sum())
        shifts = [(int(self.strides[a]) * step, s2[a]) for a in range(3) for step in (-1, 1)]
        core_buf = np.empty(_PLANES * plane, np.float32)
        buf = np.empty_like(core_buf)
        sd = self._sd_flat
        grow_bound, seed_bound = np.float32(-2.0 * grow), np.float32(-2.0 * seed)
        seeds = []
        for z0 in range(lz, hz, _PLANES):
            z1 = min(z0 + _PLANES, hz)
            run = slice(z0 * plane, z1 * plane)
            core, tmp = core_buf[: (z1 - z0) * plane], buf[: (z1 - z0) * plane]
            np.multiply(g[run], centre_weight, out=core)
            for shift, weight in shifts:
                np.multiply(g[run.start + shift : run.stop + shift], weight, out=tmp)
                core += tmp
            core.reshape(z1 - z0, plane)[:] /= sd[self._sd_row[z0:z1]]
            np.less_equal(core, grow_bound, out=flat[run])
            seeds.append(np.flatnonzero(core <= seed_bound) + run.start)
        for axis, (a, b) in enumerate(zip(self.lo, self.hi)):  # off the region
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, int(a)), slice(int(b), None)
            grows[tuple(lo)] = False
            grows[tuple(hi)] = False
        cand = np.concatenate(seeds)
        return flat, cand[flat[cand]]

    def tubeness(self, idx: np.ndarray, scale) -> np.ndarray:
        """Tubeness at flat indices ``idx``."""
        out = np.empty(len(idx))
        for part in _batches(len(idx)):
            hessian = _differences(self.stencil(idx[part]), scale)[0]
            out[part] = _tubeness(*_eigenvalues(hessian))
        return out


_NEIGHBOURS = np.array([o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)])


def _hysteresis(reg: _Region, open_, seeds, known, response, params: FibreParams, scale):
    """Grow the seeds through 26-neighbours whose response passes ``hysteresis_snr``.

    All arrays and indices are on the region's grid: ``open_`` (flat, bool, changed in
    place) marks the voxels that may still join (those whose whitened Laplacian allows
    the response, :meth:`_Region.candidates`; never a voxel off the region), and the
    response is evaluated lazily, only at neighbours of accepted voxels that are open,
    unless it is known: ``response`` at the flat indices ``known`` (ascending). Returns
    the flat indices of the accepted voxels, the seeds first.
    """
    offsets = _NEIGHBOURS @ reg.strides
    frontier = np.asarray(seeds, dtype=np.int64)
    open_[frontier] = False
    found = [frontier]
    while len(frontier):
        step = []
        for offset in offsets:  # one neighbour at a time: the temporaries stay small
            nb = frontier + offset
            nb = nb[open_[nb]]
            open_[nb] = False
            step.append(nb)
        nb = np.concatenate(step)
        if len(nb) == 0:
            break
        value = np.empty(len(nb))
        at = np.minimum(np.searchsorted(known, nb), len(known) - 1)
        hit = known[at] == nb
        value[hit] = response[at[hit]]
        value[~hit] = reg.tubeness(nb[~hit], scale)
        frontier = nb[value >= params.hysteresis_snr * reg.sd(nb)]
        found.append(frontier)
    return np.concatenate(found)


def _clear_pieces(grid: np.ndarray, start: np.ndarray, offsets: np.ndarray) -> None:
    """Clear, in place, the 26-connected pieces of ``grid`` (bool) holding ``start``.

    ``start`` holds flat indices of set voxels, ``offsets`` the flat offsets of the 26
    neighbours; no set voxel may touch the grid's faces.
    """
    flat = grid.ravel()
    frontier = np.unique(start)
    flat[frontier] = False
    while len(frontier):
        step = []
        for offset in offsets:
            nb = frontier + offset
            nb = nb[flat[nb]]
            flat[nb] = False
            step.append(nb)
        frontier = np.concatenate(step)


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
    shape = np.asarray(block.shape)
    # the region whose detection is final: the core and the margin, within the block
    lo = np.maximum(np.asarray(pad_lo) - plan.margin, 0)
    hi = np.minimum(np.asarray(pad_lo) + core_shape + np.asarray(plan.margin), shape)
    # the block in float32, with room for the voxels the region's stencils read beyond
    # the block's faces (where the block is the volume's edge)
    before = np.maximum(_REGION_PAD - lo, 0)
    after = np.maximum(hi + _REGION_PAD - shape, 0)
    grid = np.empty(tuple(int(n) for n in shape + before + after), dtype=np.float32)
    x = grid[tuple(slice(int(b), int(b + n)) for b, n in zip(before, shape))]
    minus_background(block, background, bg_scale, pad_lo=pad_lo, origin=origin,
                     task="fibre segmentation", out=x)  # fmt: skip
    out = np.zeros(core_shape, dtype=np.uint8)
    start = np.asarray(origin) - np.asarray(pad_lo)  # global index of the block's voxel 0
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
        bound = noise_grid * np.float32(params.spike_snr)
        _clamp_spikes(x, bound, start, plan.noise_block)
        del bound
    ndi.gaussian_filter(x, plan.sigma_vox, mode="reflect", radius=plan.radius_vox, output=x)
    _repeat_faces(grid, before, after)
    reg = _Region(grid, lo + before, hi + before)
    del grid, x
    # the response's local noise SD: the block's noise SD (nearest block) x the filter's,
    # one (y, x) plane per noise block along z
    cells = [
        np.clip((np.arange(a, b) + st) // k, 0, n - 1)
        for a, b, st, k, n in zip(lo, hi, start, plan.noise_block, noise_grid.shape)
    ]
    zcells, zrow = np.unique(cells[0], return_inverse=True)
    planes = np.multiply(
        noise_grid[np.ix_(zcells, cells[1], cells[2])], np.float32(plan.null_sd), dtype=np.float32
    )
    reg.set_noise(planes, zrow)
    # the voxels that may join, and the seed candidates
    open_, cand = reg.candidates(plan.scale, params.hysteresis_snr, params.threshold_snr)
    barrier = None if in_tissue is None else ~in_tissue
    if len(somata):  # no fibre within the exclusion ball of a soma
        ball = np.full(3, 0.5 * params.soma_exclusion_diameter_um) / np.asarray(vs)
        if barrier is None:
            barrier = np.zeros(region, dtype=bool)
        _fill_ellipsoids(barrier, somata - (start + lo), ball)
    if barrier is not None:  # the void and the somata are never fibre
        open_.reshape(reg.pshape)[reg.inner][barrier] = False
        cand = cand[open_[cand]]
        del barrier
    if len(cand) == 0:
        return out
    response = reg.tubeness(cand, plan.scale)
    seeds = cand[response >= params.threshold_snr * reg.sd(cand)]
    if len(seeds) == 0:
        return out
    flat = _hysteresis(reg, open_, seeds, cand, response, params, plan.scale)
    del cand, response
    detected = open_.reshape(reg.pshape)  # its memory, on the region's grid
    detected.fill(False)
    detected.ravel()[flat] = True
    # the thinning scans its whole image every iteration: it gets the detection's box
    # (the same skeleton: the box drops only empty voxels and keeps their order)
    at = reg.coords(flat)
    corner, far = at.min(axis=0), at.max(axis=0) + 1
    del flat, at
    from skimage.morphology import skeletonize

    box = tuple(slice(int(a + o), int(b + o)) for a, b, o in zip(corner, far, reg.lo))
    spts = _coords(skeletonize(detected[box])) + corner
    if len(spts) == 0:
        return out
    edges, pos_um, adj = _graph(spts, region, vs, params.length_smoothing)
    if (
        params.min_length_um > 0
        or params.blob_flank_ratio > 0
        or params.max_width_ratio > 0
        or params.hollow_test
    ):
        # whole pieces of skeleton go: those shorter than min_length_um, and those that
        # lie on a blob (a soma not given) over most of their voxels
        n_sk, sk_comp = sparse.csgraph.connected_components(adj, directed=False)
        keep = np.ones(n_sk, dtype=bool)
        half = 0.5 * np.bincount(sk_comp, minlength=n_sk)
        if params.min_length_um > 0:
            w = _point_lengths(pos_um, edges)
            keep &= np.bincount(sk_comp, weights=w, minlength=n_sk) >= params.min_length_um
        if params.hollow_test:  # a surface: most voxels have four neighbours or more
            keep &= np.bincount(sk_comp, weights=np.diff(adj.indptr) >= 4, minlength=n_sk) <= half
        if params.blob_flank_ratio > 0 or params.max_width_ratio > 0:
            level = _levels(spts, plan, level_grid, start + lo)
            for votes in _on_blob(reg, reg.index(spts), level, plan, params):
                keep &= np.bincount(sk_comp, weights=votes, minlength=n_sk) <= half
        ok = keep[sk_comp]
        if not ok.all():
            # the edges of the kept pieces (a short-cut's third voxel is in its piece)
            edges = (np.cumsum(ok) - 1)[edges[ok[edges[:, 0]]]]
            # and the seeds of detected pieces without skeleton left (the kept skeleton
            # runs through its pieces, so they are cleared in a few steps from it)
            spts = spts[ok]
            _clear_pieces(detected, reg.index(spts), _NEIGHBOURS @ reg.strides)
            seeds = seeds[~detected.ravel()[seeds]]
            if len(spts) == 0:
                return out
    del detected, pos_um, adj
    # the centreline: the skeleton's voxels moved onto their ridge and joined along the
    # skeleton, and the seeds that are ridge voxels (their ridge point lies within them),
    # so that fibres the thinning merged keep their own
    ridge, strong, points = _centreline(reg, spts, seeds, plan, level_grid, start + lo)
    del reg
    pieces = [ridge]
    if len(edges):
        t = np.array(_MIDPOINTS)
        a, b = ridge[edges[:, 0]], ridge[edges[:, 1]]
        pieces.append((a[:, None, :] + t[None, :, None] * (b - a)[:, None, :]).reshape(-1, 3))
    if len(strong):
        pieces.append(points[(np.abs(points - strong) <= 0.5).all(axis=1)])
    # the mask of the core (the ellipsoids of centreline points in the margin reach in)
    core = tuple(slice(int(p - a), int(p - a + c)) for p, a, c in zip(pad_lo, lo, core_shape))
    first = np.array([c.start for c in core])
    mask = np.zeros(core_shape, dtype=bool)
    _fill_ellipsoids(mask, np.concatenate(pieces) - first, np.full(3, params.mask_radius_vox))
    if len(somata):
        _fill_ellipsoids(mask, somata - (start + lo + first), ball, False)
    if in_tissue is not None:
        mask &= in_tissue[core]
    np.copyto(out, mask, casting="unsafe")  # 1 where fibre
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
    noise_grid, level_grid = _noise_grid(sig, bg, scale, plan.noise_block, chunks)
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
        overlapped_blocks(v, chunks, depth) for v in ((sig,) if bg is None else (sig, bg))
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


def _noise_grid(sig: da.Array, bg: da.Array | None, scale: float, block, chunks):
    """Return the noise SD and level grids of ``sig - scale bg`` (one pass over the volume).

    Every chunk of ``chunks`` reads every ``sz``-th plane and ``sy``-th row from its own
    start (:func:`_noise_strides`); only those are cut from the volume.
    """
    steps = (*_noise_strides(block), 1)
    sub_chunks = tuple(tuple(-(-c // k) for c in cs) for cs, k in zip(chunks, steps))

    def rows(sizes, k):  # a plain strided slice where every chunk starts on the stride
        ends = np.cumsum(sizes)
        if all(int(a) % k == 0 for a in ends[:-1]):
            return slice(None, None, k)
        return np.concatenate([np.arange(b - c, b, k) for c, b in zip(sizes, ends)])

    index = [rows(cs, k) for cs, k in zip(chunks[:2], steps[:2])]

    def read(v):
        return v[index[0]][:, index[1]].rechunk(sub_chunks)

    def per_chunk(xb, bb=None, block_id=None):
        shape = tuple(chunks[a][block_id[a + 1]] for a in range(3))
        v = xb.astype(np.float32)
        if bb is not None:
            v -= np.float32(scale) * bb.astype(np.float32)
        return _pair_noise(v, shape, block)

    out_chunks = ((2,),) + tuple(tuple(-(-c // k) for c in cs) for cs, k in zip(chunks, block))
    args = (read(sig),) if bg is None else (read(sig), read(bg))
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
        pts = _coords(np.asarray(block))
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


class AtlasFibreMap(NamedTuple):
    """Result of :func:`fibre_density_atlas`."""

    density_mm_per_mm3: np.ndarray
    """Fibre length per volume on the atlas grid (float32, atlas axis order, mm/mm³)."""
    voxel_size_um: tuple[float, float, float]
    """Voxel size of that grid (the atlas resolution times the block factor)."""
    length_um: float
    """Total length of the skeleton in the sample (µm)."""
    length_in_atlas_um: float
    """The part of it whose voxels map inside the atlas volume (the map's integral)."""
    n_skeleton_voxels: int
    """Skeleton voxels mapped."""


def _skeleton_points(block: np.ndarray, offset) -> tuple[np.ndarray, np.ndarray]:
    """Raw voxel coordinates (z, y, x) and lengths (µm) of a block's skeleton voxels."""
    block = np.asarray(block)
    where = np.nonzero(block)
    coords = np.stack(where, axis=1).astype(np.int64) + np.asarray(offset, np.int64)
    return coords, block[where].astype(np.float64)


def _atlas_sums(coords, lengths, registration, shape) -> tuple[np.ndarray, np.ndarray, float]:
    """Map skeleton voxels to atlas voxels; their flat index, summed length, length outside."""
    from ketamap.wholebrain.register import cells_to_atlas

    if not len(coords):
        return np.zeros(0, np.int64), np.zeros(0), 0.0
    idx = np.rint(cells_to_atlas(registration, coords.astype(float))).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    flat = np.ravel_multi_index(tuple(idx[inside].T), shape)
    hit, inverse = np.unique(flat, return_inverse=True)
    sums = np.bincount(inverse, weights=lengths[inside], minlength=len(hit))
    return hit, sums, float(lengths[~inside].sum())


def fibre_density_atlas(
    lengths_um,
    registration,
    *,
    factor=(1, 1, 1),
    radius_um: float = 0.0,
    kernel: str = "gaussian",
) -> AtlasFibreMap:
    """Map a skeleton's length into atlas space: fibre length density (mm/mm³) per atlas voxel.

    Every skeleton voxel is taken from the raw sample grid to the atlas with the point
    transform of the cells (:func:`~ketamap.wholebrain.register.cells_to_atlas`: the
    reorientation and scaling, then the registration's affine and B-spline), rounded
    to the nearest atlas voxel, and the lengths (µm) are summed per atlas voxel
    (``np.bincount``); divided by the voxel's volume this is the length density. The
    volume is read block by block: a block's skeleton voxels are mapped and summed
    before the next slab of blocks is read, so memory holds the map and the skeleton
    voxels of one slab of chunk rows, never the volume.

    Parameters
    ----------
    lengths_um : array_like or dask.array.Array of float, shape (z, y, x)
        Length per skeleton voxel (µm, 0 elsewhere): :func:`skeleton_lengths` of the
        skeleton, on the raw sample grid of ``registration``.
    registration : Registration
        The sample's registration (``register_into`` writes it; ``load_registration``).
    factor : tuple of 3 int
        Atlas voxels per map voxel along each axis (the block factor of
        :func:`~ketamap.stats.voxels.atlas_grid`); (1, 1, 1): the atlas grid itself.
    radius_um : float
        Smoothing as for the cell density maps (:func:`~ketamap.stats.voxels.density_map`:
        a Gaussian's SD or a sphere's radius, µm); 0: none.
    kernel : {"gaussian", "sphere"}
        Smoothing kernel.

    Returns
    -------
    AtlasFibreMap
        ``density_mm_per_mm3`` (float32, shape ``ceil(atlas shape / factor)``, atlas
        axis order), ``voxel_size_um`` of that grid, the total ``length_um``, the part
        ``length_in_atlas_um`` that lies in the atlas volume (the map's sum times the
        voxel volume, in mm, is this over 1000 when not smoothed) and
        ``n_skeleton_voxels``.

    Raises
    ------
    InputError
        If the volume is not on the registration's raw sample grid.
    ParameterError
        For a bad ``factor``, ``radius_um`` or ``kernel``.

    Examples
    --------
    A straight fibre of 100 µm along x, the identity registration onto a 10 µm atlas:

    >>> import SimpleITK as sitk
    >>> from ketamap.wholebrain.register import Registration
    >>> reg = Registration(sitk.Transform(3, sitk.sitkIdentity), (20, 20, 60), (2.0, 2.0, 2.0),
    ...                    "asr", (4, 4, 12), (10.0, 10.0, 10.0), "asr", qc={})
    >>> sk = np.zeros((20, 20, 60), np.uint8)
    >>> sk[10, 10, 5:56] = 1
    >>> found = fibre_density_atlas(skeleton_lengths(sk, (2.0, 2.0, 2.0)), reg)
    >>> round(float(found.density_mm_per_mm3.sum()) * 1e-6, 4)  # × voxel mm³: 0.1 mm
    0.1
    """
    from ketamap.stats.voxels import atlas_points_um, density_map

    arr = check_volume(lengths_um, "lengths_um")
    shape = tuple(int(n) for n in registration.sample_shape_vox)
    if tuple(arr.shape) != shape:
        raise InputError(
            f"The skeleton lengths have shape {tuple(arr.shape)} but the registration's sample "
            f"is {shape}: map the skeleton of the image that was registered."
        )
    f = np.asarray(factor)
    if f.shape != (3,) or not np.issubdtype(f.dtype, np.integer) or np.any(f < 1):
        raise ParameterError(f"factor must be three whole numbers >= 1, got {factor!r}.")
    atlas_shape = tuple(int(n) for n in registration.atlas_shape_vox)
    res = np.asarray(registration.atlas_resolution_um, dtype=float)
    hits, sums, outside, total, n_vox = [], [], 0.0, 0.0, 0

    def add(coords, lengths):
        nonlocal outside, total, n_vox
        hit, s, out = _atlas_sums(coords, lengths, registration, atlas_shape)
        hits.append(hit)
        sums.append(s)
        outside += out
        total += float(lengths.sum())
        n_vox += len(lengths)

    if not isinstance(arr, da.Array):
        add(*_skeleton_points(arr, (0, 0, 0)))
    else:  # block by block, one slab of chunk rows at a time (map_overlap keeps a share alive)
        starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in arr.chunks]
        blocks = arr.to_delayed()
        for rows in _slabs(len(arr.chunks[0])):
            parts = [
                dask.delayed(_skeleton_points)(
                    blocks[key], tuple(int(s[k]) for s, k in zip(starts, key))
                )
                for key in np.ndindex(blocks.shape)
                if key[0] in rows
            ]
            for coords, lengths in dask.compute(*parts):
                add(coords, lengths)  # mapped here: the transform is not shared by threads
    hit = np.concatenate(hits) if hits else np.zeros(0, np.int64)
    sums = np.concatenate(sums) if sums else np.zeros(0)
    flat, inverse = np.unique(hit, return_inverse=True)
    per_voxel_mm = np.bincount(inverse, weights=sums, minlength=len(flat)) * 1e-3
    points = np.stack(np.unravel_index(flat, atlas_shape), axis=1)
    grid = tuple(int(-(-n // int(k))) for n, k in zip(atlas_shape, f))
    vox = tuple(float(r * k) for r, k in zip(res, f))
    density = density_map(
        atlas_points_um(points, tuple(res), tuple(int(k) for k in f)),
        grid,
        voxel_size_um=vox,
        radius_um=radius_um,
        kernel=kernel,
        weights=per_voxel_mm,
    )
    return AtlasFibreMap(density, vox, total, total - outside, n_vox)


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
