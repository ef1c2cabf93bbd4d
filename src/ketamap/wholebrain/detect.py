"""Detect cell bodies (somata) in a whole-brain light-sheet volume, chunk by chunk.

The detector is a scale-matched band-pass filter followed by noise and
structure tests and 3D non-maximum suppression:

1. optional subtraction of the autofluorescence channel, scaled by a robust
   (Tukey) regression fitted on a strided sample of both volumes;
2. difference of Gaussians (DoG): a Gaussian matched to the soma size minus a
   wider one that estimates the local background, sigmas per axis in voxels
   (anisotropic voxels work), never below ``min_sigma_vox``;
3. local maxima of the band-passed signal in a box of half-width
   ``min_separation_um`` (ties broken by (z, y, x) order);
4. three tests at each maximum: ``snr`` = estimated soma peak intensity over
   the local raw noise SD (from the negative part of a Laplacian residual,
   which smooth structure does not reach); ``contrast`` = band-passed peak
   over the local SD of the band-passed signal's negative part (raised by
   edges, stripes and textured tissue); and a shape test: along every axis, on
   both sides, the band-passed signal must fall below ``1 - min_axis_drop`` of
   the peak within three soma diameters (planes, edges, stripes and fibres stay
   flat for longer along some axis);
5. the object's extent: along each axis through the maximum, the two points
   where the band-passed signal falls to half the peak; the centre is their
   midpoint (sub-voxel), wherever on a plateau the maximum fell;
6. splitting of touching cells: an object longer along an axis than one soma's
   response by more than half a soma diameter holds 1 + round(excess /
   diameter) cells along it, placed evenly (only on axes with at least 2 voxels
   per soma diameter);
7. centres closer than ``min_separation_um`` on every axis (two maxima on one
   object) are merged, keeping the stronger, after all chunks are gathered.

Every step is local, so the volume is processed in Dask chunks with an overlap
computed from the filter sizes; each maximum is reported by the one chunk
whose core holds it, and the result does not depend on the chunking.
Arrays are (z, y, x); physical sizes are in micrometres.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace

import dask
import dask.array as da
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy import special
from scipy.spatial import cKDTree

from ketamap.errors import InputError, ParameterError, require
from ketamap.io.volumes import check_volume, lazy_array
from ketamap.params import bounds, validate
from ketamap.space import check_voxel_size
from ketamap.wholebrain.tissue import find_tissue

__all__ = ["DetectionParams", "detect_cells", "flag_detection", "CELL_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns of the table returned by :func:`detect_cells`, all float64.
CELL_COLUMNS = (
    "z_vox",
    "y_vox",
    "x_vox",
    "z_um",
    "y_um",
    "x_um",
    "intensity",
    "snr",
    "contrast",
)

_TRUNCATE = 3.0  # Gaussian kernels are cut at 3 SDs (radius = int(3 sigma + 0.5) voxels) ...
_TRUNCATE_BACKGROUND = 2.5  # ... the background's at 2.5 (it only needs to be smooth)
_SIGMA_PER_DIAMETER = 1.0 / (2.0 * math.sqrt(3.0))  # 3D LoG/DoG scale of a ball: r / sqrt(3)
_MIN_OUTER_RATIO = 2.0  # background sigma >= 2x the soma sigma, per axis
_NOISE_K = 1.5  # noise window half-width = 1.5 background sigmas ...
_NOISE_MIN = 5  # ... and at least 5 voxels (an 11-voxel box), for stable estimates
_CENTROID_LEVEL = 0.5  # centre = midpoint of the half-maximum crossings of the band-pass
_WALK_DIAMETERS = 3.0  # ... searched up to this many soma diameters from the maximum
_MIN_SPLIT_VOXELS = 2.0  # split touching cells only along axes with >= 2 voxels per soma
_MIN_WALK = 2  # ... and at least this many voxels
_NOISE_SLAB = 2  # planes per slab of the noise fields (bounds their temporaries)
_RELATIVE_FLOOR = 1e-5  # noise floor relative to the local level: float32 round-off
_DEVICES = ("auto", "cpu", "cuda", "torch-cpu")
_SAMPLE_VOXELS = 250_000  # voxels sampled to fit the background-channel scale
_COARSE_MIN_SOMA_SIGMA = 1.5  # the soma-smoothed image is sampled finely enough for 2x ...
_COARSE_MIN_REST_SIGMA = 3.0  # ... and the background is wide enough to gain from it
_BG_FACTORS = (1, 2, 4)  # grid factors of the background, the coarsest one ...
_BG_MIN_COARSE_SIGMA = 2.0  # ... whose Gaussian is still this many coarse cells wide
_MIN_NEIGHBOUR_RATIO = 0.2  # the spike test runs on axes where a soma's neighbour holds this
_MAX_PIECES = 8  # most somata one object is split into
_MAX_MARKERS = 8  # other maxima that share an object's moment window, nearest first
_PATCH_DIV = 3.0  # moment window half-size: one imaged soma diameter (a third of the walk)
_MOMENT_FLOOR = 0.5  # moments weigh the object's half-maximum region (above half its peak)
_MODEL_CUT = 0.02  # one soma's response is modelled where it exceeds 2 % of its peak (its
# positive part: the shallow negative surround of the band-pass is left out)


@dataclass(frozen=True)
class DetectionParams:
    """Parameters of :func:`detect_cells`.

    Parameters
    ----------
    soma_diameter_um : float
        Expected soma diameter (µm); sets the matched Gaussian,
        sigma = diameter / (2√3) per axis.
    background_diameter_um : float
        Size (µm) of the smooth background removed by the band-pass; the wide
        Gaussian has sigma = diameter / (2√3), and at least twice the soma sigma.
    threshold_snr : float
        Minimum estimated soma peak intensity, in local raw noise SDs. The
        default (5.5) keeps pure-noise maxima rare even in a whole brain of
        10^8 voxels (a Gaussian tail beyond 5.5 SD has probability 2e-8).
    threshold_contrast : float
        Minimum band-passed peak, in SDs of the local band-passed fluctuations
        (rejects peaks that do not stand out from edges, stripes, texture).
    min_separation_um : float
        Two reported cells are at least this far apart along some axis (µm);
        the non-maximum suppression box has half-width max(1, round(d / voxel)).
    min_axis_drop : float
        Along every axis, on both sides, the band-passed signal must drop by
        this fraction of the peak within three soma diameters (0 disables the
        test).
    min_dip : float
        Two maxima of the band-passed signal closer than ``min_separation_um`` are two
        somata only if the signal dips between them by this fraction of the weaker peak
        (and by at least twice its noise SD); otherwise the weaker is dropped. The same
        saddle ends an object's extent, so touching somata are split at the valley.
        Default 0: the noise SD alone decides (a dim soma beside a bright one dips little).
    min_step_drop : float
        Along every axis, on both sides, the soma-smoothed intensity must fall by this
        many band-passed peaks within three soma diameters (a soma is a bump; the maximum
        beside a tile seam or on the bright side of the tissue edge is not). 0 disables.
    min_spike_extent : float
        Along every axis on which a soma spans several voxels, the two neighbours of the
        centre voxel must hold this share of what the smallest soma's profile predicts
        (within three noise SDs): hot pixels, cosmic hits and one-plane streaks fail.
        0 disables.
    qc_min_cells : int
        A brain in which fewer cells are found flags its detection (``flagged`` and
        ``reasons`` in the QC): an empty or near-empty result is a failure (a wrong
        channel, voxel size or soma diameter), not a finding. 0 disables.
    deblend : bool
        After the maxima are judged, subtract each found soma's modelled response (one
        imaged soma scaled to its band-passed peak) and search the residual once more: a
        dim soma beside a brighter one, whose peak sits on the neighbour's shoulder and
        is no maximum, becomes one where the residual exceeds the model, passes both
        thresholds and the spike test, and lies outside every found soma's suppression
        box. Costs a wider chunk overlap (the model's reach) and one subtraction per
        soma.
    tissue_mask : bool
        Find the tissue on a coarse grid (:func:`ketamap.wholebrain.tissue.find_tissue`,
        from the background channel when given, else the signal), skip chunks with no
        tissue and drop candidates outside it.
    tissue_block_um : float
        Block size of the coarse tissue mask (µm).
    tissue_floor_snr : float
        Floor on a candidate's estimated peak intensity, in SDs of the tissue's typical
        (median) noise: in the void the local noise is tiny and camera noise passes the
        local test; real somata are bright against the tissue. 0 disables.
    psf_sigma_um : tuple of float
        Blur of the microscope per axis (z, y, x), as a Gaussian sigma in µm: a soma is
        imaged as the soma convolved with it (light-sheet axial blur stretches somata
        along z). The gains, the spike test and the width of one soma's response (which
        decides the splitting of touching cells) use the blurred soma, so a single
        blurred soma is not split. The smoothing itself stays at the soma's own scale:
        the image already carries the blur, and blurring it again (the matched filter of
        the blurred soma) fills the dip between touching somata. Default: no blur.
    min_sigma_vox : float
        Smallest Gaussian sigma (voxels) on any axis, so that somata smaller
        than a voxel on coarse grids are still matched.
    chunk_size_vox : tuple of int
        Core size (z, y, x) of the chunks processed independently (voxels).
    device : str
        Where the two Gaussian filters (most of the arithmetic) run: ``"auto"`` (a CUDA
        GPU through PyTorch when both are present, else scipy on the CPU), ``"cpu"``
        (scipy), ``"cuda"`` / ``"cuda:N"`` (PyTorch on that GPU) or ``"torch-cpu"``
        (PyTorch on the CPU, to check the GPU path anywhere). Results agree within
        float32 rounding whichever is used.
    """

    soma_diameter_um: float = field(
        default=15.0, metadata=bounds(gt=0, doc="Expected soma diameter (µm).")
    )
    background_diameter_um: float = field(
        default=60.0,
        metadata=bounds(gt=0, doc="Scale of the smooth background removed (µm)."),
    )
    threshold_snr: float = field(
        default=5.5,
        metadata=bounds(gt=0, doc="Minimum soma peak intensity in local raw noise SDs."),
    )
    threshold_contrast: float = field(
        default=4.0,
        metadata=bounds(
            gt=0, doc="Threshold on the band-passed peak over its local fluctuation SD."
        ),
    )
    min_separation_um: float = field(
        default=10.0, metadata=bounds(gt=0, doc="Minimum distance between two cells (µm).")
    )
    min_axis_drop: float = field(
        default=0.25,
        metadata=bounds(
            ge=0, le=1, doc="Fraction of the peak the signal must drop along every axis."
        ),
    )
    min_dip: float = field(
        default=0.0,
        metadata=bounds(
            ge=0, lt=1, doc="Saddle depth (fraction of the weaker peak) that separates somata."
        ),
    )
    min_step_drop: float = field(
        default=0.5,
        metadata=bounds(
            ge=0, doc="Fall of the smoothed intensity on both sides, in band-passed peaks."
        ),
    )
    min_spike_extent: float = field(
        default=0.5,
        metadata=bounds(
            ge=0, le=1, doc="Share of a soma's profile the neighbours of a centre must hold."
        ),
    )
    qc_min_cells: int = field(
        default=10,
        metadata=bounds(ge=0, doc="A brain with fewer cells than this flags its detection."),
    )
    deblend: bool = field(
        default=True,
        metadata=bounds(doc="Subtract the found somata and search the residual once more."),
    )
    tissue_mask: bool = field(
        default=True,
        metadata=bounds(doc="Find the tissue and drop candidates outside it (the void)."),
    )
    tissue_block_um: float = field(
        default=50.0, metadata=bounds(gt=0, doc="Block size of the coarse tissue mask (µm).")
    )
    tissue_floor_snr: float = field(
        default=3.0,
        metadata=bounds(
            ge=0, doc="Minimum soma peak intensity in SDs of the tissue's typical noise."
        ),
    )
    psf_sigma_um: tuple[float, float, float] = field(
        default=(0.0, 0.0, 0.0),
        metadata=bounds(
            ge=0, doc="Blur of the microscope (z, y, x), Gaussian sigma in µm (0 = none)."
        ),
    )
    min_sigma_vox: float = field(
        default=0.5,
        metadata=bounds(gt=0, le=10, doc="Smallest Gaussian sigma on any axis (voxels)."),
    )
    chunk_size_vox: tuple[int, int, int] = field(
        default=(64, 384, 384),
        metadata=bounds(ge=1, doc="Core chunk size (z, y, x) processed at once (voxels)."),
    )
    device: str = field(
        default="auto",
        metadata=bounds(doc="Where the Gaussian filters run: auto, cpu, cuda[:N] or torch-cpu."),
    )

    def __post_init__(self):
        validate(self)
        if not (self.device in _DEVICES or self.device.startswith("cuda:")):
            raise ParameterError(
                f'DetectionParams.device must be one of {", ".join(_DEVICES)} or "cuda:N", '
                f'got "{self.device}".'
            )


@dataclass(frozen=True)
class _Plan:
    """Filter sizes in voxels, derived from the parameters and the voxel size."""

    sigma_soma: tuple[float, float, float]
    sigma_outer: tuple[float, float, float]
    radius_soma: tuple[int, int, int]
    coarse: tuple[int, int, int]  # grid factor (1 or 2) of the noise fields
    bg_coarse: tuple[int, int, int]  # grid factor (1, 2 or 4) of the background
    sigma_bg_coarse: tuple[float, float, float]  # the background's sigma on its grid
    radius_bg_coarse: tuple[int, int, int]
    radius_noise_coarse: tuple[int, int, int]  # noise window half-width (coarse cells)
    radius_max: tuple[int, int, int]
    margin: tuple[int, int, int]  # band-passed signal needed around a core (noise, box, walk)
    depth: tuple[int, int, int]
    split_spacing: tuple[float, float, float]  # soma diameter or one soma's response width
    split_axes: tuple[bool, bool, bool]  # axes that resolve a soma (>= 2 voxels across)
    walk: tuple[int, int, int]  # half-maximum search distance of the centre (voxels)
    axes_used: tuple[bool, bool, bool]  # axes longer than one voxel (for the noise residual)
    soma_gain: float = 1.0  # band-passed peak for a centred soma of unit peak intensity
    noise_gain: float = 1.0  # SD of the band-passed signal for unit white noise
    single_width: tuple[float, float, float] = (1.0, 1.0, 1.0)  # response half-max width
    # raw intensity one voxel from the centre of the smallest soma, relative to its peak
    neighbour_ratio: tuple[float, float, float] = (0.0, 0.0, 0.0)
    patch: tuple[int, int, int] = (1, 1, 1)  # half-size (voxels) of an object's moment window
    single_cov: tuple = ()  # covariance (µm²) of one soma's response in its window, 3 x 3
    pair_excess: tuple[float, float, float] = (0.0, 0.0, 0.0)  # two somata 1.25 d apart
    # band-passed response of one imaged soma, unit peak, cut where it is below 2 %
    model: np.ndarray | None = field(default=None, compare=False, repr=False)
    model_centre: tuple[int, int, int] = (0, 0, 0)
    # how far beyond the core maxima are judged (0 without deblending): every soma whose
    # model reaches a residual candidate in the core or its suppression box is known
    ext: tuple[int, int, int] = (0, 0, 0)


def _radius(sigma: float) -> int:
    return int(_TRUNCATE * sigma + 0.5)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _plan(
    voxel_size_um: tuple[float, float, float], params: DetectionParams, shape: tuple[int, ...]
) -> _Plan:
    s_um = params.soma_diameter_um * _SIGMA_PER_DIAMETER
    b_um = params.background_diameter_um * _SIGMA_PER_DIAMETER
    # the imaged soma: the soma's own Gaussian scale blurred by the microscope, per axis.
    # The smoothing is at the soma's own scale, not the imaged soma's (the matched filter):
    # the image carries the blur already, and a second blur fills the dip between touching
    # somata (recall of somata 1-1.5 diameters apart under a 4 µm axial blur: 0.78 -> 0.86,
    # benchmarks/bench_detect_artefacts.py); the gains and widths use the imaged soma.
    imaged_um = tuple(math.hypot(s_um, psf) for psf in params.psf_sigma_um)
    soma = tuple(max(s_um / v, params.min_sigma_vox) for v in voxel_size_um)
    outer = tuple(max(b_um / v, _MIN_OUTER_RATIO * s) for v, s in zip(voxel_size_um, soma))
    rest = [math.sqrt(o * o - s * s) for o, s in zip(outer, soma)]
    # The noise fields are smooth: where the soma-smoothed image is itself well sampled,
    # they are computed on a 2x coarser grid (block means), which costs a quarter of the
    # work per decimated pair of axes.
    coarse = tuple(
        2 if n > 1 and s >= _COARSE_MIN_SOMA_SIGMA and r >= _COARSE_MIN_REST_SIGMA else 1
        for n, s, r in zip(shape, soma, rest)
    )

    def bg_sigma(o: float, k: int) -> float:
        # block mean of k voxels adds (k^2 - 1) / 12 to the variance, the linear
        # interpolation back about k^2 / 6; the Gaussian on the coarse grid the rest
        return o if k == 1 else math.sqrt(max(o * o - (k * k - 1) / 12 - k * k / 6, 0.25)) / k

    # The background is the image smoothed at the outer scale, on the coarsest grid (a
    # multiple of the noise grid) whose Gaussian stays _BG_MIN_COARSE_SIGMA cells wide:
    # block means of the image, a Gaussian, linear interpolation back.
    bg = tuple(
        max([c] + [k for k in _BG_FACTORS if n > 1 and bg_sigma(o, k) >= _BG_MIN_COARSE_SIGMA])
        for n, o, c in zip(shape, outer, coarse)
    )
    bg_c = tuple(bg_sigma(o, k) for o, k in zip(outer, bg))
    r_soma = tuple(_radius(s) for s in soma)
    r_bg_c = tuple(int(_TRUNCATE_BACKGROUND * s + 0.5) for s in bg_c)
    r_bg = tuple(r if k == 1 else k * (r + 1) + k for r, k in zip(r_bg_c, bg))
    r_noise_c = tuple(
        -(-max(int(math.ceil(_NOISE_K * o)), _NOISE_MIN) // k) for o, k in zip(outer, coarse)
    )
    r_noise = tuple(r if k == 1 else k * (r + 1) + k for r, k in zip(r_noise_c, coarse))
    r_max = tuple(max(1, round(params.min_separation_um / v)) for v in voxel_size_um)
    # The band-passed value at a voxel needs max(r_soma, r_bg) voxels of input around it;
    # the noise map adds r_noise, the maximum test (with its tie-break) r_max, the centroid 1.
    # one imaged soma diameter per axis (the soma diameter when there is no blur)
    diameter_um = tuple(i / _SIGMA_PER_DIAMETER for i in imaged_um)
    step = tuple(max(1, round(d / v)) for d, v in zip(diameter_um, voxel_size_um))
    walk = tuple(
        max(_MIN_WALK, int(math.ceil(_WALK_DIAMETERS * d / v)))
        for d, v in zip(diameter_um, voxel_size_um)
    )
    margin = tuple(
        _round_up(max(n, m, st, w, 1), k)
        for n, m, st, w, k in zip(r_noise, r_max, step, walk, coarse)
    )
    depth = tuple(_round_up(max(a, b) + m, k) for a, b, m, k in zip(r_soma, r_bg, margin, bg))
    plan = _Plan(
        sigma_soma=soma,
        sigma_outer=outer,
        radius_soma=r_soma,
        coarse=coarse,
        bg_coarse=bg,
        sigma_bg_coarse=bg_c,
        radius_bg_coarse=r_bg_c,
        radius_noise_coarse=r_noise_c,
        radius_max=r_max,
        margin=margin,
        depth=depth,
        split_spacing=(0.0, 0.0, 0.0),
        split_axes=tuple(
            n > 1 and params.soma_diameter_um / v >= _MIN_SPLIT_VOXELS
            for n, v in zip(shape, voxel_size_um)
        ),
        walk=walk,
        axes_used=tuple(n > 1 for n in shape),
        # a soma of diameter d images as a Gaussian of sigma d / 4 (its FWHM is 0.59 d)
        # blurred by the microscope; its profile one voxel away, per axis
        neighbour_ratio=tuple(
            math.exp(-0.5 * (v / math.hypot(params.soma_diameter_um / 4, psf)) ** 2)
            if n > 1
            else 0.0
            for n, v, psf in zip(shape, voxel_size_um, params.psf_sigma_um)
        ),
    )
    soma_gain, noise_gain, width, (resp, at) = _gains(plan, voxel_size_um, imaged_um)
    plan = replace(
        plan,
        soma_gain=soma_gain,
        noise_gain=noise_gain,
        single_width=width,
        split_spacing=tuple(
            max(params.soma_diameter_um / v, w) for v, w in zip(voxel_size_um, width)
        ),
        patch=tuple(max(1, round(w / _PATCH_DIV)) for w in walk),
    )
    # The moments of one soma's response (in a window of one imaged diameter), and the
    # extra variance of two somata 1.25 diameters apart along each axis (the middle of the
    # 1-1.5 diameters of touching somata), computed by the function that measures the
    # candidates.
    vs = np.asarray(voxel_size_um, dtype=np.float64)
    centre = np.asarray([at])
    unit = resp / resp[at]
    keep = np.argwhere(np.abs(unit) >= _MODEL_CUT)
    lo_m, hi_m = keep.min(axis=0), keep.max(axis=0) + 1
    plan = replace(
        plan,
        model=unit[tuple(slice(a, b) for a, b in zip(lo_m, hi_m))].astype(np.float32),
        model_centre=tuple(int(a - lo) for a, lo in zip(at, lo_m)),
    )
    resp = resp.astype(np.float32)
    _, single = _object_moments(resp, centre, np.asarray([resp[at]]), plan, vs, markers=False)
    excess = []
    for a in range(3):
        half = 0.625 * params.soma_diameter_um / vs[a]
        if not plan.split_axes[a]:
            excess.append(0.0)
            continue
        move = np.zeros(3)
        move[a] = half
        pair = ndi.shift(resp, move, order=1) + ndi.shift(resp, -move, order=1)
        _, cov = _object_moments(pair, centre, np.asarray([pair[at]]), plan, vs, markers=False)
        excess.append(float(cov[0, a, a] - single[0, a, a]))
    plan = replace(plan, single_cov=tuple(map(tuple, single[0])), pair_excess=tuple(excess))
    if not params.deblend:
        return plan
    mc = np.asarray(plan.model_centre)
    reach = np.maximum(mc, np.asarray(plan.model.shape) - 1 - mc)  # the model's half-size
    ext = tuple(
        _round_up(int(h) + 1 + r, k) if n > 1 else 0
        for h, r, k, n in zip(reach, plan.radius_max, plan.coarse, shape)
    )
    return replace(
        plan,
        ext=ext,
        margin=tuple(m + e for m, e in zip(plan.margin, ext)),
        depth=tuple(_round_up(d + e, k) for d, e, k in zip(plan.depth, ext, plan.bg_coarse)),
    )


def _block_mean(a: np.ndarray, coarse: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``coarse`` voxels, a power of 2 per axis.

    Pairs are averaged as often as needed (the last pair of an odd length repeats the
    edge voxel).
    """
    for axis, k in enumerate(coarse):
        while k > 1:
            n = a.shape[axis]
            if n % 2:
                a = np.concatenate([a, np.take(a, [n - 1], axis=axis)], axis=axis)
            lo = a[(slice(None),) * axis + (slice(0, None, 2),)]
            hi = a[(slice(None),) * axis + (slice(1, None, 2),)]
            a = (lo + hi) * np.float32(0.5)
            k //= 2
    return a


