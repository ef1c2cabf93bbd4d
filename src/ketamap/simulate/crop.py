"""Simulate a small light-sheet crop on a fine grid, with the failure modes of real tissue.

The yardstick of cell detection: a (z, y, x) crop at cellular resolution
(default 5 x 2 x 2 µm voxels) with known somata, imaged in two channels with the
imaging model of the census simulator (:mod:`ketamap.simulate.brain`):

* **signal** (e.g. TH): somata of 12-18 µm rendered as Gaussians of sigma
  sqrt((d / 4)^2 + psf^2) per axis (psf (4, 1.5, 1.5) µm), peak photons
  log-normal (CV 0.25) around a mean brightness set by the signal-to-noise
  ratio, plus autofluorescence bleed-through (0.2 x 300 = 60 photons, +-30 %
  smooth variation over ~100 µm);
* **background** (autofluorescence): 300 photons with the same smooth
  variation, its own shot and read noise;

both with an illumination gradient along x (30 %) and light-sheet stripes
(10 %, constant along x), shot noise (variance = mean) plus read noise (SD 6),
camera offset 100, uint16. Cells are uniform with a hard-core distance of
10 µm.

Failure modes seen on real tissue, each off by default and switched on by a
:class:`CropParams` field (all drawn from generators separate from the base
model, so that with every one of them off the signal is the same, bit for bit,
as the model without them for the same seed):

``tissue_fraction`` < 1 (void)
    Tissue fills part of the crop, bounded by a large sphere (radius about
    ``tissue_curvature_radius_um``); outside it no photons at all (no
    autofluorescence, no cells): camera offset + read noise only. Set
    ``camera_offset`` and ``read_noise`` low (e.g. 12 and 1.5) for the
    near-noiseless void of real sCMOS data.
``hot_pixel_rate_per_voxel`` > 0, ``streak_rate_per_plane`` > 0
    Single-voxel spikes (hot pixels, cosmic hits) anywhere, void included, of
    log-uniform amplitude in ``hot_pixel_counts`` (camera counts added after the
    camera model, signal channel); single-plane line spikes along x (one z plane,
    one y row, ``streak_length_vox`` long).
``tile_shape_vox`` and ``tile_gain_cv`` > 0, ``dark_tile``
    A stitched mosaic: each (y, x) tile's photons (both channels) multiplied by
    its own log-normal gain (mean 1), a hard step at each seam; optionally one
    tile left unlabelled (no signal photons there, only offset and noise).
``edge_photons`` > 0 (with a void)
    Extra autofluorescence in a rim ``edge_width_um`` deep just inside the
    tissue surface (both channels, the signal through bleed-through).
``cluster_fraction`` > 0
    That share of the cells sits in clusters of ``cluster_size`` cells whose
    neighbours are ``cluster_spacing_diameters`` soma diameters apart, centre to
    centre (dense nuclei such as VTA and SNc reach 10 000-20 000 cells/mm³).

:func:`score_detections` scores detections against the truth (one-to-one
Hungarian matching within a distance).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from ketamap.errors import ParameterError
from ketamap.params import bounds, validate

__all__ = [
    "CropParams",
    "SimulatedCrop",
    "simulate_crop",
    "match_detections",
    "score_detections",
    "inner_mask",
]

# Stream ids of the generators of the failure modes: np.random.default_rng([seed, id]).
# The base model draws from np.random.default_rng(seed) in a fixed order.
_STREAM_PLACEMENT = 1
_STREAM_TISSUE = 2
_STREAM_TILES = 3
_STREAM_HOT = 4
_STREAM_BACKGROUND = 5


@dataclass(frozen=True)
class CropParams:
    """Imaging, cells and failure modes of one simulated light-sheet crop (units in names).

    Parameters
    ----------
    voxel_size_um : tuple of float
        Voxel size (z, y, x).
    snr : float
        Mean soma peak photons over the noise SD of the mean background,
        sqrt(bleed_through x autofluorescence_photons + read_noise²): the mean
        brightness is ``snr`` times that SD (default 51: 500 photons, the
        census simulator's default).
    density_per_mm3 : float
        Mean cell density in tissue (cells/mm³); the count is Poisson.
    soma_diameter_um : tuple of float
        Range (min, max) of soma diameters, drawn uniformly; (12, 12) fixes it.
    psf_sigma_um : tuple of float
        Point-spread function (z, y, x) as a Gaussian sigma.
    brightness_cv : float
        Coefficient of variation of the log-normal soma peak photons.
    autofluorescence_photons : float
        Mean photons of the autofluorescence (background) channel.
    bleed_through : float
        Fraction of the autofluorescence seen in the signal channel.
    background_variation : float
        Amplitude of the smooth relative variation of the autofluorescence.
    background_smoothness_um : float
        Gaussian sigma of that variation.
    illumination_gradient : float
        Relative intensity loss across x.
    stripe_amplitude : float
        Relative SD of the light-sheet stripes.
    read_noise : float
        Read noise SD (counts).
    camera_offset : float
        Camera offset (counts).
    hard_core_um : float
        Minimum distance between two unclustered cell centres.
    tissue_fraction : float
        Fraction of the crop's voxels that hold tissue; below 1 the rest is void.
    tissue_curvature_radius_um : float
        Radius of curvature of the tissue surface (the sphere bounding it).
    hot_pixel_rate_per_voxel : float
        Expected single-voxel spikes per voxel (Poisson count).
    hot_pixel_counts : tuple of float
        Range (min, max) of the spikes' log-uniform amplitude (counts).
    streak_rate_per_plane : float
        Expected line spikes along x per z plane.
    streak_length_vox : tuple of int
        Range (min, max) of a line spike's length (voxels).
    tile_shape_vox : tuple of int or None
        (y, x) size of the stitched tiles; None: one tile.
    tile_gain_cv : float
        Coefficient of variation of the tiles' log-normal gains (mean 1).
    dark_tile : bool
        Leave one whole tile unlabelled (signal: no photons; needs tiles).
    edge_photons : float
        Extra autofluorescence photons in the rim just inside the tissue surface.
    edge_width_um : float
        Depth of that rim.
    cluster_fraction : float
        Share of the cells placed in clusters.
    cluster_size : tuple of int
        Range (min, max) of the cells per cluster, drawn uniformly.
    cluster_spacing_diameters : tuple of float
        Range (min, max) of the distance between a clustered cell and the
        cluster member it grows from, in mean soma diameters; no other cell
        comes closer than the minimum.
    """

    voxel_size_um: tuple[float, float, float] = field(
        default=(5.0, 2.0, 2.0), metadata=bounds(gt=0, le=1000, doc="voxel size (z, y, x)")
    )
    snr: float = field(default=51.0, metadata=bounds(gt=0, doc="mean soma peak / noise SD"))
    density_per_mm3: float = field(
        default=5000.0, metadata=bounds(ge=0, le=1e6, doc="cells per mm³ of tissue")
    )
    soma_diameter_um: tuple[float, float] = field(
        default=(12.0, 18.0), metadata=bounds(gt=0, le=200, doc="soma diameter range (min, max)")
    )
    psf_sigma_um: tuple[float, float, float] = field(
        default=(4.0, 1.5, 1.5), metadata=bounds(ge=0, le=100, doc="PSF sigma (z, y, x)")
    )
    brightness_cv: float = field(default=0.25, metadata=bounds(ge=0, le=2))
    autofluorescence_photons: float = field(default=300.0, metadata=bounds(ge=0))
    bleed_through: float = field(default=0.2, metadata=bounds(ge=0, le=1))
    background_variation: float = field(
        default=0.3, metadata=bounds(ge=0, lt=1, doc="smooth relative autofluorescence change")
    )
    background_smoothness_um: float = field(default=50.0, metadata=bounds(gt=0))
    illumination_gradient: float = field(
        default=0.3, metadata=bounds(ge=0, lt=1, doc="relative intensity loss across x")
    )
    stripe_amplitude: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    read_noise: float = field(default=6.0, metadata=bounds(ge=0, doc="read noise SD (counts)"))
    camera_offset: float = field(default=100.0, metadata=bounds(ge=0, le=10000))
    hard_core_um: float = field(default=10.0, metadata=bounds(ge=0))
    tissue_fraction: float = field(
        default=1.0, metadata=bounds(gt=0, le=1, doc="share of voxels in tissue (< 1: void)")
    )
    tissue_curvature_radius_um: float = field(default=3000.0, metadata=bounds(gt=0))
    hot_pixel_rate_per_voxel: float = field(default=0.0, metadata=bounds(ge=0, le=0.01))
    hot_pixel_counts: tuple[float, float] = field(
        default=(30.0, 3000.0), metadata=bounds(gt=0, le=65535, doc="spike amplitude range")
    )
    streak_rate_per_plane: float = field(default=0.0, metadata=bounds(ge=0, le=100))
    streak_length_vox: tuple[int, int] = field(default=(5, 40), metadata=bounds(ge=1))
    tile_shape_vox: tuple[int, int] | None = field(
        default=None, metadata=bounds(ge=1, doc="stitched tile size (y, x) in voxels")
    )
    tile_gain_cv: float = field(default=0.0, metadata=bounds(ge=0, le=2))
    dark_tile: bool = False
    edge_photons: float = field(default=0.0, metadata=bounds(ge=0))
    edge_width_um: float = field(default=20.0, metadata=bounds(gt=0))
    cluster_fraction: float = field(default=0.0, metadata=bounds(ge=0, le=1))
    cluster_size: tuple[int, int] = field(default=(3, 8), metadata=bounds(ge=2, le=1000))
    cluster_spacing_diameters: tuple[float, float] = field(
        default=(1.0, 1.5), metadata=bounds(gt=0, le=10)
    )

    def __post_init__(self):
        validate(self)
        for name in (
            "soma_diameter_um",
            "hot_pixel_counts",
            "streak_length_vox",
            "cluster_size",
            "cluster_spacing_diameters",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ParameterError(
                    f"CropParams.{name} must be a range (min, max) with min <= max, "
                    f"got {(lo, hi)!r}."
                )
        if self.dark_tile and self.tile_shape_vox is None:
            raise ParameterError("CropParams.dark_tile needs tile_shape_vox (the tiles).")

    @property
    def background_photons(self) -> float:
        """Mean autofluorescence photons bleeding into the signal channel."""
        return self.bleed_through * self.autofluorescence_photons

    @property
    def noise_sd_photons(self) -> float:
        """Noise SD of the mean signal background: sqrt(background + read noise²)."""
        return float(np.sqrt(self.background_photons + self.read_noise**2))

    @property
    def brightness_photons(self) -> float:
        """Mean soma peak photons: ``snr`` x :attr:`noise_sd_photons`."""
        return self.snr * self.noise_sd_photons


@dataclass(frozen=True, eq=False)
class SimulatedCrop:
    """One simulated crop: two channels and the truth.

    Attributes
    ----------
    signal, background : ndarray of uint16, shape (z, y, x)
        Marker channel (with autofluorescence bleed-through, hot pixels and
        streaks) and autofluorescence channel (its own noise, no spikes).
    cells : DataFrame
        One row per imaged cell (not in the void, not in a dark tile):
        ``z_vox, y_vox, x_vox`` (sub-voxel centre), ``z_um, y_um, x_um``,
        ``diameter_um``, ``brightness`` (peak photons before illumination and
        tile gain), ``nn_distance_um`` (to the nearest other cell of the table;
        NaN with fewer than two) and ``in_cluster`` (bool).
    tissue : ndarray of bool, shape (z, y, x)
        True where there is tissue.
    hot_pixels : ndarray of int, shape (n, 3)
        (z, y, x) of the single-voxel spikes, sorted.
    hot_pixel_amplitudes : ndarray of float, shape (n,)
        Counts added at each (before clipping to uint16).
    streaks : ndarray of int, shape (m, 4)
        Line spikes as (z, y, x_start, length): voxels x_start .. x_start + length - 1.
    seams : dict
        Empty without tiles, else ``tile_shape_vox``, ``y_tile`` and ``x_tile``
        (the tile row of every y and the tile column of every x), ``y_seams_vox``
        and ``x_seams_vox`` (first row / column of every tile but the first),
        ``gains`` (n_rows x n_cols) and ``dark_tile`` ((row, column) or None).
    voxel_size_um : tuple of float
    params : CropParams
    """

    signal: np.ndarray
    background: np.ndarray
    cells: pd.DataFrame
    tissue: np.ndarray
    hot_pixels: np.ndarray
    hot_pixel_amplitudes: np.ndarray
    streaks: np.ndarray
    seams: dict
    voxel_size_um: tuple[float, float, float]
    params: CropParams


def _hard_core_points(
    n: int,
    extent_um: np.ndarray,
    min_dist_um: float,
    rng,
    *,
    avoid: np.ndarray | None = None,
    avoid_um: float = 0.0,
) -> np.ndarray:
    """Up to ``n`` uniform points in a box, no two closer than ``min_dist_um``.

    Random sequential addition in batches: candidates near an accepted point are
    dropped, conflicts inside a batch are resolved in drawing order. Points of ``avoid``
    keep candidates ``avoid_um`` away.
    """
    pts = np.empty((0, 3))
    for _ in range(100):
        need = n - len(pts)
        if need <= 0:
            break
        cand = rng.uniform(0, 1, (need, 3)) * extent_um
        if avoid is not None and len(avoid):
            d, _ = cKDTree(avoid).query(cand, distance_upper_bound=avoid_um)
            cand = cand[~(d < avoid_um)]
        if len(pts):
            d, _ = cKDTree(pts).query(cand, distance_upper_bound=min_dist_um)
            cand = cand[~(d < min_dist_um)]
        keep = np.ones(len(cand), bool)
        neighbours: dict[int, list[int]] = {}
        for i, j in cKDTree(cand).query_pairs(min_dist_um):
            neighbours.setdefault(min(i, j), []).append(max(i, j))
        for i in range(len(cand)):
            if keep[i]:
                for j in neighbours.get(i, ()):
                    keep[j] = False
        pts = np.vstack([pts, cand[keep]])
    return pts[:n]


def _clustered_points(
    n: int, extent_um: np.ndarray, params: CropParams, rng
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points, ``cluster_fraction`` of them in clusters; returns (points, in_cluster).

    A cluster starts at a uniform point and grows one cell at a time: each new
    cell sits at a uniform distance in the spacing range from a random member,
    in a random direction, and is kept when no other point is closer than the
    spacing minimum. Unclustered cells then fill the box with the hard core
    among themselves and the spacing minimum from clustered cells.
    """
    diameter = float(np.mean(params.soma_diameter_um))
    lo, hi = (s * diameter for s in params.cluster_spacing_diameters)
    min_cl = max(lo, params.hard_core_um)
    target = int(round(params.cluster_fraction * n))
    pts = np.empty((max(target, 1), 3))
    flag = np.zeros(max(target, 1), bool)
    m = 0

    def free(c: np.ndarray) -> bool:
        if np.any(c < 0) or np.any(c > extent_um):
            return False
        return m == 0 or float(np.min(np.sum((pts[:m] - c) ** 2, axis=1))) >= min_cl**2

    failures = 0
    while target - m >= 2 and failures < 1000:
        k = min(int(rng.integers(params.cluster_size[0], params.cluster_size[1] + 1)), target - m)
        seed_pt = rng.uniform(0, 1, 3) * extent_um
        if not free(seed_pt):
            failures += 1
            continue
        start = m
        pts[m] = seed_pt
        m += 1
        for _ in range(k - 1):
            for _try in range(50):
                parent = pts[start + int(rng.integers(0, m - start))]
                direction = rng.standard_normal(3)
                direction /= np.linalg.norm(direction) or 1.0
                cand = parent + direction * rng.uniform(lo, hi)
                if free(cand):
                    pts[m] = cand
                    m += 1
                    break
            else:
                break
        if m - start >= 2:
            flag[start:m] = True
        else:
            failures += 1
    clustered, in_cluster = pts[:m], flag[:m]
    # unclustered cells: hard core among themselves, min_cl from the clustered ones
    singles = _hard_core_points(
        max(n - m, 0), extent_um, params.hard_core_um, rng, avoid=clustered, avoid_um=min_cl
    )
    return (
        np.vstack([clustered, singles]),
        np.concatenate([in_cluster, np.zeros(len(singles), bool)]),
    )


def _tissue(shape, vs: np.ndarray, params: CropParams, rng) -> tuple[np.ndarray, np.ndarray]:
    """Tissue mask and depth below the surface (µm; negative in the void)."""
    theta = rng.uniform(0, 2 * np.pi)
    normal = np.array([rng.normal(0, 0.3), np.sin(theta), np.cos(theta)])
    normal /= np.linalg.norm(normal)
    centre = (np.asarray(shape) - 1) * vs / 2 - normal * params.tissue_curvature_radius_um
    axes = [(np.arange(n) * v - c).astype(np.float32) for n, v, c in zip(shape, vs, centre)]
    dist = np.sqrt(
        axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    )
    k = int(round(params.tissue_fraction * dist.size)) - 1
    radius = np.partition(dist.ravel(), max(k, 0))[max(k, 0)] if k >= 0 else -1.0
    depth = np.float32(radius) - dist
    return depth >= 0, depth


def _tiles(shape, params: CropParams, rng) -> dict:
    """Tile layout (random origin) and log-normal gains of a stitched mosaic."""
    ty, tx = params.tile_shape_vox
    oy, ox = int(rng.integers(0, ty)), int(rng.integers(0, tx))
    y_tile = (np.arange(shape[1]) + oy) // ty
    x_tile = (np.arange(shape[2]) + ox) // tx
    n_rows, n_cols = int(y_tile[-1]) + 1, int(x_tile[-1]) + 1
    cv = params.tile_gain_cv
    gains = np.exp(rng.normal(-0.5 * np.log1p(cv**2), np.sqrt(np.log1p(cv**2)), (n_rows, n_cols)))
    dark = None
    if params.dark_tile:
        area = np.bincount(y_tile)[:, None] * np.bincount(x_tile)[None, :]
        biggest = np.argwhere(area == area.max())
        r, c = biggest[int(rng.integers(0, len(biggest)))]
        dark = (int(r), int(c))
    return {
        "tile_shape_vox": (int(ty), int(tx)),
        "y_tile": y_tile,
        "x_tile": x_tile,
        "y_seams_vox": np.flatnonzero(np.diff(y_tile)) + 1,
        "x_seams_vox": np.flatnonzero(np.diff(x_tile)) + 1,
        "gains": gains,
        "dark_tile": dark,
    }


def _log_uniform(rng, lo_hi, n: int) -> np.ndarray:
    lo, hi = np.log(lo_hi[0]), np.log(lo_hi[1])
    return np.exp(rng.uniform(lo, hi, n))


def _camera(photons: np.ndarray, params: CropParams, rng) -> np.ndarray:
    """Shot + read noise (one Gaussian draw of variance photons + read²), offset, uint16."""
    sd = np.sqrt(photons + np.float32(params.read_noise**2))
    photons += sd * rng.standard_normal(photons.shape, dtype=np.float32)
    photons += np.float32(params.camera_offset)
    return np.clip(np.rint(photons), 0, 65535).astype(np.uint16)


def simulate_crop(
    shape: tuple[int, int, int], *, params: CropParams | None = None, seed: int = 0
) -> SimulatedCrop:
    """Simulate a two-channel light-sheet crop with known cells and artefacts.

    Parameters
    ----------
    shape : tuple of int
        Volume shape (z, y, x) in voxels.
    params : CropParams, optional
        Imaging, cells and failure modes; defaults to ``CropParams()``.
    seed : int
        Seed of every random draw. The base model draws from
        ``np.random.default_rng(seed)``, each failure mode from its own
        ``np.random.default_rng([seed, k])``, so switching one on leaves the
        others' draws alone.

    Returns
    -------
    SimulatedCrop

    Raises
    ------
    ParameterError
        If ``shape`` is not three positive integers or ``params`` is not a
        :class:`CropParams`.

    Examples
    --------
    >>> crop = simulate_crop((8, 32, 32), params=CropParams(density_per_mm3=20_000), seed=1)
    >>> crop.signal.shape, crop.signal.dtype.name
    ((8, 32, 32), 'uint16')
    """
    params = CropParams() if params is None else params
    if not isinstance(params, CropParams):
        raise ParameterError(f"params must be a CropParams, got {type(params).__name__}.")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ParameterError(f"shape must be three positive integers, got {shape!r}.") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ParameterError(f"shape must be three positive integers, got {shape!r}.")

    rng = np.random.default_rng(seed)
    vs = np.asarray(params.voxel_size_um, float)
    extent = (np.asarray(shape) - 1) * vs
    n = rng.poisson(params.density_per_mm3 * np.prod(np.asarray(shape) * vs) * 1e-9)
    if params.cluster_fraction > 0:
        truth_um, in_cluster = _clustered_points(
            n, extent, params, np.random.default_rng([seed, _STREAM_PLACEMENT])
        )
    else:
        truth_um = _hard_core_points(n, extent, params.hard_core_um, rng)
        in_cluster = np.zeros(len(truth_um), bool)
    truth = truth_um / vs

    # smooth autofluorescence (+-30 % over ~100 µm); the signal holds its bleed-through
    field_ = ndi.gaussian_filter(rng.standard_normal(shape), params.background_smoothness_um / vs)
    field_ = 1 + params.background_variation * field_ / (np.abs(field_).max() or 1)
    photons = (params.background_photons * field_).astype(np.float32)
    auto = (params.autofluorescence_photons * field_).astype(np.float32)
    del field_
    cv = params.brightness_cv
    peaks = params.brightness_photons * np.exp(
        rng.normal(-0.5 * np.log1p(cv**2), np.sqrt(np.log1p(cv**2)), len(truth))
    )
    diam = rng.uniform(params.soma_diameter_um[0], params.soma_diameter_um[1], len(truth))

    # tissue and void: cells only in tissue
    if params.tissue_fraction < 1:
        tissue, depth = _tissue(shape, vs, params, np.random.default_rng([seed, _STREAM_TISSUE]))
    else:
        tissue, depth = np.ones(shape, bool), None
    seams = (
        _tiles(shape, params, np.random.default_rng([seed, _STREAM_TILES]))
        if params.tile_shape_vox is not None
        else {}
    )
    idx = np.clip(np.rint(truth).astype(np.intp), 0, np.asarray(shape) - 1)
    visible = tissue[tuple(idx.T)] if len(truth) else np.zeros(0, bool)
    if seams.get("dark_tile") is not None:
        r, c = seams["dark_tile"]
        visible &= ~((seams["y_tile"][idx[:, 1]] == r) & (seams["x_tile"][idx[:, 2]] == c))

    psf = np.asarray(params.psf_sigma_um)
    for c, peak, d in zip(truth[visible], peaks[visible], diam[visible], strict=True):
        sig = np.sqrt((d / 4) ** 2 + psf**2) / vs
        lo = np.maximum(np.floor(c - 4 * sig).astype(int), 0)
        hi = np.minimum(np.ceil(c + 4 * sig).astype(int) + 1, shape)
        prof = [np.exp(-0.5 * ((np.arange(lo[a], hi[a]) - c[a]) / sig[a]) ** 2) for a in range(3)]
        blob = prof[0][:, None, None] * prof[1][None, :, None] * prof[2][None, None, :]
        photons[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += np.float32(peak) * blob
    if params.edge_photons > 0 and depth is not None:
        rim = tissue & (depth < params.edge_width_um)
        auto[rim] += np.float32(params.edge_photons)
        photons[rim] += np.float32(params.bleed_through * params.edge_photons)
    x = np.linspace(0, 1, shape[2], dtype=np.float32)
    gradient = 1 - params.illumination_gradient * x
    stripes = ndi.gaussian_filter1d(rng.standard_normal(shape[:2]), 0.7, axis=1)
    stripes = ndi.gaussian_filter1d(stripes, 3.0, axis=0)
    stripes = 1 + params.stripe_amplitude * stripes / (stripes.std() or 1)
    illumination = (np.clip(stripes, 0.2, None)[:, :, None] * gradient[None, None, :]).astype(
        np.float32
    )
    photons *= illumination
    auto *= illumination
    del illumination
    if depth is not None:
        photons[~tissue] = 0
        auto[~tissue] = 0
    if seams:
        gain = seams["gains"][seams["y_tile"][:, None], seams["x_tile"][None, :]].astype(np.float32)
        photons *= gain[None]
        auto *= gain[None]
        if seams["dark_tile"] is not None:
            r, c = seams["dark_tile"]
            in_dark = (seams["y_tile"][:, None] == r) & (seams["x_tile"][None, :] == c)
            photons[:, in_dark] = 0
    signal = _camera(photons, params, rng)
    del photons
    background = _camera(auto, params, np.random.default_rng([seed, _STREAM_BACKGROUND]))
    del auto

    # spikes, added in camera counts after the camera model (signal channel)
    hot_rng = np.random.default_rng([seed, _STREAM_HOT])
    hot = np.zeros((0, 3), np.intp)
    hot_amp = np.zeros(0)
    streaks = np.zeros((0, 4), np.intp)
    if params.hot_pixel_rate_per_voxel > 0 or params.streak_rate_per_plane > 0:
        spikes = np.zeros(shape, np.float32)
        size = int(np.prod(shape))
        n_hot = min(int(hot_rng.poisson(params.hot_pixel_rate_per_voxel * size)), size)
        flat = np.sort(hot_rng.choice(size, n_hot, replace=False)) if n_hot else np.zeros(0, int)
        hot = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.intp)
        hot_amp = _log_uniform(hot_rng, params.hot_pixel_counts, n_hot)
        spikes.reshape(-1)[flat] += hot_amp.astype(np.float32)
        n_streak = int(hot_rng.poisson(params.streak_rate_per_plane * shape[0]))
        if n_streak:
            lmin, lmax = params.streak_length_vox
            zs = hot_rng.integers(0, shape[0], n_streak)
            ys = hot_rng.integers(0, shape[1], n_streak)
            x0 = hot_rng.integers(0, shape[2], n_streak)
            length = np.minimum(hot_rng.integers(lmin, lmax + 1, n_streak), shape[2] - x0)
            amp = _log_uniform(hot_rng, params.hot_pixel_counts, n_streak)
            for z, y, x_, n_, a in zip(zs, ys, x0, length, amp, strict=True):
                spikes[z, y, x_ : x_ + n_] += np.float32(a)
            streaks = np.stack([zs, ys, x0, length], axis=1).astype(np.intp)
        signal = np.clip(signal + np.rint(spikes), 0, 65535).astype(np.uint16)

    kept_vox, kept_um = truth[visible], truth_um[visible]
    nn = np.full(len(kept_um), np.nan)
    if len(kept_um) >= 2:
        d, _ = cKDTree(kept_um).query(kept_um, k=2)
        nn = d[:, 1]
    cells = pd.DataFrame(
        {
            "z_vox": kept_vox[:, 0],
            "y_vox": kept_vox[:, 1],
            "x_vox": kept_vox[:, 2],
            "z_um": kept_um[:, 0],
            "y_um": kept_um[:, 1],
            "x_um": kept_um[:, 2],
            "diameter_um": diam[visible],
            "brightness": peaks[visible],
            "nn_distance_um": nn,
            "in_cluster": in_cluster[visible],
        }
    )
    return SimulatedCrop(
        signal=signal,
        background=background,
        cells=cells,
        tissue=tissue,
        hot_pixels=hot,
        hot_pixel_amplitudes=hot_amp,
        streaks=streaks,
        seams=seams,
        voxel_size_um=tuple(float(v) for v in vs),
        params=params,
    )


def match_detections(
    found_vox, truth_vox, *, voxel_size_um, tolerance_um: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Match detections to true cells one-to-one (Hungarian) within a distance.

    Parameters
    ----------
    found_vox, truth_vox : array_like, shape (M, 3) and (N, 3)
        Detected and true centres in voxels (z, y, x).
    voxel_size_um : tuple of float
        Voxel size (z, y, x).
    tolerance_um : float
        Pairs farther apart are never matched.

    Returns
    -------
    matched_truth : ndarray of bool, shape (N,)
    matched_found : ndarray of bool, shape (M,)
        The assignment minimises the total distance among pairs within the tolerance.
    """
    vs = np.asarray(voxel_size_um, float)
    found = np.asarray(found_vox, float).reshape(-1, 3) * vs
    truth = np.asarray(truth_vox, float).reshape(-1, 3) * vs
    matched_t = np.zeros(len(truth), bool)
    matched_f = np.zeros(len(found), bool)
    if len(found) and len(truth):
        pairs = cKDTree(truth).sparse_distance_matrix(
            cKDTree(found), tolerance_um, output_type="coo_matrix"
        )
        if pairs.nnz:
            rows = np.unique(pairs.row)
            cols = np.unique(pairs.col)
            cost = np.full((len(rows), len(cols)), 1e6)
            cost[np.searchsorted(rows, pairs.row), np.searchsorted(cols, pairs.col)] = pairs.data
            r, c = linear_sum_assignment(cost)
            ok = cost[r, c] <= tolerance_um
            matched_t[rows[r[ok]]] = True
            matched_f[cols[c[ok]]] = True
    return matched_t, matched_f


def inner_mask(points_vox, shape, *, voxel_size_um, margin_um: float = 10.0) -> np.ndarray:
    """Mark the points at least ``margin_um`` inside every face of the volume.

    Parameters
    ----------
    points_vox : array_like, shape (N, 3)
    shape : tuple of int
    voxel_size_um : tuple of float
    margin_um : float

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    vs = np.asarray(voxel_size_um, float)
    p = np.asarray(points_vox, float).reshape(-1, 3) * vs
    hi = (np.asarray(shape) - 1) * vs - margin_um
    return np.all((p >= margin_um) & (p <= hi), axis=1)


def score_detections(
    found_vox,
    truth_vox,
    shape,
    *,
    voxel_size_um,
    tolerance_um: float = 10.0,
    margin_um: float = 10.0,
) -> dict:
    """Recall, precision and F1 of one-to-one matching within ``tolerance_um``.

    Cells and unmatched detections within ``margin_um`` of a face are not
    scored (a detection matched to a scored cell always counts).

    Parameters
    ----------
    found_vox, truth_vox : array_like, shape (M, 3) and (N, 3)
        Detected and true centres in voxels (z, y, x).
    shape : tuple of int
        Volume shape (z, y, x).
    voxel_size_um : tuple of float
    tolerance_um, margin_um : float

    Returns
    -------
    dict
        ``tp, fn, fp, recall, precision, f1`` (NaN where undefined).

    Examples
    --------
    >>> score_detections([[9, 9, 9]], [[9, 10, 9]], (20, 20, 20), voxel_size_um=(2, 2, 2))["f1"]
    1.0
    """
    matched_t, matched_f = match_detections(
        found_vox, truth_vox, voxel_size_um=voxel_size_um, tolerance_um=tolerance_um
    )
    t_in = inner_mask(truth_vox, shape, voxel_size_um=voxel_size_um, margin_um=margin_um)
    f_in = inner_mask(found_vox, shape, voxel_size_um=voxel_size_um, margin_um=margin_um)
    tp = int(np.sum(matched_t & t_in))
    fn = int(np.sum(~matched_t & t_in))
    fp = int(np.sum(~matched_f & f_in))
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fn + fp) if tp + fn + fp else float("nan")
    return {"tp": tp, "fn": fn, "fp": fp, "recall": recall, "precision": precision, "f1": f1}
