"""Simulate labelled axons (e.g. TH+ fibres) in a light-sheet volume, with ground truth.

The yardstick of fibre segmentation (:mod:`ketamap.wholebrain.fibres`): a (z, y, x)
volume at cellular resolution (default 4 x 2 x 2 µm voxels) over a label volume of
regions, each with its own fibre density (length per volume, mm/mm³).

Fibres
------
Tortuous, branching, varicose axons are drawn as 3D random walks with persistence:
steps of ``step_um``, the direction turned at each step by a Gaussian kick of SD
``sqrt(2 step / persistence)`` (the direction decorrelates over ``persistence_um``),
the vertices then smoothed along the walk by a Gaussian of SD ``smoothness_um`` (an
axon bends smoothly; with the defaults the arc is 1.17 x the chord over 50 µm). A fibre
is ``fibre_length_um`` long (uniform range); it branches at ``branch_rate_per_mm``
(Poisson along its length), each branch leaving at an angle in ``branch_angle_deg``,
half as long as a fibre. The walks live on the torus of the volume's box (a fibre
leaving one face enters through the opposite one), so fibre length is spread
uniformly over the box. Enough fibre is drawn for the densest region, ``max_k rho_k``
x the box volume; each fibre carries a uniform number ``u``, and its points are drawn
only where ``u < rho_k / rho_max`` for the region ``k`` they lie in (and only in
tissue). So each region gets its density (times its group effect, ``fold_changes``)
in expectation; fibres continue across borders into regions at least as dense and
end where the density drops (a branch draws its own ``u``). The realised length of a
region varies around its expectation with the finite number of fibres that cross it;
the truth below is the realised length.

Each fibre has a diameter (uniform in ``fibre_diameter_um``, 0.5-2 µm) and a
brightness: linear photon density proportional to the diameter, log-normal between
fibres (CV ``brightness_cv``), scaled so that a 1 µm fibre along x has a mean peak of
``fibre_snr`` background noise SDs. Varicosities (beads) sit along each fibre as a
Poisson process of mean spacing ``varicosity_spacing_um``; each adds
``varicosity_gain`` x the fibre's photon density as a Gaussian of SD
``varicosity_length_um`` along the fibre.

Imaging
-------
The centrelines are sampled every ``sample_um`` (sub-voxel) and each sample is
rendered as a Gaussian of SD ``sqrt(psf² + v²/12)`` per axis (the PSF and the
voxel's own box), evaluated at the voxel centres. Somata (optional, bright,
10-12 µm) are Gaussians of SD ``sqrt((d / 4)² + psf² + v²/12)``, placed at random
in the tissue at least ``soma_spacing_diameters`` largest diameters apart (1: a packed
layer whose neighbours touch). The
autofluorescence (``autofluorescence_photons``, smooth relative variation
``background_variation`` over ``background_smoothness_um``) is the background channel
and bleeds into the signal (``bleed_through``). Both channels get an illumination
gradient along x and light-sheet stripes (constant along x), shot noise (Gaussian
approximation of Poisson, variance = mean), Gaussian read noise and a camera offset,
and are stored as uint16. Nuisances, each off by default and drawn from generators of
their own: a dark void (no tissue and no photons beyond ``tissue_fraction`` of the x
axis), hot pixels (single-voxel spikes in the signal, void included) and stitched
tiles with their own gains (a step at each seam).

Ground truth
------------
* ``true_mask``: the fibres' footprint on the voxel grid, the rasterised tube: the
  voxels whose centre lies within ``mask_radius_vox`` voxels of the centreline, in
  the ellipsoidal distance ``sqrt(sum_i ((c_i - p_i) / v_i)²)`` (the voxel size
  ``v_i`` as the unit on each axis). At light-sheet voxels of a few µm the
  half-maximum width of a sub-micrometre axon's image is about one voxel on each axis
  (with the default PSF, ±1.4 µm in the 2 µm plane and ±3.8 µm along the 4 µm z axis),
  so the default radius of one voxel is the imaged axon's footprint rounded to the
  grid; a narrower tube would ask for the position of a sub-voxel line to a tenth of a
  voxel;
* ``lengths``: the true centreline length per region (µm, and mm/mm³), from the
  continuous polylines, not from a skeleton: each walk step is cut into pieces of at
  most ``sample_um`` and each piece's length goes to the region of the voxel holding
  its midpoint (exact to a fraction of ``sample_um`` per border crossing);
* ``somata``: the somata's centres and diameters.

Arrays are (z, y, x); voxel ``i`` is centred at ``i x voxel`` µm.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ketamap.errors import InputError, ParameterError
from ketamap.params import bounds, validate

__all__ = [
    "FibreSimParams",
    "SimulatedFibres",
    "simulate_fibres",
    "plant_fibres",
    "region_slabs",
    "true_length_table",
    "image_sigma_um",
]

# Stream ids of the nuisances' generators: np.random.default_rng([seed, id]).
_STREAM_SOMATA = 1
_STREAM_HOT = 2
_STREAM_TILES = 3
_STREAM_CAMERA = 4
_STREAM_PLANT = 5


@dataclass(frozen=True)
class FibreSimParams:
    """Fibres, imaging and nuisances of one simulated fibre volume (units in names).

    Parameters
    ----------
    voxel_size_um : tuple of float
        Voxel size (z, y, x).
    psf_sigma_um : tuple of float
        Point-spread function (z, y, x) as a Gaussian SD (light-sheet axial blur in z).
    fibre_diameter_um : tuple of float
        Range (min, max) of the fibres' diameters, drawn uniformly per fibre.
    fibre_snr : float
        Mean peak of a 1 µm fibre lying along x (no bead), in noise SDs of the mean
        signal background, sqrt(bleed_through x autofluorescence_photons + read_noise²).
    brightness_cv : float
        Coefficient of variation of the fibres' log-normal brightness.
    fibre_length_um : tuple of float
        Range (min, max) of a fibre's length (uniform).
    step_um : float
        Step of the random walk.
    persistence_um : float
        Persistence length of the walk's direction (larger: straighter fibres).
    smoothness_um : float
        SD (arc length) of the Gaussian that smooths each walk's vertices: an axon bends
        smoothly, without a kink at every step (0: the raw walk).
    branch_rate_per_mm : float
        Branch points per mm of fibre.
    branch_angle_deg : tuple of float
        Range of the angle between a branch and its parent.
    varicosity_spacing_um : float
        Mean spacing of the beads along a fibre (0: no beads).
    varicosity_gain : float
        A bead's extra photon density, in units of the fibre's own.
    varicosity_length_um : float
        SD of a bead along the fibre.
    sample_um : float
        Spacing of the centreline samples that are rendered and measured.
    autofluorescence_photons : float
        Mean photons of the autofluorescence (background) channel.
    bleed_through : float
        Fraction of the autofluorescence seen in the signal channel.
    background_variation : float
        Relative SD of the smooth variation of the autofluorescence.
    background_smoothness_um : float
        Gaussian SD of that variation.
    illumination_gradient : float
        Relative intensity loss across x.
    stripe_amplitude : float
        Relative SD of the light-sheet stripes (constant along x).
    read_noise : float
        Read noise SD (counts).
    camera_offset : float
        Camera offset (counts).
    soma_density_per_mm3 : float
        Bright somata per mm³ of tissue (0: none).
    soma_diameter_um : tuple of float
        Range (min, max) of the somata's diameters.
    soma_snr : float
        Mean soma peak in noise SDs of the background (as ``fibre_snr``).
    soma_spacing_diameters : float
        Least distance between two somata's centres, in largest diameters: 2 keeps them
        apart, 1 lets them touch (a packed cell layer), below 1 they overlap (clumps).
    tissue_fraction : float
        Share of the x axis that holds tissue; beyond it a dark void (no photons).
    hot_pixel_rate_per_voxel : float
        Expected single-voxel spikes per voxel (signal channel, void included).
    hot_pixel_counts : tuple of float
        Range (min, max) of the spikes' log-uniform amplitude (counts).
    tile_shape_vox : tuple of int or None
        (y, x) size of stitched tiles; None: one tile.
    tile_gain_cv : float
        Coefficient of variation of the tiles' log-normal gains (mean 1).
    mask_radius_vox : float
        Radius of the true mask's tube around the centreline, in voxels.
    """

    voxel_size_um: tuple[float, float, float] = field(
        default=(4.0, 2.0, 2.0), metadata=bounds(gt=0, le=100, doc="voxel size (z, y, x)")
    )
    psf_sigma_um: tuple[float, float, float] = field(
        default=(3.0, 1.0, 1.0), metadata=bounds(ge=0, le=100, doc="PSF SD (z, y, x)")
    )
    fibre_diameter_um: tuple[float, float] = field(
        default=(0.5, 2.0), metadata=bounds(gt=0, le=20, doc="fibre diameter range")
    )
    fibre_snr: float = field(
        default=12.0, metadata=bounds(gt=0, doc="peak of a 1 µm fibre / background noise SD")
    )
    brightness_cv: float = field(default=0.3, metadata=bounds(ge=0, le=2))
    fibre_length_um: tuple[float, float] = field(
        default=(150.0, 450.0), metadata=bounds(gt=0, doc="fibre length range")
    )
    step_um: float = field(default=1.0, metadata=bounds(gt=0, le=20))
    persistence_um: float = field(default=60.0, metadata=bounds(gt=0))
    smoothness_um: float = field(default=5.0, metadata=bounds(ge=0, le=50))
    branch_rate_per_mm: float = field(default=3.0, metadata=bounds(ge=0, le=100))
    branch_angle_deg: tuple[float, float] = field(
        default=(30.0, 80.0), metadata=bounds(ge=0, le=180)
    )
    varicosity_spacing_um: float = field(default=5.0, metadata=bounds(ge=0))
    varicosity_gain: float = field(default=1.0, metadata=bounds(ge=0))
    varicosity_length_um: float = field(default=0.75, metadata=bounds(gt=0))
    sample_um: float = field(default=0.5, metadata=bounds(gt=0, le=5))
    autofluorescence_photons: float = field(default=300.0, metadata=bounds(ge=0))
    bleed_through: float = field(default=0.2, metadata=bounds(ge=0, le=1))
    background_variation: float = field(default=0.3, metadata=bounds(ge=0, lt=1))
    background_smoothness_um: float = field(default=50.0, metadata=bounds(gt=0))
    illumination_gradient: float = field(default=0.3, metadata=bounds(ge=0, lt=1))
    stripe_amplitude: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    read_noise: float = field(default=6.0, metadata=bounds(ge=0))
    camera_offset: float = field(default=100.0, metadata=bounds(ge=0, le=10000))
    soma_density_per_mm3: float = field(default=0.0, metadata=bounds(ge=0, le=1e6))
    soma_diameter_um: tuple[float, float] = field(
        default=(10.0, 12.0), metadata=bounds(gt=0, le=100)
    )
    soma_snr: float = field(default=60.0, metadata=bounds(gt=0))
    soma_spacing_diameters: float = field(default=2.0, metadata=bounds(ge=0, le=10))
    tissue_fraction: float = field(default=1.0, metadata=bounds(gt=0, le=1))
    hot_pixel_rate_per_voxel: float = field(default=0.0, metadata=bounds(ge=0, le=0.01))
    hot_pixel_counts: tuple[float, float] = field(
        default=(30.0, 3000.0), metadata=bounds(gt=0, le=65535)
    )
    tile_shape_vox: tuple[int, int] | None = field(default=None, metadata=bounds(ge=1))
    tile_gain_cv: float = field(default=0.0, metadata=bounds(ge=0, le=2))
    mask_radius_vox: float = field(default=1.0, metadata=bounds(gt=0, le=5))

    def __post_init__(self):
        validate(self)
        for name in (
            "fibre_diameter_um",
            "fibre_length_um",
            "branch_angle_deg",
            "soma_diameter_um",
            "hot_pixel_counts",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ParameterError(
                    f"FibreSimParams.{name} must be a range (min, max) with min <= max, "
                    f"got {(lo, hi)!r}."
                )

    @property
    def noise_sd_photons(self) -> float:
        """Noise SD of the mean signal background: sqrt(bleed x autofluorescence + read²)."""
        return math.sqrt(self.bleed_through * self.autofluorescence_photons + self.read_noise**2)


@dataclass(frozen=True, eq=False)
class SimulatedFibres:
    """One simulated fibre volume: two channels and the truth.

    Attributes
    ----------
    signal, background : ndarray of uint16, shape (z, y, x)
        Fibre channel (with somata, bleed-through and hot pixels) and
        autofluorescence channel.
    true_mask : ndarray of uint8, shape (z, y, x)
        1 where a voxel lies in a fibre's footprint (the voxels within
        ``mask_radius_vox`` voxels of a centreline, see the module docstring).
    fibre_image : ndarray of float32, shape (z, y, x)
        The noiseless fibre photons (before illumination, tiles and camera).
    lengths : DataFrame
        True centreline length per region (and hemisphere): ``region_id``,
        ``hemisphere`` (0 when no hemispheres were given), ``length_um``,
        ``volume_mm3``, ``density_mm_per_mm3`` and ``target_mm_per_mm3`` (the
        region's density x its fold change).
    points : DataFrame
        The drawn centreline samples (tissue and visible only): ``z_um, y_um,
        x_um``, ``length_um`` (the piece of centreline each stands for), ``fibre``
        (fibre id), ``region_id``.
    somata : DataFrame
        ``z_vox, y_vox, x_vox, z_um, y_um, x_um, diameter_um, peak_photons``.
    tissue : ndarray of bool, shape (z, y, x)
    hot_pixels : ndarray of int, shape (n, 3)
    voxel_size_um : tuple of float
    params : FibreSimParams
    """

    signal: np.ndarray
    background: np.ndarray
    true_mask: np.ndarray
    fibre_image: np.ndarray
    lengths: pd.DataFrame
    points: pd.DataFrame
    somata: pd.DataFrame
    tissue: np.ndarray
    hot_pixels: np.ndarray
    voxel_size_um: tuple[float, float, float]
    params: FibreSimParams


def image_sigma_um(params: FibreSimParams) -> tuple[float, float, float]:
    """Return the SD (µm, per axis) of a fibre's image: sqrt(psf² + voxel²/12).

    Parameters
    ----------
    params : FibreSimParams

    Returns
    -------
    tuple of 3 float
    """
    return tuple(
        math.sqrt(p * p + v * v / 12.0) for p, v in zip(params.psf_sigma_um, params.voxel_size_um)
    )


def region_slabs(
    shape: tuple[int, int, int], region_ids=(1, 2, 3), *, axis: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Return a label volume of equal slabs along one axis, and hemispheres split along x.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x).
    region_ids : sequence of int
        One id per slab, in order along ``axis``.
    axis : int
        The axis cut into slabs (default y).

    Returns
    -------
    labels : ndarray of int32
    hemispheres : ndarray of int8
        1 (left) for x below the middle, 2 (right) above.

    Examples
    --------
    >>> labels, hemi = region_slabs((2, 6, 4))
    >>> labels[0, :, 0].tolist(), hemi[0, 0].tolist()
    ([1, 1, 2, 2, 3, 3], [1, 1, 2, 2])
    """
    shape = _check_shape(shape)
    ids = np.asarray(region_ids, dtype=np.int32)
    n = shape[axis]
    which = np.minimum(np.arange(n) * len(ids) // max(n, 1), len(ids) - 1)
    line = ids[which]
    view = [1, 1, 1]
    view[axis] = n
    labels = np.broadcast_to(line.reshape(view), shape).copy()
    hemi = np.where(np.arange(shape[2]) < shape[2] // 2, 1, 2).astype(np.int8)
    return labels, np.broadcast_to(hemi[None, None, :], shape).copy()


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"shape must be three positive integers, got {shape!r}.") from None
    if len(out) != 3 or min(out) < 1:
        raise ParameterError(f"shape must be three positive integers, got {shape!r}.")
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _turn(d: np.ndarray, angle: np.ndarray, rng) -> np.ndarray:
    """Rotate unit vectors ``d`` by ``angle`` (radians) about random perpendicular axes."""
    r = _unit(rng.standard_normal(d.shape))
    perp = _unit(r - np.sum(r * d, axis=1, keepdims=True) * d)
    return _unit(np.cos(angle)[:, None] * d + np.sin(angle)[:, None] * perp)


def _walks(total_um: float, params: FibreSimParams, extent_um: np.ndarray, rng):
    """Draw fibres (random walks with branches) until their length reaches ``total_um``.

    Returns the walk vertices ``(n_vertices, 3)`` (µm, not wrapped), per vertex the fibre
    id and the arc length, and per fibre ``(n_fibres,)`` its parent fibre (-1 for a
    primary fibre). Consecutive vertices of one fibre are one step apart.
    """
    step = params.step_um
    kick = math.sqrt(2.0 * step / params.persistence_um)
    lo, hi = params.fibre_length_um
    mean_len = 0.5 * (lo + hi) * (1.0 + params.branch_rate_per_mm * 1e-3 * 0.25 * (lo + hi))
    verts, fib, arc, parents = [], [], [], []
    drawn, next_id = 0.0, 0
    pending = None  # branches waiting: (start, direction, length, parent)
    while drawn < total_um or pending is not None:
        if pending is None:
            n = max(1, int(math.ceil((total_um - drawn) / mean_len)))
            start = rng.uniform(0, 1, (n, 3)) * extent_um
            direc = _unit(rng.standard_normal((n, 3)))
            length = rng.uniform(lo, hi, n)
            parent = np.full(n, -1)
        else:
            start, direc, length, parent = pending
            pending = None
        n = len(start)
        ids = np.arange(next_id, next_id + n)
        next_id += n
        parents.append(parent)
        n_steps = np.maximum(1, np.round(length / step).astype(int))
        pos, d = start.copy(), direc.copy()
        out = np.empty((int(n_steps.max()) + 1, n, 3))
        out[0] = pos
        b_start, b_dir, b_len, b_par = [], [], [], []
        for k in range(1, int(n_steps.max()) + 1):
            d = _unit(d + kick * rng.standard_normal((n, 3)))
            pos = pos + step * d
            out[k] = pos
            if params.branch_rate_per_mm > 0:
                alive = n_steps >= k + 1
                hit = alive & (rng.uniform(0, 1, n) < params.branch_rate_per_mm * 1e-3 * step)
                if hit.any():
                    angle = np.radians(rng.uniform(*params.branch_angle_deg, int(hit.sum())))
                    b_start.append(pos[hit])
                    b_dir.append(_turn(d[hit], angle, rng))
                    b_len.append(rng.uniform(0.5 * lo, 0.5 * hi, int(hit.sum())))
                    b_par.append(ids[hit])
        if params.smoothness_um > 0:  # axons are smooth below a few µm: no kinks per step
            out = ndi.gaussian_filter1d(out, params.smoothness_um / step, axis=0, mode="nearest")
        for i in range(n):
            m = n_steps[i] + 1
            seg = np.linalg.norm(np.diff(out[:m, i], axis=0), axis=1)
            verts.append(out[:m, i])
            fib.append(np.full(m, ids[i]))
            arc.append(np.concatenate([[0.0], np.cumsum(seg)]))
            drawn += float(seg.sum())
        if b_start:
            pending = (
                np.concatenate(b_start),
                np.concatenate(b_dir),
                np.concatenate(b_len),
                np.concatenate(b_par),
            )
    verts, fib, arc = np.concatenate(verts), np.concatenate(fib), np.concatenate(arc)
    # the last batch's branches overshoot: keep the steps up to the total length exactly
    seg = np.linalg.norm(np.diff(verts, axis=0), axis=1) * (fib[1:] == fib[:-1])
    steps = np.concatenate([[0.0], seg])
    keep = np.cumsum(steps) <= total_um + 1e-9
    return verts[keep], fib[keep], arc[keep], np.concatenate(parents)


def _samples(verts, fib, arc, params: FibreSimParams):
    """Cut every walk step into pieces of at most ``sample_um``; return their midpoints."""
    same = fib[1:] == fib[:-1]
    a, b = verts[:-1][same], verts[1:][same]
    f, s0 = fib[:-1][same], arc[:-1][same]
    k = max(1, int(math.ceil(params.step_um / params.sample_um)))
    t = (np.arange(k) + 0.5) / k
    pts = a[:, None, :] + t[None, :, None] * (b - a)[:, None, :]
    seg = np.linalg.norm(b - a, axis=1)
    return (
        pts.reshape(-1, 3),
        np.repeat(f, k),
        (s0[:, None] + t[None, :] * seg[:, None]).ravel(),
        np.repeat(seg / k, k),
    )


def _bead_gain(fibre: np.ndarray, arc: np.ndarray, params: FibreSimParams, rng) -> np.ndarray:
    """1 + the beads' extra photon density at each sample (nearest bead on each side)."""
    if params.varicosity_spacing_um <= 0 or params.varicosity_gain <= 0 or len(arc) == 0:
        return np.ones(len(arc))
    n_fib = int(fibre.max()) + 1
    top = np.zeros(n_fib)
    np.maximum.at(top, fibre, arc)
    # a global axis: fibre f occupies [offset_f, offset_f + top_f]
    offset = np.concatenate([[0.0], np.cumsum(top + 10 * params.varicosity_spacing_um)[:-1]])
    total = float(offset[-1] + top[-1])
    n_beads = rng.poisson(total / params.varicosity_spacing_um)
    beads = np.sort(rng.uniform(0, total, n_beads))
    x = offset[fibre] + arc
    i = np.searchsorted(beads, x)
    w = params.varicosity_length_um
    gain = np.ones(len(x))
    for j in (i - 1, i):
        ok = (j >= 0) & (j < len(beads))
        d = np.where(ok, x - beads[np.clip(j, 0, max(len(beads) - 1, 0))], np.inf)
        gain += params.varicosity_gain * np.exp(-0.5 * (d / w) ** 2)
    return gain


def _render(shape, points_um: np.ndarray, weights: np.ndarray, vs, sigma_um) -> np.ndarray:
    """Render Gaussians (SD ``sigma_um`` per axis) of mass ``weights`` at points, float32.

    Sampled at voxel centres: a voxel holds the density there times its volume.
    """
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    vs, sigma = np.asarray(vs, float), np.asarray(sigma_um, float)
    reach = np.ceil(3.5 * sigma / vs).astype(int)
    dims = np.asarray(shape)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    step = max(1, 2_000_000 // int(np.prod(2 * reach + 1)))
    for start in range(0, len(points_um), step):
        p = points_um[start : start + step]
        w = weights[start : start + step]
        base = np.floor(p / vs + 0.5).astype(np.int64)
        parts = []  # per axis: (n, k) voxel index, (n, k) weight
        for a in range(3):
            off = np.arange(-reach[a], reach[a] + 1)
            idx = base[:, a : a + 1] + off[None, :]
            d = idx * vs[a] - p[:, a : a + 1]
            g = vs[a] / (math.sqrt(2 * math.pi) * sigma[a]) * np.exp(-0.5 * (d / sigma[a]) ** 2)
            g[(idx < 0) | (idx >= dims[a])] = 0.0
            parts.append((np.clip(idx, 0, dims[a] - 1) * strides[a], g))
        (iz, gz), (iy, gy), (ix, gx) = parts
        flat = iz[:, :, None, None] + iy[:, None, :, None] + ix[:, None, None, :]
        val = (
            w[:, None, None, None]
            * gz[:, :, None, None]
            * gy[:, None, :, None]
            * gx[:, None, None, :]
        )
        out += np.bincount(flat.ravel(), weights=val.ravel(), minlength=out.size)
    return out.reshape(shape).astype(np.float32)


def _footprint(shape, points_um: np.ndarray, vs: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Voxels whose centre lies within the ellipsoid (semi-axes ``semi``, µm) of a point."""
    mask = np.zeros(shape, dtype=bool)
    if len(points_um) == 0:
        return mask
    semi = np.asarray(semi, dtype=float)
    reach = np.ceil(semi / vs).astype(int)
    centre = np.floor(points_um / vs + 0.5).astype(np.int64)
    dims = np.asarray(shape)
    for start in range(0, len(points_um), 200_000):
        p = points_um[start : start + 200_000]
        c0 = centre[start : start + 200_000]
        for off in np.ndindex(*(2 * reach + 1)):
            o = np.asarray(off) - reach
            vox = c0 + o
            d2 = np.sum(((vox * vs - p) / semi) ** 2, axis=1)
            ok = (d2 <= 1.0) & np.all((vox >= 0) & (vox < dims), axis=1)
            if ok.any():
                mask[tuple(vox[ok].T)] = True
    return mask


def _hard_core(points: np.ndarray, gap: float, n: int) -> np.ndarray:
    """Keep the first ``n`` points, in order, each farther than ``gap`` from those kept.

    A grid of cells ``gap`` wide holds the kept points, so each point is compared with
    the kept points of its 27 cells only.
    """
    if gap <= 0:
        return np.asarray(points[:n]).reshape(-1, 3)
    keep: list[np.ndarray] = []
    cells: dict[tuple, list[np.ndarray]] = {}
    for c in points:
        if len(keep) == n:
            break
        key = tuple(np.floor(c / gap).astype(int))
        near = (
            k
            for off in itertools.product((-1, 0, 1), repeat=3)
            for k in cells.get(tuple(a + b for a, b in zip(key, off)), ())
        )
        if any(np.linalg.norm(c - k) <= gap for k in near):
            continue
        keep.append(c)
        cells.setdefault(key, []).append(c)
    return np.asarray(keep).reshape(-1, 3)


def _smooth_field(shape, vs: np.ndarray, smooth_um: float, rng) -> np.ndarray:
    """Return a smooth random field of SD 1 (filtered noise on a coarse grid, zoomed)."""
    step = max(float(np.min(vs)), smooth_um / 4.0)
    coarse = tuple(max(2, int(math.ceil(n * v / step)) + 1) for n, v in zip(shape, vs))
    noise = ndi.gaussian_filter(rng.standard_normal(coarse), smooth_um / step, mode="wrap")
    noise /= noise.std() or 1.0
    zoom = [n / c for n, c in zip(shape, coarse)]
    return ndi.zoom(noise, zoom, order=1, grid_mode=True, mode="nearest")[
        : shape[0], : shape[1], : shape[2]
    ].astype(np.float32)


def _camera(photons: np.ndarray, params: FibreSimParams, rng) -> np.ndarray:
    """Shot + read noise (one Gaussian draw of variance photons + read²), offset, uint16."""
    photons = np.maximum(photons, 0, out=photons)
    sd = np.sqrt(photons + np.float32(params.read_noise**2))
    photons += sd * rng.standard_normal(photons.shape, dtype=np.float32)
    photons += np.float32(params.camera_offset)
    return np.clip(np.rint(photons), 0, 65535).astype(np.uint16)


def true_length_table(
    points: pd.DataFrame,
    labels: np.ndarray,
    hemispheres: np.ndarray | None,
    voxel_size_um,
) -> pd.DataFrame:
    """Measure the true centreline length and density per region (and hemisphere).

    Parameters
    ----------
    points : DataFrame
        ``z_um, y_um, x_um, length_um`` (e.g. :attr:`SimulatedFibres.points`, or a
        subset of it).
    labels : ndarray of int, shape (z, y, x)
        Region ids on the voxel grid.
    hemispheres : ndarray of int or None
        1 left, 2 right on the same grid; None: one row per region (hemisphere 0).
    voxel_size_um : tuple of float

    Returns
    -------
    DataFrame
        ``region_id, hemisphere, length_um, volume_mm3, density_mm_per_mm3`` for every
        (region, hemisphere) present in ``labels``.
    """
    vs = np.asarray(voxel_size_um, dtype=float)
    lab = np.asarray(labels).astype(np.int64)
    hem = np.zeros_like(lab) if hemispheres is None else np.asarray(hemispheres).astype(np.int64)
    key_vol = lab * 4 + hem
    keys, counts = np.unique(key_vol, return_counts=True)
    length = np.zeros(len(keys))
    if len(points):
        p = points[["z_um", "y_um", "x_um"]].to_numpy(float)
        vox = np.floor(p / vs + 0.5).astype(np.int64)
        ok = np.all((vox >= 0) & (vox < np.asarray(lab.shape)), axis=1)
        k = key_vol[tuple(vox[ok].T)]
        idx = np.searchsorted(keys, k)
        np.add.at(length, idx, points["length_um"].to_numpy(float)[ok])
    volume = counts * float(np.prod(vs)) * 1e-9
    return pd.DataFrame(
        {
            "region_id": keys // 4,
            "hemisphere": (keys % 4).astype(np.int8),
            "length_um": length,
            "volume_mm3": volume,
            "density_mm_per_mm3": length * 1e-3 / volume,
        }
    )


def simulate_fibres(
    labels,
    *,
    densities_mm_per_mm3: Mapping[int, float],
    fold_changes: Mapping[int, float] | None = None,
    hemispheres=None,
    params: FibreSimParams | None = None,
    seed: int = 0,
) -> SimulatedFibres:
    """Simulate a two-channel light-sheet volume of labelled axons with known truth.

    Parameters
    ----------
    labels : array_like of int, shape (z, y, x)
        Region id of every voxel (0 is a region like any other).
    densities_mm_per_mm3 : mapping of int to float
        Fibre length density per region id (mm of fibre per mm³); regions not listed
        get none.
    fold_changes : mapping of int to float, optional
        The group's multiplicative effect on a region's density (1 when not listed).
    hemispheres : array_like of int, optional
        1 left, 2 right per voxel: the true lengths are then split by hemisphere.
    params : FibreSimParams, optional
    seed : int
        Seed of every random draw (the nuisances draw from their own generators, so
        switching one on leaves the fibres as they were).

    Returns
    -------
    SimulatedFibres

    Raises
    ------
    ParameterError
        If ``params`` is not a :class:`FibreSimParams`, a density or fold change is
        negative or not finite.
    InputError
        If ``labels`` is not a 3D integer volume, or ``hemispheres`` has another shape.

    Examples
    --------
    >>> labels, hemi = region_slabs((10, 40, 40), (1, 2))
    >>> sim = simulate_fibres(labels, densities_mm_per_mm3={1: 2000.0, 2: 500.0}, seed=1)
    >>> sim.signal.shape, sim.signal.dtype.name, bool(sim.true_mask.any())
    ((10, 40, 40), 'uint16', True)
    """
    params = FibreSimParams() if params is None else params
    if not isinstance(params, FibreSimParams):
        raise ParameterError(f"params must be a FibreSimParams, got {type(params).__name__}.")
    lab = np.asarray(labels)
    if lab.ndim != 3 or not np.issubdtype(lab.dtype, np.integer) or 0 in lab.shape:
        raise InputError(
            f"labels must be a non-empty 3D integer volume (z, y, x), got shape {lab.shape} "
            f"and dtype {lab.dtype}."
        )
    hem = None
    if hemispheres is not None:
        hem = np.asarray(hemispheres)
        if hem.shape != lab.shape:
            raise InputError(
                f"hemispheres have shape {hem.shape} but labels have shape {lab.shape}."
            )
    fold_changes = dict(fold_changes or {})
    for name, table in (
        ("densities_mm_per_mm3", densities_mm_per_mm3),
        ("fold_changes", fold_changes),
    ):
        for key, value in table.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ParameterError(
                    f"{name}[{key!r}] must be a finite number >= 0, got {value!r}."
                )
    shape = lab.shape
    vs = np.asarray(params.voxel_size_um, dtype=float)
    extent = np.asarray(shape) * vs
    rng = np.random.default_rng(seed)

    # ---- the density of every region (µm of fibre per µm³) relative to the densest
    ids = np.unique(lab)
    rho = np.array(
        [densities_mm_per_mm3.get(int(i), 0.0) * fold_changes.get(int(i), 1.0) for i in ids]
    )
    rho_max = float(rho.max()) if len(rho) else 0.0
    target = pd.DataFrame({"region_id": ids.astype(np.int64), "target_mm_per_mm3": rho})

    # ---- tissue (a void beyond tissue_fraction of x)
    tissue = np.ones(shape, dtype=bool)
    if params.tissue_fraction < 1:
        tissue[:, :, int(round(params.tissue_fraction * shape[2])) :] = False

    # ---- fibres on the torus of the box; each drawn where u < rho_k / rho_max
    if rho_max > 0:
        total_um = rho_max * 1e-6 * float(np.prod(extent))  # mm/mm³ = 1e-6 µm/µm³
        verts, fib, arc, parents = _walks(total_um, params, extent, rng)
    else:
        verts, fib, arc, parents = np.zeros((0, 3)), np.zeros(0, int), np.zeros(0), np.zeros(0)
    n_fib = len(parents)
    diam = rng.uniform(*params.fibre_diameter_um, n_fib)
    cv = params.brightness_cv
    bright = np.exp(rng.normal(-0.5 * np.log1p(cv**2), np.sqrt(np.log1p(cv**2)), n_fib))
    u = rng.uniform(0, 1, n_fib)
    for i in range(n_fib):  # a branch has its parent's diameter and brightness (not its u)
        if parents[i] >= 0:
            diam[i], bright[i] = diam[parents[i]], bright[parents[i]]
    pts, pf, parc, plen = _samples(verts, fib, arc, params)
    gain = _bead_gain(pf, parc, params, rng)
    pts = np.mod(pts + 0.5 * vs, extent) - 0.5 * vs  # wrap onto the box
    vox = np.clip(np.floor(pts / vs + 0.5).astype(np.int64), 0, np.asarray(shape) - 1)
    where = tuple(vox.T)
    plab = lab[where]
    rel = np.zeros(len(pts))
    if rho_max > 0:
        rel = rho[np.searchsorted(ids, plab)] / rho_max
    visible = (u[pf] < rel) & tissue[where]
    pts, pf, plen, gain, plab = (
        pts[visible],
        pf[visible],
        plen[visible],
        gain[visible],
        plab[visible],
    )
    points = pd.DataFrame(
        {
            "z_um": pts[:, 0],
            "y_um": pts[:, 1],
            "x_um": pts[:, 2],
            "length_um": plen,
            "fibre": pf.astype(np.int64),
            "region_id": plab.astype(np.int64),
        }
    )

    # ---- imaging: Gaussians of SD sqrt(psf² + v²/12) (PSF and the voxel's box) per sample
    sig_img = np.asarray(image_sigma_um(params))
    # photons per µm so that a 1 µm fibre along x peaks at fibre_snr noise SDs
    peak = params.fibre_snr * params.noise_sd_photons
    per_um = peak * 2 * math.pi * sig_img[0] * sig_img[1] / float(np.prod(vs))
    weights = per_um * plen * gain * diam[pf] * bright[pf]
    fibres = _render(shape, pts, weights, vs, sig_img)
    true_mask = _footprint(shape, pts, vs, params.mask_radius_vox * vs)

    # ---- somata
    srng = np.random.default_rng([seed, _STREAM_SOMATA])
    n_somata = srng.poisson(params.soma_density_per_mm3 * float(tissue.sum() * np.prod(vs)) * 1e-9)
    soma_pts = np.zeros((0, 3))
    if n_somata:
        cand = srng.uniform(0, 1, (4 * n_somata, 3)) * (np.asarray(shape) - 1) * vs
        in_tissue = tissue[tuple(np.floor(cand / vs + 0.5).astype(int).T)]
        gap = params.soma_spacing_diameters * params.soma_diameter_um[1]
        soma_pts = _hard_core(cand[in_tissue], gap, n_somata)
    soma_d = srng.uniform(*params.soma_diameter_um, len(soma_pts))
    soma_peak = (
        params.soma_snr
        * params.noise_sd_photons
        * np.exp(srng.normal(-0.5 * np.log1p(0.04), np.sqrt(np.log1p(0.04)), len(soma_pts)))
    )
    somata_img = np.zeros(shape, np.float32)
    if len(soma_pts):
        for pt, dia, pk in zip(soma_pts, soma_d, soma_peak):
            s_um = np.sqrt((dia / 4.0) ** 2 + sig_img**2)
            mass = pk * (2 * math.pi) ** 1.5 * float(np.prod(s_um / vs))
            somata_img += _render(shape, pt[None], np.array([mass]), vs, s_um)
    somata = pd.DataFrame(
        {
            "z_vox": soma_pts[:, 0] / vs[0],
            "y_vox": soma_pts[:, 1] / vs[1],
            "x_vox": soma_pts[:, 2] / vs[2],
            "z_um": soma_pts[:, 0],
            "y_um": soma_pts[:, 1],
            "x_um": soma_pts[:, 2],
            "diameter_um": soma_d,
            "peak_photons": soma_peak,
        }
    )

    # ---- autofluorescence, illumination, tiles
    auto = params.autofluorescence_photons * np.clip(
        1.0
        + params.background_variation
        * _smooth_field(shape, vs, params.background_smoothness_um, rng),
        0.1,
        None,
    )
    auto[~tissue] = 0.0
    x = np.linspace(0, 1, shape[2], dtype=np.float32)
    illum = (1 - params.illumination_gradient * x)[None, None, :]
    stripes = rng.standard_normal((shape[0], shape[1])).astype(np.float32)
    stripes = ndi.gaussian_filter1d(ndi.gaussian_filter1d(stripes, 0.7, axis=1), 3.0, axis=0)
    stripes = np.clip(1 + params.stripe_amplitude * stripes / (stripes.std() or 1), 0.2, None)
    illum = stripes[:, :, None] * illum
    if params.tile_shape_vox is not None and params.tile_gain_cv > 0:
        trng = np.random.default_rng([seed, _STREAM_TILES])
        ty, tx = params.tile_shape_vox
        yt, xt = np.arange(shape[1]) // ty, np.arange(shape[2]) // tx
        tcv = params.tile_gain_cv
        g = np.exp(
            trng.normal(
                -0.5 * np.log1p(tcv**2), np.sqrt(np.log1p(tcv**2)), (yt[-1] + 1, xt[-1] + 1)
            )
        )
        illum = illum * g[yt[:, None], xt[None, :]][None].astype(np.float32)
    crng = np.random.default_rng([seed, _STREAM_CAMERA])
    signal = _camera(
        ((fibres + somata_img + params.bleed_through * auto) * illum).astype(np.float32),
        params,
        rng,
    )
    background = _camera((auto * illum).astype(np.float32), params, crng)

    # ---- hot pixels (signal channel, after the camera)
    hot = np.zeros((0, 3), dtype=np.int64)
    if params.hot_pixel_rate_per_voxel > 0:
        hrng = np.random.default_rng([seed, _STREAM_HOT])
        n_hot = min(int(hrng.poisson(params.hot_pixel_rate_per_voxel * signal.size)), signal.size)
        flat = np.sort(hrng.choice(signal.size, n_hot, replace=False))
        lo, hi = np.log(params.hot_pixel_counts[0]), np.log(params.hot_pixel_counts[1])
        amp = np.rint(np.exp(hrng.uniform(lo, hi, n_hot)))
        view = signal.reshape(-1)
        view[flat] = np.clip(view[flat] + amp, 0, 65535).astype(np.uint16)
        hot = np.stack(np.unravel_index(flat, shape), axis=1)

    lengths = true_length_table(points, lab, hem, vs).merge(target, on="region_id", how="left")
    return SimulatedFibres(
        signal=signal,
        background=background,
        true_mask=true_mask.astype(np.uint8),
        fibre_image=fibres,
        lengths=lengths,
        points=points,
        somata=somata,
        tissue=tissue,
        hot_pixels=hot,
        voxel_size_um=tuple(float(v) for v in vs),
        params=params,
    )


def plant_fibres(
    volume,
    *,
    noise_sd: float,
    density_mm_per_mm3: float,
    params: FibreSimParams | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, SimulatedFibres]:
    """Add simulated fibres of known truth to a real volume: a check on real tissue.

    The fibres are drawn and imaged as by :func:`simulate_fibres` (``params``: the
    volume's voxel size, the PSF, ``fibre_snr`` ...) at one density over the whole
    volume. Their photons get shot noise (Poisson) and are scaled so that
    ``fibre_snr`` is in units of the volume's own noise SD: ``noise_sd / noise_sd_photons``
    counts per photon. The sum is rounded and clipped to the range of an integer
    ``volume``'s dtype. Segmenting the volume with and without the fibres, the voxels
    and length found only with them are scored against the truth; what the tissue
    itself holds (its own fibres, cells, vessels) is left out by that difference.

    Parameters
    ----------
    volume : array_like, shape (z, y, x)
        The real signal channel (integer or float); not modified.
    noise_sd : float
        The volume's noise SD in its own units (e.g. ``noise_sd_median`` of
        :func:`~ketamap.wholebrain.fibres.segment_fibres`' QC on the volume).
    density_mm_per_mm3 : float
        Fibre length density planted (mm/mm³).
    params : FibreSimParams, optional
        Fibres and imaging; ``voxel_size_um`` must be the volume's.
    seed : int

    Returns
    -------
    hybrid : numpy.ndarray
        The volume plus the fibres, in the volume's dtype.
    truth : SimulatedFibres
        The planted fibres: ``true_mask``, ``lengths`` (one region, id 1), ``points``
        and ``fibre_image`` (photons). Its ``signal`` and ``background`` are the
        simulator's own channels, not part of the hybrid.

    Raises
    ------
    InputError
        If ``volume`` is not a non-empty 3D array.
    ParameterError
        If ``noise_sd`` or the density is not a finite number > 0.

    Examples
    --------
    >>> real = np.full((8, 40, 40), 200, np.uint16)
    >>> hybrid, truth = plant_fibres(real, noise_sd=10.0, density_mm_per_mm3=2000.0, seed=1)
    >>> hybrid.dtype.name, bool((hybrid >= real).all()), bool(truth.true_mask.any())
    ('uint16', True, True)
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or 0 in vol.shape:
        raise InputError(f"volume must be a non-empty 3D array (z, y, x), got shape {vol.shape}.")
    for name, value in (("noise_sd", noise_sd), ("density_mm_per_mm3", density_mm_per_mm3)):
        number = isinstance(value, (int, float, np.integer, np.floating))
        if not (number and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise ParameterError(f"{name} must be a finite number > 0, got {value!r}.")
    params = FibreSimParams() if params is None else params
    truth = simulate_fibres(
        np.ones(vol.shape, np.uint8),
        densities_mm_per_mm3={1: float(density_mm_per_mm3)},
        params=params,
        seed=seed,
    )
    rng = np.random.default_rng([seed, _STREAM_PLANT])
    added = rng.poisson(truth.fibre_image).astype(np.float64)
    added *= float(noise_sd) / params.noise_sd_photons
    hybrid = vol.astype(np.float64) + added
    if np.issubdtype(vol.dtype, np.integer):
        info = np.iinfo(vol.dtype)
        hybrid = np.clip(np.rint(hybrid), info.min, info.max)
    return hybrid.astype(vol.dtype), truth