def _upsample(c: np.ndarray, coarse: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of a coarse field (cell-centred) back onto the fine grid.

    With a factor of k, fine voxel k j + p lies t = (p + 1/2) / k - 1/2 cells from the
    centre of coarse cell j: c[j] + |t| (c[j -/+ 1] - c[j]) (for k = 2, 0.75 c[j] +
    0.25 c[j -/+ 1]), the edge cells repeated.
    """
    for axis, k in enumerate(coarse):
        if k == 1:
            continue

        def along(s: slice, axis=axis) -> tuple:
            return (slice(None),) * axis + (s,)

        n = c.shape[axis]
        up = np.empty(c.shape[:axis] + (k * n,) + c.shape[axis + 1 :], dtype=c.dtype)
        diff = np.subtract(c[along(slice(1, None))], c[along(slice(None, -1))])
        for p in range(k):
            t = (p + 0.5) / k - 0.5
            step = diff * np.float32(abs(t))
            if t < 0:  # towards the previous cell; the first cell repeats itself
                np.subtract(c[along(slice(1, None))], step, out=up[along(slice(p + k, None, k))])
                up[along(slice(p, p + 1))] = c[along(slice(0, 1))]
            else:  # towards the next cell; the last cell repeats itself
                np.add(c[along(slice(None, -1))], step, out=up[along(slice(p, (n - 1) * k, k))])
                up[along(slice((n - 1) * k + p, (n - 1) * k + p + 1))] = c[along(slice(-1, None))]
        c = up[along(slice(0, shape[axis]))]
    return c


def _bandpass(x: np.ndarray, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """Return the soma-scale Gaussian ``g1`` and the smooth background ``g2`` of ``x``.

    The band-passed signal is ``g1 - g2``; ``g2`` is ``x`` smoothed at the outer scale,
    on the grid of ``plan.bg_coarse`` (aligned to the array's first voxel).
    """
    g1 = ndi.gaussian_filter(x, plan.sigma_soma, mode="reflect", radius=plan.radius_soma)
    return g1, _upsample(_coarse_background(x, plan), plan.bg_coarse, g1.shape)


def _coarse_background(x: np.ndarray, plan: _Plan, device=None) -> np.ndarray:
    """``x`` smoothed to the background scale, on its coarse grid (before interpolation)."""
    c = _block_mean(x, plan.bg_coarse)
    return _gaussian(c, plan.sigma_bg_coarse, plan.radius_bg_coarse, device)


def _nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded (Linux) or its tool is on the PATH."""
    import shutil

    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def _torch_device(name: str):
    """Return the PyTorch device for ``DetectionParams.device`` (None: scipy on the CPU)."""
    if name == "cpu":
        return None
    if name == "auto" and not _nvidia_driver():
        return None  # no GPU to find: do not pay for importing PyTorch
    try:
        torch = require(
            "torch",
            needed_for=f'DetectionParams.device = "{name}"',
            install="torch",
            what="PyTorch",
            otherwise=' or use device = "cpu"',
        )
    except ParameterError:
        if name == "auto":
            return None
        raise
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    if name == "torch-cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParameterError(f'DetectionParams.device = "{name}" but PyTorch sees no CUDA GPU.')
    return torch.device(name)


def _gaussian(x: np.ndarray, sigma, radius, device=None) -> np.ndarray:
    """Separable Gaussian filter, scipy's ``mode="reflect"``, on the CPU or a torch device."""
    if device is None or any(n <= r for n, r in zip(x.shape, radius)):
        return ndi.gaussian_filter(x, sigma, mode="reflect", radius=radius)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    for axis, (s, r) in enumerate(zip(sigma, radius)):
        if r == 0:
            continue
        w = np.exp(-0.5 * (np.arange(-r, r + 1) / s) ** 2)
        kernel = torch.as_tensor(w / w.sum(), dtype=torch.float32, device=device)
        t = t.movedim(axis, -1)
        shape = t.shape
        rows = t.reshape(-1, 1, shape[-1])
        # scipy's "reflect" repeats the edge voxel: d c b a | a b c d | d c b a
        rows = torch.cat([rows[..., :r].flip(-1), rows, rows[..., -r:].flip(-1)], dim=-1)
        rows = torch.nn.functional.conv1d(rows, kernel.view(1, 1, -1))
        t = rows.reshape(shape).movedim(-1, axis).contiguous()
    return t.cpu().numpy()


def _gains(plan: _Plan, voxel_size_um, sigma_um: tuple) -> tuple[float, float, tuple, tuple]:
    """Band-pass response to a centred unit-peak soma, white-noise gain, response width.

    Also returns the response itself and its centre voxel.

    The gain is the kernel's L2 norm; the width (voxels, per axis) is that of the
    band-passed image of the soma at half its maximum. On coarse axes the operator
    depends on the position relative to the background's grid: all phases are averaged.
    """
    reach = tuple(
        _round_up(rs + (rr + 2) * k + 2, max(_BG_FACTORS))
        for rs, rr, k in zip(plan.radius_soma, plan.radius_bg_coarse, plan.bg_coarse)
    )
    shape = tuple(2 * h + 2 for h in reach)

    def profile(n: int, centre: int, v: float, sigma: float) -> np.ndarray:
        edges = (np.arange(n + 1) - centre - 0.5) * v / (sigma * math.sqrt(2.0))
        p = np.diff(special.erf(edges))
        return p / p[centre]

    soma_gain, noise_sq, resp0 = [], [], None
    for phase in (tuple(p % k for k in plan.bg_coarse) for p in range(max(plan.bg_coarse))):
        at = tuple(h + ph for h, ph in zip(reach, phase))
        delta = np.zeros(shape, dtype=np.float32)
        delta[at] = 1.0
        g1, g2 = _bandpass(delta, plan)
        kernel = (g1 - g2).astype(np.float64)
        noise_sq.append((kernel**2).sum())
        pz, py, px = (
            profile(n, c, v, sg) for n, c, v, sg in zip(shape, at, voxel_size_um, sigma_um)
        )
        blob = pz[:, None, None] * py[None, :, None] * px[None, None, :]
        g1, g2 = _bandpass(blob.astype(np.float32), plan)
        resp = (g1 - g2).astype(np.float64)
        soma_gain.append(resp[at])
        if resp0 is None:
            resp0 = (resp, at)
    resp, at = resp0
    widths = []
    for a in range(3):
        line = np.moveaxis(resp, a, 0)[(slice(None),) + tuple(at[b] for b in range(3) if b != a)]
        c, top = at[a], line[at[a]]
        side = []
        for sign in (-1, 1):
            k = 1
            while 0 <= c + sign * (k) < len(line) and line[c + sign * k] >= 0.5 * top:
                k += 1
            if not 0 <= c + sign * k < len(line):
                side.append(float(k))
                continue
            prev, cur = line[c + sign * (k - 1)], line[c + sign * k]
            side.append(k - 1 + float((prev - 0.5 * top) / (prev - cur)))
        widths.append(side[0] + side[1])
    return (
        float(np.mean(soma_gain)),
        float(np.sqrt(np.mean(noise_sq))),
        tuple(widths),
        (resp, at),
    )


def _mask_on_grid(tissue, coords: list[np.ndarray]) -> np.ndarray:
    """Read the tissue mask at the grid of voxel coordinates ``coords`` (one array per axis)."""
    index = [
        np.clip(np.floor_divide(np.rint(c).astype(np.int64), b), 0, n - 1)
        for c, b, n in zip(coords, tissue.block_vox, tissue.mask.shape)
    ]
    return tissue.mask[np.ix_(*index)]


# log10 bins of the noise histogram: 0.2 % wide, from 1e-6 to 1e8 input units
_NOISE_EDGES = np.linspace(-6.0, 8.0, 7001)


def _noise_histogram(
    var: np.ndarray, scale: float, inside: np.ndarray | None
) -> tuple[int, np.ndarray]:
    """Count the SDs sqrt(scale x var) in the log10 bins of ``_NOISE_EDGES``, where ``inside``.

    Plane by plane along the first axis, so the temporaries stay a plane in size. Returns
    the first non-empty bin and the counts from there to the last non-empty one: the
    results of all chunks are held until the last is done, and a chunk's noise spans a few
    hundred of the 7,000 bins.
    """
    n_bins = len(_NOISE_EDGES) - 1
    width = (_NOISE_EDGES[-1] - _NOISE_EDGES[0]) / n_bins
    counts = np.zeros(n_bins, dtype=np.int64)
    for i in range(len(var)):
        plane = var[i] if inside is None else var[i][inside[i]]
        logs = np.log10(np.maximum(plane * np.float32(scale), np.float32(1e-12)))
        logs = (0.5 * logs - np.float32(_NOISE_EDGES[0])) * np.float32(1 / width)
        counts += np.bincount(
            np.clip(logs, 0, n_bins - 1).astype(np.int32).ravel(), minlength=n_bins
        )
    used = np.flatnonzero(counts)
    if len(used) == 0:
        return 0, counts[:0]
    return int(used[0]), counts[used[0] : used[-1] + 1].copy()


def _sum_histograms(parts) -> np.ndarray:
    """Add the ``(first bin, counts)`` parts of :func:`_noise_histogram` into one histogram."""
    total = np.zeros(len(_NOISE_EDGES) - 1, dtype=np.int64)
    for first, counts in parts:
        total[first : first + len(counts)] += counts
    return total


def _histogram_median(hist: np.ndarray) -> float:
    """Median of the values binned in ``hist`` (bin centre), NaN for an empty histogram."""
    total = hist.sum()
    if total == 0:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(hist), 0.5 * total))
    return float(10 ** (0.5 * (_NOISE_EDGES[i] + _NOISE_EDGES[i + 1])))


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: np.empty(0, dtype=np.float64) for c in CELL_COLUMNS})


def _axis_chunks(
    n: int, size: int, depth: int, axis: int, grid: int = 1
) -> tuple[tuple[int, ...], int]:
    """Chunks along one axis with every chunk >= depth; returns (chunks, depth used).

    The axis is cut into ``ceil(n / size)`` chunks of near-equal length (fewer if they
    would be thinner than ``depth``). Chunks but the last are whole multiples of ``grid``
    voxels, so that every chunk starts on the coarse grid.
    """
    if n <= size:
        return (n,), 0  # a single chunk needs no overlap on this axis
    if size < depth:
        # fine sampling along this axis (e.g. 1 µm planes) needs a deeper overlap than the
        # chunk: a chunk thinner than its overlap would be mostly overlap, so it grows
        log.info(
            "detect_cells: chunk_size_vox[%d] = %d is smaller than the overlap depth %d "
            "voxels the filters need on that axis; using %d",
            axis,
            size,
            depth,
            depth,
        )
        size = depth
    size = max(_round_up(size, grid), grid)
    # as many chunks as the size asks for, of near-equal lengths (no thin remainder, which
    # would be mostly overlap), each at least the depth
    count = max(1, min(-(-n // size), n // depth))
    bounds = [i * n // count // grid * grid for i in range(count)] + [n]
    chunks = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if len(chunks) > 1 and min(chunks) < depth:  # rounding to the grid: one chunk fewer
        return _axis_chunks(n, -(-n // (count - 1)) + grid, depth, axis, grid)
    if len(chunks) == 1:
        return chunks, 0
    return chunks, depth


def _as_dask(array, name: str) -> da.Array:
    arr = check_volume(array, name)
    if isinstance(arr, np.ndarray):
        arr = lazy_array(arr, chunks=arr.shape)
    return arr


def _robust_slope(signal: np.ndarray, background: np.ndarray) -> float:
    """Slope of signal ~ a * background + b by iteratively reweighted least squares (Tukey)."""
    s = signal.astype(np.float64).ravel()
    b = background.astype(np.float64).ravel()
    keep = np.isfinite(s) & np.isfinite(b)
    s, b = s[keep], b[keep]
    if s.size < 3 or np.ptp(b) == 0:
        return 0.0
    w = np.ones_like(s)
    slope = 0.0
    for _ in range(20):
        sw = w.sum()
        mb, ms = (w * b).sum() / sw, (w * s).sum() / sw
        var_b = (w * (b - mb) ** 2).sum()
        if var_b <= 0:
            break
        new = (w * (b - mb) * (s - ms)).sum() / var_b
        resid = s - ms - new * (b - mb)
        scale = 1.4826 * np.median(np.abs(resid - np.median(resid)))
        if scale <= 0:
            slope = new
            break
        u = resid / (4.685 * scale)
        w = np.where(np.abs(u) < 1, (1 - u * u) ** 2, 0.0)
        converged = abs(new - slope) <= 1e-6 * max(abs(new), 1e-12)
        slope = new
        if converged or w.sum() < 3:
            break
    return max(float(slope), 0.0)


def _background_scale(signal: da.Array, background: da.Array) -> float:
    step = max(1, int(round((signal.size / _SAMPLE_VOXELS) ** (1 / 3))))
    sample = (slice(None, None, step),) * 3
    s, b = dask.compute(signal[sample], background[sample])
    return _robust_slope(np.asarray(s), np.asarray(b))


def _suppress_duplicates(cells: pd.DataFrame, min_separation_um: float) -> pd.DataFrame:
    """Keep the strongest of cells whose centres lie within min_separation_um on every axis."""
    if len(cells) < 2:
        return cells
    from scipy.spatial import cKDTree

    xyz = cells[["z_um", "y_um", "x_um"]].to_numpy()
    radius = min_separation_um * (1 - 1e-9)
    pairs = cKDTree(xyz).query_pairs(radius, p=np.inf, output_type="ndarray")
    if len(pairs) == 0:
        return cells
    # rank: stronger first; ties by (z, y, x) order, which the table is already sorted by
    order = np.lexsort((np.arange(len(cells)), -cells["intensity"].to_numpy()))
    rank = np.empty(len(cells), dtype=np.int64)
    rank[order] = np.arange(len(cells))
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs.tolist():
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    keep = np.ones(len(cells), dtype=bool)
    involved = np.fromiter(neighbours, dtype=np.int64)
    # greedy, strongest first: a cell survives unless a stronger surviving cell is near
    for i in involved[np.argsort(rank[involved])].tolist():
        if keep[i]:
            for j in neighbours[i]:
                if rank[j] > rank[i]:
                    keep[j] = False
    return cells[keep].reset_index(drop=True)


def _box_test(
    f: np.ndarray,
    pos: np.ndarray,
    peak: np.ndarray,
    offsets: np.ndarray,
    *,
    ties: bool,
    dip: np.ndarray | None = None,
) -> np.ndarray:
    """Whether each voxel ``pos`` is >= ``f`` at every offset (clipped to the array).

    With ``ties``, a voxel that has an equal value at an offset earlier in (z, y, x)
    order (inside the array) fails too. With ``dip`` (one height per voxel), a higher
    voxel counts only if ``f`` stays above ``peak - dip`` on the straight segment between
    the two (sampled at the nearest voxels): a saddle of that depth makes them separate
    objects.
    """
    ok = np.ones(len(pos), dtype=bool)
    earlier = _lex_earlier(offsets)
    shape = np.asarray(f.shape)
    if dip is not None:
        steps = np.abs(offsets).max(axis=1)
        n_mid = max(int(steps.max()) - 1, 1)
        t = np.arange(1, n_mid + 1)[None, :, None] / steps[:, None, None]
        mid = np.rint(offsets[:, None, :] * np.minimum(t, 1.0)).astype(offsets.dtype)
    per = len(offsets) * (1 if dip is None else 1 + n_mid)
    step = max(1, 2**20 // max(per, 1))
    reach = np.abs(offsets).max(axis=0)
    for start in range(0, len(pos), step):
        p = pos[start : start + step]
        top = peak[start : start + step, None]
        nb = p[:, None, :] + offsets[None, :, :]
        # only boxes that cross the array's edge need clipping
        edge = np.flatnonzero(np.any((p < reach) | (p >= shape - reach), axis=1))
        inside = np.ones(nb.shape[:2], dtype=bool)
        if len(edge):
            inside[edge] = np.all((nb[edge] >= 0) & (nb[edge] < shape), axis=2)
            nb[edge] = np.clip(nb[edge], 0, shape - 1)
        vals = f[nb[..., 0], nb[..., 1], nb[..., 2]]
        bad = vals > top
        if ties:
            bad |= inside & earlier[None, :] & (vals == top)
        if dip is not None and bad.any():
            # only the (candidate, higher voxel) pairs: is there a saddle between them?
            rr, oo = np.nonzero(bad)
            q = p[rr][:, None, :] + mid[oo]
            np.clip(q, 0, shape - 1, out=q)
            low = f[q[..., 0], q[..., 1], q[..., 2]].min(axis=1)
            saddle = low < (top[rr, 0] - dip[start : start + step][rr])
            bad[rr[saddle], oo[saddle]] = False
        ok[start : start + step] = ~bad.any(axis=1)
    return ok


def _lex_earlier(offsets: np.ndarray) -> np.ndarray:
    """For each (dz, dy, dx) offset, whether it points to a voxel earlier in (z, y, x) order."""
    dz, dy, dx = offsets.T
    return (dz < 0) | ((dz == 0) & (dy < 0)) | ((dz == 0) & (dy == 0) & (dx < 0))


def _rays(a: np.ndarray, pos: np.ndarray, axis: int, sign: int, n: int):
    """Values of ``a`` at 1..n voxels from each ``pos`` along ``axis`` (clipped), and inside."""
    k = np.arange(1, n + 1)
    q = np.repeat(pos[:, None, :], n, axis=1)
    q[:, :, axis] += sign * k[None, :]
    inside = (q[:, :, axis] >= 0) & (q[:, :, axis] < a.shape[axis])
    q[:, :, axis] = np.clip(q[:, :, axis], 0, a.shape[axis] - 1)
    return a[q[..., 0], q[..., 1], q[..., 2]].astype(np.float64), inside


def _half_max_extents(
    f: np.ndarray,
    pos: np.ndarray,
    peak: np.ndarray,
    plan: _Plan,
    level: float = 0.5,
    valley: np.ndarray | None = None,
    edge: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (n, 3) from each maximum to where f falls below level x peak, below and above.

    Linear interpolation between voxels; the volume edge counts as a crossing half a voxel
    beyond the last voxel; no crossing within plan.walk voxels gives plan.walk. Axes that
    are not searched (a single plane) get 0.5 on both sides. With ``valley`` (one height
    per maximum), a walk that climbs more than that height above the lowest value it has
    passed stops there: the object ends at the saddle to its neighbour. ``edge`` (n, 3,
    bool), when given, is set where the walk on either side ended at the volume edge.
    """
    lo = np.full(pos.shape, 0.5, dtype=np.float64)
    hi = np.full(pos.shape, 0.5, dtype=np.float64)
    if edge is not None:
        edge[:] = False
    if len(pos) == 0:
        return lo, hi
    half = level * peak
    rows = np.arange(len(pos))
    for a in range(3):
        n_walk = plan.walk[a]
        if not plan.axes_used[a] or n_walk < 1:
            continue
        edges = []
        for sign in (-1, 1):
            v, inside = _rays(f, pos, a, sign, n_walk)
            below = (v < half[:, None]) | ~inside
            first = np.where(below.any(axis=1), below.argmax(axis=1), n_walk)  # index into k
            prev = np.where(first > 0, v[rows, np.maximum(first - 1, 0)], peak)
            j = np.minimum(first, n_walk - 1)
            cur = v[rows, j]
            crossed = first < n_walk
            out = crossed & ~inside[rows, j]
            # linear interpolation between the last voxel above half and the first below;
            # the volume edge counts as a crossing half a voxel beyond the last voxel
            denom = prev - cur
            t = np.divide(prev - half, denom, out=np.full_like(prev, 0.5), where=denom > 0)
            dist = np.where(crossed, first + np.clip(t, 0.0, 1.0), n_walk)
            dist = np.where(out, first + 0.5, dist)
            if edge is not None:
                edge[:, a] |= out
            if valley is not None:
                low = np.minimum.accumulate(np.where(inside, v, np.inf), axis=1)
                rise = inside & (v > low + valley[:, None])
                at = np.where(rise.any(axis=1), rise.argmax(axis=1), n_walk)
                # the saddle: where the lowest value before the rise was reached (distance
                # index + 1 voxels from the maximum)
                before = np.arange(n_walk)[None, :] < at[:, None]
                saddle = np.where(
                    at < n_walk, np.argmin(np.where(before, v, np.inf), axis=1) + 1.0, n_walk
                )
                dist = np.minimum(dist, saddle)
            edges.append(dist)
        lo[:, a], hi[:, a] = edges
    return lo, hi


def _object_moments(
    f: np.ndarray,
    pos: np.ndarray,
    peak: np.ndarray,
    plan: _Plan,
    vs: np.ndarray,
    *,
    markers: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (voxels, from ``pos``) and covariance (µm²) of each object's signal.

    The weights are the band-passed signal above ``_MOMENT_FLOOR`` x the peak (half:
    the object's half-maximum region, so a plateau it sits on, such as the bright rim
    under the tissue surface, does not read as an elongated object) in a window of
    ``plan.patch`` voxels around each maximum (voxels outside the array weigh nothing).
    With ``markers``, a voxel counts only if no other local maximum of ``f`` above that
    floor is nearer to it (in µm) than this maximum: a neighbour that has a
    maximum of its own keeps its voxels.
    """
    n = len(pos)
    mean = np.zeros((n, 3))
    cov = np.zeros((n, 3, 3))
    if n == 0:
        return mean, cov
    half = np.asarray(plan.patch)
    shape_p = tuple(2 * half + 1)
    grid = np.mgrid[tuple(slice(-h, h + 1) for h in half)].reshape(3, -1).T
    um = grid * vs
    centre = int(np.ravel_multi_index(tuple(half), shape_p))
    shape = np.asarray(f.shape)
    windows = None
    if np.all(shape >= 2 * half + 1):
        windows = np.lib.stride_tricks.sliding_window_view(f, tuple(2 * half + 1))
    step = max(1, 2**21 // len(grid))
    for start in range(0, n, step):
        p = pos[start : start + step]
        top = peak[start : start + step]
        # windows that lie inside the array are cut as strided views (one gather per
        # window, not per voxel); the few at the array's edge voxel by voxel
        fits = np.all((p - half >= 0) & (p + half < shape), axis=1) & (windows is not None)
        v = np.empty((len(p), len(grid)), dtype=np.float32)
        inside = np.ones((len(p), len(grid)), dtype=bool)
        if fits.any():
            lo = p[fits] - half
            v[fits] = windows[lo[:, 0], lo[:, 1], lo[:, 2]].reshape(int(fits.sum()), -1)
        if not fits.all():
            q = p[~fits][:, None, :] + grid[None]
            inside[~fits] = np.all((q >= 0) & (q < shape), axis=2)
            np.clip(q, 0, shape - 1, out=q)
            v[~fits] = f[q[..., 0], q[..., 1], q[..., 2]]
        floor = _MOMENT_FLOOR * top[:, None]
        w = np.where(inside, np.maximum(v - floor, 0), 0).astype(np.float64)
        if markers:
            v = np.where(inside, v, -np.inf).reshape(len(p), *shape_p)
            top_n = ndi.maximum_filter(v, size=(1, 3, 3, 3), mode="nearest")
            mark = (v == top_n) & (v >= _MOMENT_FLOOR * top[:, None, None, None])
            mark = mark.reshape(len(p), -1)
            mark[:, centre] = False
            own = np.sum(um * um, axis=1)  # squared distance to this object's maximum
            rows = np.nonzero(mark.any(axis=1))[0]
            if len(rows):
                # up to _MAX_MARKERS other maxima per window, the nearest first
                k = min(_MAX_MARKERS, len(own))
                score = np.where(mark[rows], own[None, :], np.inf)
                idx = np.argpartition(score, k - 1, axis=1)[:, :k]
                valid = np.isfinite(np.take_along_axis(score, idx, axis=1))
                others = um[idx].astype(np.float32)  # (rows, k, 3), µm from the maximum
                # a voxel u is nearer the maximum (origin) than marker o iff u.o <= |o|^2 / 2
                dots = others[:, :, 0, None] * um[None, None, :, 0].astype(np.float32)
                for a in (1, 2):
                    dots += others[:, :, a, None] * um[None, None, :, a].astype(np.float32)
                half_sq = 0.5 * np.sum(others * others, axis=2)
                nearer = (dots <= half_sq[:, :, None]) | ~valid[:, :, None]
                w[rows] *= nearer.all(axis=1)
        total = w.sum(axis=1)
        total = np.where(total > 0, total, 1.0)
        # (einsum, not a BLAS product: BLAS threads would contend with the Dask workers)
        m_um = np.einsum("np,pa->na", w, um) / total[:, None]
        d = um[None, :, :] - m_um[:, None, :]
        cov[start : start + step] = np.einsum("np,npa,npb->nab", w, d, d) / total[:, None, None]
        mean[start : start + step] = m_um / vs
    return mean, cov


def _spike_test(
    x: np.ndarray, back: tuple[slice, ...], g2: np.ndarray, c: dict, plan: _Plan, extent: float
) -> np.ndarray:
    """Whether each candidate spans more than one voxel on every axis a soma resolves.

    ``x`` is the raw block around the work region W (``back`` is W inside it), ``g2`` the
    background on W, ``c`` the candidates (``pos`` in W coordinates, ``raw_sd``).
    """
    pos = c["pos"]
    off = np.asarray([s.start for s in back])
    centre_at = pos + off
    base = g2[pos[:, 0], pos[:, 1], pos[:, 2]].astype(np.float64)
    centre = x[centre_at[:, 0], centre_at[:, 1], centre_at[:, 2]] - base
    ok = np.ones(len(pos), dtype=bool)
    shape = np.asarray(x.shape)
    for a, ratio in enumerate(plan.neighbour_ratio):
        if ratio < _MIN_NEIGHBOUR_RATIO:
            continue  # a soma is about one voxel thick along this axis: nothing to test
        side = []
        for sign in (-1, 1):
            q = centre_at.copy()
            q[:, a] = np.clip(q[:, a] + sign, 0, shape[a] - 1)
            side.append(x[q[:, 0], q[:, 1], q[:, 2]] - base)
        mean = 0.5 * (side[0] + side[1])
        ok &= mean >= extent * ratio * centre - 3.0 * c["raw_sd"] / math.sqrt(2.0)
    return ok


def _step_test(f: np.ndarray, g2: np.ndarray, c: dict, plan: _Plan, drop: float) -> np.ndarray:
    """Whether the soma-smoothed image g1 = f + g2 falls by drop x peak on both sides, per axis."""
    pos, peak = c["pos"], c["peak"]
    top = peak + g2[pos[:, 0], pos[:, 1], pos[:, 2]]
    need = top - drop * peak
    ok = np.ones(len(pos), dtype=bool)
    for a in range(3):
        if not plan.split_axes[a]:
            continue  # a soma narrower than 2 voxels: a bump on a ramp falls on one side only
        for sign in (-1, 1):
            v, inside = _rays(f, pos, a, sign, plan.walk[a])
            v += _rays(g2, pos, a, sign, plan.walk[a])[0]
            ok &= ((v <= need[:, None]) & inside).any(axis=1) | ~inside.all(axis=1)
    return ok


def _negative_power(
    a: np.ndarray, axes: list[int], crop: tuple[slice, ...] | None, coarse: tuple[int, int, int]
) -> np.ndarray:
    """Coarse-grid block means of min(r, 0)^2, r = ``a`` minus the mean of its neighbours.

    The neighbours are those along ``axes`` (none: r = a; the array's edge voxel is its
    own neighbour beyond the edge), the result is cropped to ``crop``. Computed in slabs
    of a few planes along z, so only slab-sized temporaries are made.
    """
    crop = crop or tuple(slice(0, n) for n in a.shape)
    z_lo, z_hi = crop[0].start, crop[0].stop
    step = coarse[0] * max(1, _NOISE_SLAB // coarse[0])
    out = []
    for z0 in range(z_lo, z_hi, step):
        box = (slice(z0, min(z0 + step, z_hi)), *crop[1:])
        v = a[box]
        if axes:
            # r = v - mean over axes of (previous + v + next) / 3
            #   = 2/3 v - (sum of the 2n neighbours) / 3n  (see noise_c in _detect_block)
            r = None
            for axis in axes:
                for d in (-1, 1):
                    nb = _shifted(a, box, axis, d)
                    r = nb.astype(np.float32, copy=True) if r is None else np.add(r, nb, out=r)
            r *= np.float32(-1 / (3 * len(axes)))
            r += v * np.float32(2 / 3)
        else:
            r = v.astype(np.float32, copy=True)
        np.minimum(r, 0, out=r)
        r *= r
        out.append(_block_mean(r, coarse))
    return np.concatenate(out)


def _shifted(a: np.ndarray, box: tuple[slice, ...], axis: int, d: int) -> np.ndarray:
    """Return ``a`` on ``box`` moved by ``d`` voxels along ``axis`` (edge voxel repeated)."""
    s = box[axis]
    lo, hi = s.start + d, s.stop + d
    if lo >= 0 and hi <= a.shape[axis]:
        return a[box[:axis] + (slice(lo, hi),) + box[axis + 1 :]]
    at = np.clip(np.arange(lo, hi), 0, a.shape[axis] - 1)
    return np.take(a[box[:axis] + (slice(None),) + box[axis + 1 :]], at, axis=axis)


def overlapped_blocks(v: da.Array, chunks, depth) -> da.Array:
    """Blocks of ``v`` on the grid ``chunks``, each with ``depth`` voxels of its neighbours.

    The same array as ``dask.array.overlap.overlap(v.rechunk(chunks), depth,
    boundary="none")`` (a block at the volume's face has no overlap there), but every
    block is one task that cuts its box from ``v``'s own chunks and assembles it in one
    copy: rechunking first would copy every voxel once more. Like Dask's overlap, a
    chunk of ``v`` is held until the blocks that read it are made.

    Parameters
    ----------
    v : dask.array.Array, shape (z, y, x)
    chunks : tuple of tuple of int
        The cores' sizes along each axis (they sum to ``v.shape``).
    depth : tuple of int
        Overlap along each axis (voxels).

    Returns
    -------
    dask.array.Array
        Chunk ``(i, j, k)`` holds core ``(i, j, k)`` and its overlap.
    """
    from operator import getitem

    from dask.array.core import concatenate3
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    def edges(sizes):
        return np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    src = [edges(c) for c in v.chunks]
    boxes = [
        [(max(int(a) - d, 0), min(int(b) + d, n)) for a, b in zip(e[:-1], e[1:])]
        for e, d, n in zip((edges(c) for c in chunks), depth, v.shape)
    ]

    def pieces(axis, lo, hi):  # the source chunks along an axis that a box meets
        first = int(np.searchsorted(src[axis], lo, side="right")) - 1
        last = int(np.searchsorted(src[axis], hi, side="left"))
        return [
            (i, slice(max(lo, int(src[axis][i])) - int(src[axis][i]),
                      min(hi, int(src[axis][i + 1])) - int(src[axis][i])))
            for i in range(first, last)
        ]  # fmt: skip

    name = "overlapped-" + tokenize(v, chunks, depth)
    dsk = {}
    for key in np.ndindex(*(len(b) for b in boxes)):
        pz, py, px = (pieces(a, *boxes[a][key[a]]) for a in range(3))
        dsk[(name, *key)] = (
            concatenate3,
            [
                [[(getitem, (v.name, i, j, k), (sz, sy, sx)) for k, sx in px] for j, sy in py]
                for i, sz in pz
            ],
        )
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[v])
    out_chunks = tuple(tuple(b - a for a, b in axis) for axis in boxes)
    return da.Array(graph, name, out_chunks, dtype=v.dtype, meta=v._meta)


def minus_background(block, background, scale: float, *, pad_lo, origin, task: str, out=None):
    """Return ``block - scale x background`` in float32; NaN or inf raise one sentence.

    Shared by detection and fibre segmentation (``task`` names it in the sentence);
    ``origin`` and ``pad_lo`` place the block in the volume, for the sentence too.
    ``out`` (float32, the block's shape) receives the result when given.
    """
    x = np.empty(np.shape(block), dtype=np.float32) if out is None else out
    if background is not None:  # x = block - scale * background, in float32
        np.multiply(background, np.float32(-scale), out=x, dtype=np.float32)
        np.add(x, block, out=x, casting="unsafe")
    else:
        np.copyto(x, block, casting="unsafe")
    floats = any(
        a is not None and np.issubdtype(np.asarray(a).dtype, np.floating)
        for a in (block, background)
    )
    if floats and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        where = tuple(int(o - p + i) for o, p, i in zip(origin, pad_lo, bad))
        raise InputError(
            f"The volume holds NaN or infinite values (first at voxel (z, y, x) = {where}); "
            f"replace them before {task}."
        )
    return x


def _finite_block(
    block, background, background_scale: float = 0.0, *, pad_lo, origin, check_only=False
):
    """Subtract the scaled background from the block (float32); NaN or inf raise a sentence.

    With ``check_only`` (a chunk without tissue, not detected), only the check is made
    and an empty result returned.
    """
    x = minus_background(block, background, background_scale, pad_lo=pad_lo, origin=origin,
                         task="detection")  # fmt: skip
    if check_only:
        return _empty_table(), (0, np.zeros(0, np.int64))
    return x


def _detect_block(
    block: np.ndarray,
    background: np.ndarray | None = None,
    *,
    plan: _Plan,
    background_scale: float = 0.0,
    threshold: float,
    threshold_contrast: float,
    min_axis_drop: float,
    min_dip: float = 0.0,
    min_spike_extent: float = 0.0,
    min_step_drop: float = 0.0,
    deblend: bool = False,
    tissue=None,
    pad_lo: tuple[int, int, int],
    core_shape: tuple[int, int, int],
    origin: tuple[int, int, int],
    voxel_size_um: tuple[float, float, float],
    device: str = "cpu",
) -> tuple[pd.DataFrame, np.ndarray]:
    """Detect the maxima whose voxel lies in the core of one overlapped block.

    Returns the cells and a histogram of the raw noise SD over the core's tissue (as
    ``(first bin, counts)``, see :func:`_noise_histogram`).

    The block starts on the background's grid of ``plan.bg_coarse`` (its first voxel's
    global index is a multiple of the grid factor, and so of the noise grid's), so the
    coarse fields do not depend on the chunking.
    """
    device = _torch_device(device)
    x = _finite_block(block, background, background_scale, pad_lo=pad_lo, origin=origin)
    background = _coarse_background(x, plan, device)
    # From here on only the work region W (the core and plan.margin around it, on the noise
    # grid) is needed: the background is interpolated, g1 (from W and plan.radius_soma
    # voxels around it) and f = g1 - g2 computed there only.
    lo = tuple(max(p - m, 0) for p, m in zip(pad_lo, plan.margin))
    hi = tuple(min(p + c + m, n) for p, c, m, n in zip(pad_lo, core_shape, plan.margin, x.shape))
    kb = plan.bg_coarse
    c_lo = tuple(max(a // k - 1, 0) for a, k in zip(lo, kb))
    c_hi = tuple(min(-(-b // k) + 1, n) for b, k, n in zip(hi, kb, background.shape))
    g2 = _upsample(
        background[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))],
        kb,
        tuple((b - a) * k for a, b, k in zip(c_lo, c_hi, kb)),
    )
    g2 = g2[tuple(slice(a - ca * k, b - ca * k) for a, b, ca, k in zip(lo, hi, c_lo, kb))]
    del background
    lo_s = tuple(max(a - r, 0) for a, r in zip(lo, plan.radius_soma))
    hi_s = tuple(min(b + r, n) for b, r, n in zip(hi, plan.radius_soma, x.shape))
    g1 = _gaussian(
        x[tuple(slice(a, b) for a, b in zip(lo_s, hi_s))], plan.sigma_soma, plan.radius_soma, device
    )
    # the band-passed signal
    f = np.subtract(g1[tuple(slice(a - b, c - b) for a, b, c in zip(lo, lo_s, hi))], g2)
    del g1
    # the residual needs one more voxel around W, where the block has it
    lo1 = tuple(max(a - 1, 0) for a in lo)
    hi1 = tuple(min(b + 1, n) for b, n in zip(hi, x.shape))
    x = x[tuple(slice(a, b) for a, b in zip(lo1, hi1))]
    back = tuple(slice(a - a1, b - a1) for a, b, a1 in zip(lo, hi, lo1))
    pad_lo = tuple(p - a for p, a in zip(pad_lo, lo))  # block coordinates -> W coordinates

    # Raw noise SD from the negative part of a discrete Laplacian residual (voxel minus the
    # mean of its axis neighbours): white noise passes it, smooth structure does not. Its
    # local mean square, and that of the band-passed signal's negative part (raised by
    # edges, stripes and textured tissue; isolated cells barely do, being positive), are
    # averaged over a window on the coarse grid and read at the candidates.
    # in-plane neighbours (planes may differ in gain or be separate stacks), else any axis
    used = [a for a in (1, 2) if plan.axes_used[a]] or [a for a in range(3) if plan.axes_used[a]]
    used = used or [0]
    window = tuple(2 * r + 1 for r in plan.radius_noise_coarse)
    var = ndi.uniform_filter(_negative_power(x, used, back, plan.coarse), window, mode="reflect")
    np.maximum(var, 0, out=var)  # running sums can round a zero mean to -1e-12
    spikes = min_spike_extent > 0 and max(plan.neighbour_ratio) >= _MIN_NEIGHBOUR_RATIO
    if not spikes:
        del x  # the raw block is needed further only by the spike test
    var_f = ndi.uniform_filter(_negative_power(f, [], None, plan.coarse), window, mode="reflect")
    np.maximum(var_f, 0, out=var_f)
    # white-noise variance of the residual (1 + 1 / 2n) over 1.5^2, in SD^2
    noise_c = (1 + 1 / (2 * len(used))) / 2.25

    # The raw noise SD of the tissue in the core, as a histogram (summed over the chunks it
    # gives the tissue's typical noise, whatever the chunking; see _noise_histogram).
    sl = tuple(slice(p // k, -(-(p + c) // k)) for p, c, k in zip(pad_lo, core_shape, plan.coarse))
    inside = None
    if tissue is not None:
        centres = [
            np.arange(s.start, s.stop) * k + (k - 1) / 2 + o - p
            for s, k, o, p in zip(sl, plan.coarse, origin, pad_lo)
        ]
        inside = _mask_on_grid(tissue, centres)
    hist = _noise_histogram(var[sl], 2.0 / noise_c, inside)

    # Candidates: core voxels above a lower bound of both thresholds (the exact SDs add a
    # relative floor), read per coarse cell; the tests below are then exact.
    # (computed on the search region's coarse cells only, in place: the block's peak
    # memory is here). With deblending the maxima are searched and judged beyond the core
    # by plan.ext (the residual in the core needs every soma whose model reaches it);
    # only the core's are returned.
    ext = plan.ext if deblend else (0, 0, 0)
    s_lo = tuple(max(p - e, 0) for p, e in zip(pad_lo, ext))
    s_hi = tuple(min(p + c + e, n) for p, c, e, n in zip(pad_lo, core_shape, ext, f.shape))
    search = tuple(slice(a, b) for a, b in zip(s_lo, s_hi))
    noise = (var, var_f, noise_c, g2)
    bounds = (var, var_f, noise_c, plan, threshold, threshold_contrast)
    fc = f[search]
    idx = np.nonzero(_above_bound(f, (0, 0, 0), s_lo, s_hi, bounds, plan.coarse))
    if len(idx[0]) == 0:
        return _empty_table(), hist
    peak = fc[idx].astype(np.float64)
    pos_w = tuple(i + p for i, p in zip(idx, s_lo))
    amplitude, snr, contrast, raw_sd = _scores(peak, pos_w, noise, plan)
    keep = (snr > threshold) & (contrast > threshold_contrast)
    c = {
        "pos": np.stack([i[keep] for i in idx], axis=1) + np.asarray(s_lo),  # W coordinates
        "peak": peak[keep],
        "snr": snr[keep],
        "amplitude": amplitude[keep],
        "contrast": contrast[keep],
        "raw_sd": raw_sd[keep],
    }
    # the dip that separates two somata: a fraction of the weaker peak, and at least twice
    # the band-passed noise SD (so noise on a plateau does not pass for a saddle)
    c["dip"] = np.maximum(min_dip * c["peak"], 2.0 * plan.noise_gain * c["raw_sd"])

    def take(ok):
        for k in c:
            c[k] = c[k][ok]

    # Local maxima: first among the 6 face neighbours, then the 26 (each strict, ties broken
    # by (z, y, x) order); then in the whole suppression box, where a stronger voxel removes
    # the candidate only if the band-passed signal does not dip between them (two touching
    # somata are two maxima with a saddle between; noise on one soma's plateau is not).
    rm = plan.radius_max
    grid = np.mgrid[-rm[0] : rm[0] + 1, -rm[1] : rm[1] + 1, -rm[2] : rm[2] + 1]
    offsets = grid.reshape(3, -1).T
    offsets = offsets[np.any(offsets != 0, axis=1)]
    faces = offsets[np.abs(offsets).sum(axis=1) == 1]
    near = offsets[np.all(np.abs(offsets) <= 1, axis=1)]
    for subset in (faces, near):
        take(_box_test(f, c["pos"], c["peak"].astype(np.float32), subset, ties=True))
    far = offsets[np.any(np.abs(offsets) > 1, axis=1)]
    if len(far):
        take(_box_test(f, c["pos"], c["peak"].astype(np.float32), far, ties=True, dip=c["dip"]))

    def judge(sig: np.ndarray, cand: dict) -> np.ndarray:
        """Which candidates (maxima of ``sig``, the band-passed signal) pass the tests."""
        ok = np.ones(len(cand["pos"]), dtype=bool)
        if not len(ok):
            return ok
        # Spikes: a hot pixel, a cosmic hit or a one-plane streak is one voxel thick
        # along some axis, a soma is not. Along every axis on which a soma spans several
        # voxels, the mean raw excess of the two neighbours must reach min_spike_extent
        # of what the smallest soma's profile predicts from the centre voxel, within
        # three noise SDs.
        if spikes:
            ok &= _spike_test(x, back, g2, cand, plan, min_spike_extent)
        # Shape: along every axis, on both sides, the band-passed signal must fall below
        # (1 - min_axis_drop) of the peak within plan.walk voxels (3 soma diameters).
        # Planes, edges, light-sheet stripes and fibres stay flat along some axis for
        # longer and fail; a cell elongated by the axial blur, or cells stacked along an
        # axis, pass.
        if min_axis_drop > 0:
            lo_d, hi_d = _half_max_extents(
                sig, cand["pos"], cand["peak"], plan, level=1.0 - min_axis_drop
            )
            walk = np.asarray(plan.walk, dtype=np.float64)[None, :]
            used = np.asarray(plan.axes_used)[None, :]
            ok &= np.all(~used | ((lo_d < walk) & (hi_d < walk)), axis=1)
        # Steps: a soma is a bump of intensity, so the soma-smoothed image g1 = sig + g2
        # falls on both sides along every axis, by min_step_drop of the band-passed peak,
        # within plan.walk voxels (a ray that leaves the volume first is no evidence). On
        # a one-sided step (a tile seam, the tissue edge) the band-pass peaks on the
        # bright side, where g1 stays high.
        if min_step_drop > 0:
            ok &= _step_test(sig, g2, cand, plan, min_step_drop)
        return ok

    take(judge(f, c))

    # Sub-voxel centre: along each axis through the maximum, the midpoint of the two points
    # where the band-passed signal falls to half the peak (linear interpolation), searched
    # up to plan.walk voxels away and stopped at a saddle to a neighbouring soma: the centre
    # of the object, wherever on a plateau (e.g. a soma elongated along z by the axial blur)
    # the noise put the maximum.
    # Touching cells, two ways; the one that finds more somata wins.
    # (a) Along the axes: an object whose half-maximum extent along an axis exceeds that of
    # one soma by more than half a spacing holds 1 + round(excess / spacing) cells along
    # that axis, placed evenly (somata stacked along the blurred z axis in long columns).
    # The spacing is one soma diameter, or the width of one soma's response where that is
    # larger (closer cells cannot be told apart).
    # (b) Along any direction: from the covariance of the object's band-passed signal (in
    # its own share of a window of one imaged diameter, _object_moments) minus one soma's,
    # the largest excess e along the principal direction v gives
    # n = round(sqrt(1 + 3 e / e_pair(v))) somata, e_pair being the excess of two somata
    # 1.25 diameters apart (a chain of n somata s apart has excess s^2 (n^2 - 1) / 12),
    # placed evenly about the centroid along v (two somata touching diagonally).
    # Only axes with at least 2 voxels per soma diameter take part.
    # An object that runs into the volume edge along an axis has the edge's extent there,
    # not its own: it is not split along that axis, nor along any direction (b).
    at_edge = np.zeros(c["pos"].shape, dtype=bool)
    lo, hi = _half_max_extents(f, c["pos"], c["peak"], plan, valley=c["dip"], edge=at_edge)
    extent = lo + hi
    excess = (extent - np.asarray(plan.single_width)) / np.asarray(plan.split_spacing)
    pieces = 1 + np.maximum(np.rint(excess), 0).astype(np.int64)
    pieces = np.where(np.asarray(plan.split_axes)[None, :] & ~at_edge, pieces, 1)
    counts = pieces.prod(axis=1)
    vs = np.asarray(voxel_size_um, dtype=np.float64)
    n_dir = np.ones(len(c["pos"]), dtype=np.int64)
    split = np.asarray(plan.split_axes)
    # only an object wider than one soma's response along some axis can hold several
    wide = np.any(split[None, :] & (extent > np.asarray(plan.single_width)[None, :]), axis=1)
    if split.any() and wide.any():
        mean = np.zeros((len(c["pos"]), 3))
        cov = np.zeros((len(c["pos"]), 3, 3))
        mean[wide], cov[wide] = _object_moments(f, c["pos"][wide], c["peak"][wide], plan, vs)
        cov[wide] -= np.asarray(plan.single_cov)[None]
        cov[:, ~split, :] = 0.0
        cov[:, :, ~split] = 0.0
        e, vec = np.linalg.eigh(cov)
        e1, v1 = e[:, -1], vec[:, :, -1]
        e_pair = (v1 * v1) @ np.asarray(plan.pair_excess)
        ratio = np.divide(e1, e_pair, out=np.zeros_like(e1), where=e_pair > 0)
        n_dir = np.rint(np.sqrt(1.0 + 3.0 * np.maximum(ratio, 0.0))).astype(np.int64)
        n_dir = np.clip(n_dir, 1, _MAX_PIECES)
    directional = (n_dir > counts) & ~at_edge.any(axis=1)
    counts = np.where(directional, n_dir, counts)
    owner = np.repeat(np.arange(len(c["pos"])), counts)
    start = np.cumsum(counts) - counts  # first piece of each object
    piece = np.arange(len(owner)) - np.repeat(start, counts)  # k of its n
    # (a): piece k of the grid of pieces, from -lo to +hi along each axis at (k + 0.5) / n
    # (the grid index of piece k, in C order; (b) overrides it below)
    _, ny, nx = pieces[owner].T
    frac = np.stack([piece // (ny * nx), (piece // nx) % ny, piece % nx], axis=1).astype(float)
    shift = -lo[owner] + (frac + 0.5) / pieces[owner] * extent[owner]
    # (b): evenly about the centroid along v
    d = directional[owner]
    if d.any():
        k, m = piece[d], counts[owner][d]
        spacing = np.sqrt(12.0 * np.maximum(e1[owner][d], 0.0) / (m * m - 1.0))  # µm
        along = (k - 0.5 * (m - 1))[:, None] * spacing[:, None] * v1[owner][d]
        shift[d] = mean[owner][d] + along / vs
    take(owner)
    pos, snr, amplitude, contrast = c["pos"], c["snr"], c["amplitude"], c["contrast"]
    vox_w = pos + shift
    in_core = np.all((pos >= np.asarray(pad_lo)) & (pos < np.asarray(pad_lo) + core_shape), axis=1)
    if deblend and len(pos):
        # the residual's candidates in the core and the suppression box around it
        reach = tuple(
            slice(max(p - r, 0), min(p + c + r, n))
            for p, c, r, n in zip(pad_lo, core_shape, plan.radius_max, f.shape)
        )
        extra = _residual_candidates(f, vox_w, c["peak"], plan, reach, noise, bounds)
        if spikes and len(extra["pos"]):
            ok = _spike_test(x, back, g2, extra, plan, min_spike_extent)
            extra = {k: v[ok] for k, v in extra.items()}
        mine = np.all(
            (extra["pos"] >= np.asarray(pad_lo)) & (extra["pos"] < np.asarray(pad_lo) + core_shape),
            axis=1,
        )
        extra = {k: v[mine] for k, v in extra.items()}
        vox_w = np.concatenate([vox_w[in_core], extra["pos"] + extra["shift"]])
        snr = np.concatenate([snr[in_core], extra["snr"]])
        amplitude = np.concatenate([amplitude[in_core], extra["amplitude"]])
        contrast = np.concatenate([contrast[in_core], extra["contrast"]])
    vox = vox_w + (np.asarray(origin) - np.asarray(pad_lo))
    vs = np.asarray(voxel_size_um)
    table = {
        "z_vox": vox[:, 0],
        "y_vox": vox[:, 1],
        "x_vox": vox[:, 2],
        "z_um": vox[:, 0] * vs[0],
        "y_um": vox[:, 1] * vs[1],
        "x_um": vox[:, 2] * vs[2],
        "intensity": amplitude,
        "snr": snr,
        "contrast": contrast,
    }
    return pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in table.items()}), hist


def _threshold_bound(var, var_f, noise_c, plan, threshold, threshold_contrast, *, cells):
    """Bound from below the band-passed value passing both tests, per coarse cell.

    ``cells`` (a tuple of slices into the coarse grid) picks where. The exact SDs add a
    relative floor to the noise fields read here, so the bound is a lower bound and the
    tests are made exactly afterwards.
    """
    bound = var[cells] * np.float32(2.0 / noise_c)
    np.sqrt(bound, out=bound)
    bound *= np.float32(threshold * plan.soma_gain * (1 - 1e-4))
    bound_f = var_f[cells] * np.float32(2.0)
    np.sqrt(bound_f, out=bound_f)
    bound_f *= np.float32(threshold_contrast * (1 - 1e-4))
    np.maximum(bound, bound_f, out=bound)
    return np.maximum(bound, 0, out=bound)


def _above_bound(a: np.ndarray, a_lo, lo, hi, bounds: tuple, coarse) -> np.ndarray:
    """Whether ``a`` exceeds the thresholds' lower bound, on the voxels ``[lo, hi)``.

    ``a`` covers the W-coordinate box from ``a_lo``; ``lo`` and ``hi`` are W coordinates
    inside it; ``bounds`` holds the arguments of :func:`_threshold_bound` but ``cells``.
    The comparison is made on the box of whole coarse cells around the region (``a``'s
    edge voxels repeated where it ends first), with ``a`` reshaped so that each coarse
    cell's voxels meet its bound by broadcasting: the bound is never copied onto the
    fine grid.
    """
    k, a_lo = np.asarray(coarse), np.asarray(a_lo)
    lo, hi = np.asarray(lo), np.asarray(hi)
    lo_c, hi_c = lo - lo % k, hi + (-hi) % k  # whole coarse cells
    v_lo, v_hi = np.maximum(lo_c, a_lo), np.minimum(hi_c, a_lo + a.shape)
    v = a[tuple(slice(b - o, e - o) for b, e, o in zip(v_lo, v_hi, a_lo))]
    pad = tuple(zip(v_lo - lo_c, hi_c - v_hi))
    if any(n for side in pad for n in side):
        v = np.pad(v, pad, mode="edge")
    bound = _threshold_bound(
        *bounds, cells=tuple(slice(b // kk, e // kk) for b, e, kk in zip(lo_c, hi_c, k))
    )
    # the last axis repeated (so the comparison's inner loop runs along whole rows), the
    # others broadcast
    bound = np.repeat(bound, k[2], axis=2) if k[2] > 1 else bound
    split = (bound.shape[0], k[0], bound.shape[1], k[1], v.shape[2])
    over = v.reshape(split) > bound[:, None, :, None, :]
    return over.reshape(v.shape)[tuple(slice(b - c, e - c) for b, e, c in zip(lo, hi, lo_c))]


def _scores(peak, pos, noise, plan) -> tuple:
    """Soma amplitude, ``snr``, ``contrast`` and raw noise SD of band-passed peaks.

    ``pos`` are W coordinates (one array per axis); ``noise`` holds the raw and
    band-passed noise variance fields on the coarse grid, their white-noise factor and
    the background ``g2``. The peak in soma units (the band-passed peak over the response
    to a centred soma of unit peak intensity) is the soma's estimated peak intensity
    above background.
    """
    var, var_f, noise_c, g2 = noise
    level = np.abs(g2[pos].astype(np.float64)) * _RELATIVE_FLOOR
    cell = tuple(i // k for i, k in zip(pos, plan.coarse))
    raw_sd = np.sqrt(2.0 * var[cell] / noise_c + level**2)
    f_sd = np.sqrt(2.0 * var_f[cell] + (level * plan.noise_gain) ** 2)
    amplitude = peak / plan.soma_gain
    snr = np.divide(amplitude, raw_sd, out=np.full_like(peak, np.inf), where=raw_sd > 0)
    contrast = np.divide(peak, f_sd, out=np.full_like(peak, np.inf), where=f_sd > 0)
    return amplitude, snr, contrast, raw_sd


def _peaks_of_neighbourhood(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Whether ``a`` at each voxel of ``pos`` (n, 3) is at least its 26 neighbours'."""
    if len(pos) == 0:
        return np.zeros(0, dtype=bool)
    offs = np.argwhere(np.ones((3, 3, 3), dtype=bool)) - 1
    offs = offs[np.any(offs != 0, axis=1)]
    q = np.clip(pos[:, None, :] + offs[None], 0, np.asarray(a.shape) - 1)
    return np.all(a[q[..., 0], q[..., 1], q[..., 2]] <= a[tuple(pos.T)][:, None], axis=1)


def _residual_candidates(
    f: np.ndarray,
    centres: np.ndarray,
    peaks: np.ndarray,
    plan: _Plan,
    region: tuple[slice, ...],
    noise: tuple,
    bounds: tuple,
) -> dict:
    """Candidate somata left in the band-passed signal once the found ones are subtracted.

    Each found soma (``centres`` in W coordinates, band-passed ``peaks``) is modelled as
    one imaged soma's response (``plan.model``) scaled to its peak and centred on its
    nearest voxel. A voxel of ``region`` is a candidate where the residual ``r`` is a
    local maximum (26 neighbours) that exceeds what the model holds there (a dim soma
    beside a bright one, not the misfit of a bright one), where ``f`` itself has no
    maximum (those were judged already), that passes both thresholds against the local
    noise (``noise``: the raw and band-passed noise variance fields on the coarse grid,
    their white-noise factor and the background ``g2``; ``bounds``: the arguments of
    :func:`_threshold_bound`), and that lies outside the ellipsoid inscribed in the
    suppression box (a sphere of radius ``min_separation_um`` where the box's half-widths
    are that in µm), and outside the 26 neighbours, of every found soma and of every
    stronger candidate: a dim soma 1-1.5 diameters from a bright one along a diagonal lies
    within the box (closer than ``min_separation_um`` on every axis) but not within the
    sphere. Returns the
    candidates as the first pass's table of columns (``pos`` in W coordinates).

    """
    out = {k: np.zeros(0) for k in ("peak", "snr", "amplitude", "contrast", "raw_sd")}
    out["pos"] = np.zeros((0, 3), dtype=np.int64)
    out["shift"] = np.zeros((0, 3))
    model, mc = plan.model, np.asarray(plan.model_centre)
    # the model on the region and one voxel around it (r = fw - m there)
    lo1 = np.asarray([max(s.start - 1, 0) for s in region])
    hi1 = np.asarray([min(s.stop + 1, n) for s, n in zip(region, f.shape)])
    size = tuple(hi1 - lo1)
    fw = f[tuple(slice(a, b) for a, b in zip(lo1, hi1))]
    m = np.zeros(size, dtype=np.float32)
    lo = np.rint(centres).astype(np.int64) - mc - lo1  # each model's first voxel, in the window
    a = np.maximum(lo, 0)
    b = np.minimum(lo + model.shape, size)
    inside = np.all(b > a, axis=1)
    boxes = np.concatenate([a, b, a - lo, b - lo], axis=1)[inside].tolist()
    for (z0, y0, x0, z1, y1, x1, mz0, my0, mx0, mz1, my1, mx1), pk in zip(
        boxes, np.asarray(peaks, dtype=np.float32)[inside]
    ):
        m[z0:z1, y0:y1, x0:x1] += pk * model[mz0:mz1, my0:my1, mx0:mx1]
    r = fw - m
    # above the model and the thresholds' lower bound, then a maximum of its 26 neighbours
    region_lo, region_hi = [s.start for s in region], [s.stop for s in region]
    inner = tuple(slice(a - b, c - b) for a, b, c in zip(region_lo, lo1, region_hi))
    ri = r[inner]
    over = _above_bound(r, lo1, region_lo, region_hi, bounds, plan.coarse)
    over &= ri > m[inner]
    at = np.argwhere(over) + np.asarray(region_lo) - lo1
    del over, ri, m
    at = at[_peaks_of_neighbourhood(r, at)]
    idx = at + lo1
    if len(idx) == 0:
        return out
    peak = r[tuple(at.T)].astype(np.float64)
    amplitude, snr, contrast, raw_sd = _scores(peak, tuple(idx.T), noise, plan)
    threshold, threshold_contrast = bounds[4:]
    ok = (snr > threshold) & (contrast > threshold_contrast)
    if ok.any():  # ... and no maximum of f (26 neighbours): those were judged already
        cand = np.flatnonzero(ok)
        ok[cand[_peaks_of_neighbourhood(f, idx[cand])]] = False
    if not ok.any():
        return out
    idx, peak = idx[ok], peak[ok]
    # outside every found soma's ellipsoid and every stronger candidate's (not greedy: the
    # answer for one candidate depends on its box alone, whatever the chunking)
    # (the sphere, and never less than a voxel's 26 neighbours: on a coarse grid the box
    # is one voxel wide and the sphere inside it would free the diagonal neighbours)
    box = np.asarray(plan.radius_max, dtype=np.float64)
    free = np.ones(len(idx), dtype=bool)
    if len(centres):
        d, _ = cKDTree(centres / box).query(idx / box, p=2)
        d_vox, _ = cKDTree(np.rint(centres)).query(idx, p=np.inf)
        free &= (d > 1.0) & (d_vox > 1.0)
    alive = np.flatnonzero(free)
    tree = cKDTree(idx[alive] / box)
    near = cKDTree(idx[alive]).query_ball_point(idx[alive], 1.0, p=np.inf)
    for i, close, adjacent in zip(
        alive, tree.query_ball_point(idx[alive] / box, 1.0, p=2), near, strict=True
    ):
        close = sorted(set(close) | set(adjacent))
        mine = (peak[i], *(-idx[i]))  # ties: the first in (z, y, x) order wins
        if any((peak[j], *(-idx[j])) > mine for j in alive[close] if j != i):
            free[i] = False
    sel = np.flatnonzero(ok)[free]
    idx = idx[free]
    # sub-voxel centre: the vertex of the parabola through the residual at -1, 0, +1
    shift = np.zeros(idx.shape)
    at = idx - lo1
    for a in range(3):
        step = np.zeros(3, dtype=np.int64)
        step[a] = 1
        lo_v = r[tuple(np.clip(at - step, 0, np.asarray(size) - 1).T)].astype(np.float64)
        hi_v = r[tuple(np.clip(at + step, 0, np.asarray(size) - 1).T)].astype(np.float64)
        mid = peak[free]
        curv = lo_v - 2 * mid + hi_v
        shift[:, a] = np.clip(
            np.divide(0.5 * (lo_v - hi_v), curv, out=np.zeros_like(mid), where=curv < 0), -0.5, 0.5
        )
    out.update(
        pos=idx,
        shift=shift,
        peak=peak[free],
        snr=snr[sel],
        amplitude=amplitude[sel],
        contrast=contrast[sel],
        raw_sd=raw_sd[sel],
    )
    return out


def detect_cells(
    signal,
    *,
    voxel_size_um: tuple[float, float, float],
    params: DetectionParams = DetectionParams(),  # noqa: B008 - frozen, immutable default
    background=None,
    tissue=None,
    return_qc: bool = False,
):
    """Detect somata in a 3D volume; one row per cell.

    Parameters
    ----------
    signal : array_like or dask.array.Array, shape (z, y, x)
        The cell channel (integer or float; computed in float32). NaN or
        infinite values raise :class:`~ketamap.errors.InputError`.
    voxel_size_um : tuple of float
        Voxel size (z, y, x) in µm.
    params : DetectionParams
        Detection parameters.
    background : array_like or dask.array.Array, shape (z, y, x), optional
        Autofluorescence channel on the same grid. It is scaled by a robust
        (Tukey) regression of signal on background, fitted on a strided sample
        of about 10⁶ voxels, and subtracted before filtering.

    Returns
    -------
    pandas.DataFrame
        One row per cell, sorted by (z, y, x) (cells closer than
        ``min_separation_um`` on every axis merged), with float64 columns ``z_vox``,
        ``y_vox``, ``x_vox`` (sub-voxel centroid on the input grid), ``z_um``,
        ``y_um``, ``x_um`` (voxel coordinate × voxel size), ``intensity`` (peak
        of the band-passed signal, input units above the local background) and
        ``snr`` (``intensity`` over the local noise SD). Empty, with these
        columns, when nothing is found.

    Raises
    ------
    ParameterError
        If ``voxel_size_um`` is not three positive numbers, or a chunk is
        smaller than the overlap the filters need.
    InputError
        If ``signal`` is not 3D, not numeric, holds NaN/inf, or ``background``
        has another shape.

    Notes
    -----
    The volume is processed in chunks of ``params.chunk_size_vox`` with an
    overlap, per axis, of the two Gaussian radii plus the largest of the noise
    window, the suppression box and the extent search (three soma diameters,
    at least 2 voxels); each maximum belongs to the chunk whose core holds it,
    so the table does not depend on the chunking. Each worker holds a few
    float32 copies of one overlapped chunk; Dask's overlap graph keeps about one
    z-slab of chunks alive, so memory is bounded by chunk depth × plane area,
    not by the number of planes. The computation uses the current Dask
    scheduler.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.zeros((20, 40, 40), dtype=np.float32)
    >>> vol[10, 20, 20] = 100.0
    >>> rng = np.random.default_rng(0)
    >>> vol += rng.normal(0, 1, vol.shape).astype(np.float32)
    >>> cells = detect_cells(vol, voxel_size_um=(25.0, 25.0, 25.0))
    >>> cells[["z_vox", "y_vox", "x_vox"]].round().values.tolist()
    [[10.0, 20.0, 20.0]]
    """
    vs = check_voxel_size(voxel_size_um)
    if not isinstance(params, DetectionParams):
        raise ParameterError(f"params must be a DetectionParams, got {type(params).__name__}.")
    sig = _as_dask(signal, "signal")
    bg = None
    if background is not None:
        bg = _as_dask(background, "background")
        if bg.shape != sig.shape:
            raise InputError(
                f"background has shape {bg.shape} but signal has shape {sig.shape}; "
                "both channels must be on the same grid."
            )
    if sig.size == 0:
        qc = flag_detection(_qc(0, 0, 0, None, float("nan"), 0.0, 0), 0, params.qc_min_cells)
        return (_empty_table(), qc) if return_qc else _empty_table()

    _torch_device(params.device)  # an unusable device fails here, before any work
    plan = _plan(vs, params, sig.shape)
    per_axis = [
        _axis_chunks(n, c, d, a, k)
        for a, (n, c, d, k) in enumerate(
            zip(sig.shape, params.chunk_size_vox, plan.depth, plan.bg_coarse)
        )
    ]
    chunks = tuple(c for c, _ in per_axis)
    depth = tuple(d for _, d in per_axis)
    log.info(
        "detect_cells: shape %s, voxel %s µm, sigma soma %s / background %s vox, "
        "overlap %s, %d chunks",
        sig.shape,
        vs,
        tuple(round(s, 2) for s in plan.sigma_soma),
        tuple(round(s, 2) for s in plan.sigma_outer),
        depth,
        math.prod(len(c) for c in chunks),
    )

    scale = 0.0
    if bg is not None:
        scale = _background_scale(sig, bg)
        log.info("detect_cells: background channel scaled by %.4g and subtracted", scale)
    if tissue is None and params.tissue_mask:
        tissue = find_tissue(
            bg if bg is not None else sig, voxel_size_um=vs, block_um=params.tissue_block_um
        )
    if tissue is not None and tuple(tissue.shape) != tuple(sig.shape):
        raise InputError(
            f"The tissue mask covers shape {tuple(tissue.shape)} but the signal has shape "
            f"{sig.shape}; compute it from this volume."
        )
    # blocks are cut from the input as it is (e.g. uint16) and cast inside each task
    overlapped = [
        overlapped_blocks(v, chunks, depth) for v in ((sig,) if bg is None else (sig, bg))
    ]
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in chunks]
    blocks = [v.to_delayed() for v in overlapped]
    tasks, skipped = [], 0
    floats = any(v is not None and np.issubdtype(v.dtype, np.floating) for v in (sig, bg))
    for key in np.ndindex(blocks[0].shape):
        pad_lo = tuple(depth[a] if key[a] > 0 else 0 for a in range(3))
        core_shape = tuple(chunks[a][key[a]] for a in range(3))
        origin = tuple(int(starts[a][key[a]]) for a in range(3))
        cells_of_core = tuple(
            slice(o // b, -(-(o + n) // b))
            for o, n, b in zip(origin, core_shape, tissue.block_vox if tissue else (1, 1, 1))
        )
        if tissue is not None and not tissue.mask[cells_of_core].any():
            skipped += 1  # no tissue: every candidate there would be dropped
            if floats:  # ... but a float volume is still checked for NaN and inf
                tasks.append(
                    dask.delayed(_finite_block)(
                        blocks[0][key],
                        blocks[1][key] if bg is not None else None,
                        scale,
                        pad_lo=pad_lo,
                        origin=origin,
                        check_only=True,
                    )
                )
            continue
        tasks.append(
            dask.delayed(_detect_block)(
                blocks[0][key],
                blocks[1][key] if bg is not None else None,
                plan=plan,
                background_scale=scale,
                threshold=params.threshold_snr,
                threshold_contrast=params.threshold_contrast,
                min_axis_drop=params.min_axis_drop,
                min_dip=params.min_dip,
                min_spike_extent=params.min_spike_extent,
                min_step_drop=params.min_step_drop,
                deblend=params.deblend,
                tissue=tissue,
                pad_lo=pad_lo,
                core_shape=core_shape,
                origin=origin,
                voxel_size_um=vs,
                device=params.device,
            )
        )
    results = dask.compute(*tasks)
    hist = _sum_histograms(h for _, h in results)
    tables = [t for t, _ in results if len(t)]
    cells = pd.concat(tables, ignore_index=True) if tables else _empty_table()
    n_candidates = len(cells)
    n_outside = 0
    if tissue is not None and len(cells):
        inside = tissue.contains(cells[["z_vox", "y_vox", "x_vox"]].to_numpy())
        n_outside = int((~inside).sum())
        cells = cells[inside]
    # the floor: bright against the tissue's typical noise, not only against the local noise
    noise_sd = _histogram_median(hist)
    floor = params.tissue_floor_snr * noise_sd if np.isfinite(noise_sd) else 0.0
    below = cells["intensity"].to_numpy() <= floor
    cells = cells[~below]
    cells = cells.sort_values(["z_vox", "y_vox", "x_vox"], kind="mergesort", ignore_index=True)
    cells = _suppress_duplicates(cells, 0.5 * params.soma_diameter_um)
    log.info(
        "detect_cells: %d cells (%d candidates outside the tissue and %d below the floor of "
        "%.4g dropped; %d of %d chunks had no tissue)",
        len(cells),
        n_outside,
        int(below.sum()),
        floor,
        skipped,
        math.prod(blocks[0].shape),
    )
    if not return_qc:
        return cells
    qc = _qc(n_candidates, n_outside, int(below.sum()), tissue, noise_sd, floor, skipped)
    return cells, flag_detection(qc, len(cells), params.qc_min_cells)


def flag_detection(qc: dict, n_cells: int, min_cells: int) -> dict:
    """Add ``n_cells``, ``flagged`` and ``reasons`` (a near-empty detection) to a QC record.

    Parameters
    ----------
    qc : dict
        The detection QC (see :func:`detect_cells`).
    n_cells : int
        Cells kept (after any second pass).
    min_cells : int
        Fewer cells flag the detection (``DetectionParams.qc_min_cells``).

    Returns
    -------
    dict
        A copy of ``qc`` with the three keys.
    """
    reasons = []
    if n_cells < min_cells:
        reasons.append(
            f"{n_cells} cells found, fewer than {min_cells} (is it the signal channel, and "
            "are the voxel size and the soma diameter right?)"
        )
    return qc | {"n_cells": int(n_cells), "flagged": bool(reasons), "reasons": reasons}


def _qc(n_candidates, n_outside, n_below, tissue, noise_sd, floor, skipped) -> dict:
    """Build the detection QC record (JSON-ready numbers, and the tissue mask itself)."""

    def num(v):
        return None if v is None or not np.isfinite(v) else float(v)

    return {
        "n_candidates": int(n_candidates),
        "n_outside_tissue": int(n_outside),
        "n_below_tissue_floor": int(n_below),
        "tissue_fraction": None if tissue is None else num(tissue.tissue_fraction),
        "tissue_void_level": None if tissue is None else num(tissue.void_level),
        "tissue_level": None if tissue is None else num(tissue.tissue_level),
        "tissue_threshold": None if tissue is None else num(tissue.threshold),
        "tissue_noise_sd": num(noise_sd),
        "tissue_floor": num(floor),
        "chunks_without_tissue": int(skipped),
        "tissue": tissue,
    }
