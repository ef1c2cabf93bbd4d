"""Simulate one cleared, immunolabelled mouse brain imaged by light-sheet microscopy.

The brain is an atlas brain moved into the sample's own frame by a random
pose (rotation, translation, isotropic scale) and a smooth nonlinear
deformation, then imaged in two channels:

* **background** (autofluorescence): the atlas reference (tissue contrast)
  with per-region intensity jitter;
* **signal** (e.g. TH): marker-positive somata as Gaussian blobs (soma size
  convolved with the point-spread function) plus a little autofluorescence
  bleed-through.

Both channels get uneven illumination (a gradient along the light-sheet
propagation axis x), light-sheet stripes (shadows constant along x), Poisson
shot noise (Gaussian approximation, variance = mean) and Gaussian read noise,
and are stored as uint16 in the sample's orientation. Every cell's true
position in sample voxels and in atlas voxels, its region and hemisphere are
returned, with the true transform.

Artefacts of real light-sheet data, each off by default
(:data:`REALISTIC_ARTEFACTS` switches them all on with realistic values through
:meth:`BrainParams.with_artefacts`): single-voxel spikes (hot pixels, cosmic
hits) anywhere, void included, added to the signal channel in camera counts
after the camera model; stitched tiles in the raw volume's (y, x) plane (the
light-sheet imaging plane), each with its own multiplicative gain on both
channels; a brighter rim of autofluorescence just inside the brain surface
(both channels, the signal through bleed-through). Their randomness comes from
generators separate from the rest, so with them off the volumes are the same,
bit for bit, as without them.

Coordinate frames (all arrays are (axis0, axis1, axis2)):

``raw``
    the sample volume as written, in orientation ``params.orientation``;
``frame``
    the same volume reoriented to the atlas orientation (via brainglobe-space);
    a point ``q`` (µm, voxel ``i`` centred at ``i * voxel``) maps to the atlas
    point ``p = M @ (q + d(q) - c_frame) + c_atlas + t`` where ``M`` is
    rotation × scale and ``d`` the smooth displacement field;
``atlas``
    atlas voxel indices (voxel ``i`` centred at ``i * resolution``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from brainglobe_space import AnatomicalSpace
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from ketamap.errors import ParameterError
from ketamap.params import bounds, validate
from ketamap.space import check_orientation

__all__ = [
    "BrainParams",
    "SimulatedBrain",
    "simulate_brain",
    "region_fold_and_density",
    "REALISTIC_ARTEFACTS",
]

log = logging.getLogger(__name__)

#: Realistic artefacts of cleared-tissue light-sheet data (see
#: :meth:`BrainParams.with_artefacts`): hot pixels and cosmic hits (one per 10^6
#: voxels, 50-2000 counts), stitched 2 mm tiles with 10 % gain CV, and 100 extra
#: autofluorescence photons in a 40 µm rim under the brain surface.
REALISTIC_ARTEFACTS: dict = {
    "hot_pixel_rate_per_voxel": 1e-6,
    "hot_pixel_counts": (50.0, 2000.0),
    "tile_shape_um": (2000.0, 2000.0),
    "tile_gain_cv": 0.1,
    "edge_photons": 100.0,
    "edge_width_um": 40.0,
}

# Stream ids of the artefacts' generators, np.random.default_rng([seed, id]); the rest of
# the brain draws from np.random.default_rng(seed) in a fixed order.
_STREAM_TILES = 1
_STREAM_HOT = 2


@dataclass(frozen=True)
class BrainParams:
    """Imaging and anatomy parameters of one simulated brain (units in names)."""

    voxel_size_um: tuple[float, float, float] = field(
        default=(40.0, 40.0, 40.0), metadata=bounds(gt=0, le=1000, doc="raw voxel size (z, y, x)")
    )
    orientation: str = field(
        default="psl", metadata=bounds(doc="orientation code of the raw volume")
    )
    soma_diameter_um: float = field(default=15.0, metadata=bounds(gt=0, le=100))
    psf_sigma_um: tuple[float, float, float] = field(
        default=(4.0, 1.5, 1.5), metadata=bounds(ge=0, doc="point-spread function sigma (z, y, x)")
    )
    cell_brightness: float = field(default=500.0, metadata=bounds(gt=0, doc="mean peak photons"))
    cell_brightness_cv: float = field(default=0.25, metadata=bounds(ge=0, le=2))
    autofluorescence_photons: float = field(default=300.0, metadata=bounds(ge=0))
    bleed_through: float = field(default=0.2, metadata=bounds(ge=0, le=1))
    region_contrast_cv: float = field(default=0.08, metadata=bounds(ge=0, le=1))
    read_noise: float = field(default=6.0, metadata=bounds(ge=0, doc="read noise SD (counts)"))
    camera_offset: float = field(default=100.0, metadata=bounds(ge=0, le=10000))
    illumination_gradient: float = field(
        default=0.3, metadata=bounds(ge=0, lt=1, doc="relative intensity loss across x")
    )
    stripe_amplitude: float = field(default=0.1, metadata=bounds(ge=0, lt=1))
    max_rotation_deg: float = field(default=8.0, metadata=bounds(ge=0, le=180))
    max_translation_um: float = field(default=200.0, metadata=bounds(ge=0))
    scale_range: tuple[float, float] = field(default=(0.97, 1.06), metadata=bounds(gt=0))
    render_step_um: float = field(
        default=100.0, metadata=bounds(gt=0, doc="grid on which anatomy is resampled (µm)")
    )
    margin_um: float = field(
        default=300.0, metadata=bounds(ge=0, doc="empty space imaged around the atlas box")
    )
    deformation_um: float = field(default=100.0, metadata=bounds(ge=0, doc="max displacement"))
    deformation_scale_um: float = field(
        default=2000.0, metadata=bounds(gt=0, doc="spacing of the deformation's control grid")
    )
    mouse_cv: float = field(default=0.05, metadata=bounds(ge=0, le=2, doc="whole-brain count CV"))
    region_cv: float = field(default=0.13, metadata=bounds(ge=0, le=2, doc="per-region count CV"))
    hot_pixel_rate_per_voxel: float = field(
        default=0.0,
        metadata=bounds(ge=0, le=0.01, doc="single-voxel spikes per voxel (hot pixels, cosmics)"),
    )
    hot_pixel_counts: tuple[float, float] = field(
        default=(30.0, 3000.0),
        metadata=bounds(gt=0, le=65535, doc="range (min, max) of the log-uniform spike counts"),
    )
    tile_shape_um: tuple[float, float] | None = field(
        default=None,
        metadata=bounds(gt=0, doc="stitched tile size (raw y, raw x); None: one tile"),
    )
    tile_gain_cv: float = field(
        default=0.0, metadata=bounds(ge=0, le=2, doc="CV of the tiles' log-normal gains")
    )
    edge_photons: float = field(
        default=0.0,
        metadata=bounds(ge=0, doc="extra autofluorescence photons in a rim under the surface"),
    )
    edge_width_um: float = field(
        default=40.0, metadata=bounds(gt=0, doc="depth of the bright rim under the surface")
    )

    def __post_init__(self):
        validate(self)
        check_orientation(self.orientation, where="BrainParams.orientation")
        lo, hi = self.hot_pixel_counts
        if lo > hi:
            raise ParameterError(
                "BrainParams.hot_pixel_counts must be a range (min, max) with min <= max, "
                f"got {(lo, hi)!r}."
            )

    def with_artefacts(self, **overrides) -> BrainParams:
        """Return a copy with the realistic artefacts of :data:`REALISTIC_ARTEFACTS` on.

        Parameters
        ----------
        **overrides
            Fields to set instead of (or besides) the realistic values.

        Returns
        -------
        BrainParams
        """
        return dataclasses.replace(self, **(REALISTIC_ARTEFACTS | overrides))


@dataclass(frozen=True, eq=False)
class SimulatedBrain:
    """One simulated brain: volumes in the raw orientation, truth tables.

    Attributes
    ----------
    signal, background : ndarray of uint16, shape (Z, Y, X)
        Marker and autofluorescence channels (raw orientation).
    cells : DataFrame
        One row per true cell: ``z_vox, y_vox, x_vox`` (raw sample voxels),
        ``z_um, y_um, x_um``, ``atlas_z_vox, atlas_y_vox, atlas_x_vox``
        (atlas voxel indices), ``region_id``, ``hemisphere`` (1 left, 2 right),
        ``brightness``.
    expected_counts : DataFrame
        Per leaf region: ``region_id``, ``expected_count`` (after fold change and
        mouse variability, before Poisson), ``count`` (cells whose true position
        lies in the region), ``volume_mm3`` (in the sample), ``density_per_mm3``
        (baseline) and ``fold_change``.
    transform : dict
        The true sample→atlas transform: ``matrix`` (3×3, frame µm → atlas µm),
        ``frame_center_um``, ``atlas_center_um``, ``translation_um``,
        ``displacement_um`` (control-grid displacements, shape (3, *grid)),
        ``control_spacing_um``, ``frame_shape``, ``frame_voxel_um``,
        ``raw_shape``, ``orientation``, ``atlas_orientation``.
    voxel_size_um : tuple of float
        Raw voxel size.
    orientation : str
        Raw orientation code.
    artefacts : dict
        Truth of the artefacts switched on (empty when none): ``hot_pixels``
        ((n, 3) int raw voxels, sorted) and ``hot_pixel_amplitudes`` (counts added,
        before clipping to uint16); ``tile_gains`` ((rows, columns) gains),
        ``tile_shape_vox`` (raw y, x) and ``y_tile``, ``x_tile`` (the tile row of
        every raw y and the tile column of every raw x); ``edge_rim`` ((Z, Y, X)
        bool, raw orientation: the voxels that got ``edge_photons``).
    """

    signal: np.ndarray
    background: np.ndarray
    cells: pd.DataFrame
    expected_counts: pd.DataFrame
    transform: dict
    voxel_size_um: tuple[float, float, float]
    orientation: str
    artefacts: dict = field(default_factory=dict)


def region_fold_and_density(
    ontology,
    labels: np.ndarray,
    *,
    densities: Mapping[str, float],
    default_density: float,
    zero_density: tuple[str, ...],
    fold_changes: Mapping[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label density (cells/mm³) and fold change from acronym tables.

    Each label takes the value of its nearest listed ancestor (or itself).

    Parameters
    ----------
    ontology : Ontology
    labels : ndarray of int
        Region ids (leaves of the annotation).
    densities, fold_changes : mapping of acronym to float
    default_density : float
        For labels with no listed ancestor.
    zero_density : tuple of str
        Acronyms whose subtree has no cells.

    Returns
    -------
    density, fold : ndarray of float64, shape (len(labels),)
    """
    by_id_density = {ontology.lookup(a): float(v) for a, v in densities.items()}
    by_id_zero = {ontology.lookup(a) for a in zero_density if _has(ontology, a)}
    by_id_fold = {ontology.lookup(a): float(v) for a, v in fold_changes.items()}
    density = np.empty(len(labels))
    fold = np.ones(len(labels))
    for i, lab in enumerate(labels):
        chain = ontology.ancestors(int(lab), include_self=True)[::-1]  # self first
        d = default_density
        for rid in chain:
            if rid in by_id_zero:
                d = 0.0
                break
            if rid in by_id_density:
                d = by_id_density[rid]
                break
        density[i] = d
        for rid in chain:
            if rid in by_id_fold:
                fold[i] = by_id_fold[rid]
                break
    return density, fold


def _has(ontology, acronym: str) -> bool:
    try:
        ontology.lookup(acronym)
    except Exception:  # noqa: BLE001 - an atlas may lack a filler acronym
        return False
    return True


def _frame_geometry(atlas_orientation: str, raw_orientation: str, voxel_raw, frame_extent_um):
    """Axis bookkeeping between the raw sample orientation and the atlas-oriented frame."""
    probe = AnatomicalSpace(raw_orientation, shape=(2, 3, 4))
    mat = probe.transformation_matrix_to(AnatomicalSpace(atlas_orientation, shape=(2, 3, 4)))
    perm = np.abs(np.asarray(mat)[:3, :3]).argmax(axis=1)  # frame axis i <- raw axis perm[i]
    voxel_frame = tuple(float(voxel_raw[p]) for p in perm)
    frame_shape = tuple(int(np.ceil(e / v)) for e, v in zip(frame_extent_um, voxel_frame))
    return voxel_frame, frame_shape


def _displacement(points_um: np.ndarray, grid: np.ndarray, spacing_um: np.ndarray) -> np.ndarray:
    """Displacement (µm) at frame points: trilinear interpolation of a dense, smooth grid."""
    coords = (points_um / spacing_um).T
    return np.stack(
        [ndi.map_coordinates(grid[k], coords, order=1, mode="nearest") for k in range(3)], axis=1
    )


def _frame_to_atlas_um(q_um: np.ndarray, tf: dict) -> np.ndarray:
    d = _displacement(q_um, tf["displacement_um"], np.asarray(tf["control_spacing_um"]))
    centred = q_um + d - np.asarray(tf["frame_center_um"])
    return (
        centred @ np.asarray(tf["matrix"]).T
        + np.asarray(tf["atlas_center_um"])
        + np.asarray(tf["translation_um"])
    )


def simulate_brain(
    atlas,
    *,
    fold_changes: Mapping[str, float],
    densities: Mapping[str, float],
    default_density: float = 3.0,
    zero_density: tuple[str, ...] = ("fiber tracts", "VS"),
    params: BrainParams | None = None,
    seed: int = 0,
) -> SimulatedBrain:
    """Simulate one two-channel light-sheet volume with known cells and transform.

    Parameters
    ----------
    atlas : Atlas
        The anatomy; must have a reference image (tissue contrast).
    fold_changes : mapping of acronym to float
        The group's effect on cell counts per region (descendants inherit).
    densities : mapping of acronym to float
        Baseline marker-positive densities in cells/mm³.
    default_density : float
        Density (cells/mm³) of regions with no listed ancestor.
    zero_density : tuple of str
        Acronyms whose subtree holds no cells.
    params : BrainParams
    seed : int
        Seed of every random draw.

    Returns
    -------
    SimulatedBrain
    """
    if atlas.reference is None:
        from ketamap.errors import AtlasError

        raise AtlasError(
            f'Atlas "{atlas.name}" has no reference image to simulate tissue contrast.'
        )
    params = BrainParams() if params is None else params
    rng = np.random.default_rng(seed)
    res = np.asarray(atlas.resolution_um, float)
    extent = np.asarray(atlas.shape) * res + 2 * params.margin_um
    voxel_frame, frame_shape = _frame_geometry(
        atlas.orientation, params.orientation, params.voxel_size_um, extent
    )
    vf = np.asarray(voxel_frame)

    # ---- the true transform
    angles = rng.uniform(-params.max_rotation_deg, params.max_rotation_deg, 3)
    scale = rng.uniform(*params.scale_range)
    matrix = scale * Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    translation = rng.uniform(-params.max_translation_um, params.max_translation_um, 3)
    brain = atlas.annotation > 0
    atlas_center = np.array(ndi.center_of_mass(brain)) * res
    frame_center = (np.asarray(frame_shape) - 1) * vf / 2
    # smooth deformation: random control points every deformation_scale_um, refined 4x by
    # cubic splines into a dense grid that is then interpolated linearly (fast, still smooth)
    grid_shape = np.array([int(np.ceil(e / params.deformation_scale_um)) + 2 for e in extent])
    control = ndi.gaussian_filter(rng.standard_normal((3, *grid_shape)), (0, 1, 1, 1))
    disp = np.stack([ndi.zoom(c, 4, order=3) for c in control])
    spacing = params.deformation_scale_um * (grid_shape - 1) / (np.asarray(disp.shape[1:]) - 1)
    if params.deformation_um > 0:
        disp *= params.deformation_um / np.abs(disp).max()
    else:
        disp[:] = 0
    tf = {
        "matrix": matrix,
        "frame_center_um": frame_center,
        "atlas_center_um": atlas_center,
        "translation_um": translation,
        "displacement_um": disp,
        "control_spacing_um": spacing,
        "frame_shape": frame_shape,
        "frame_voxel_um": vf,
        "orientation": params.orientation,
        "atlas_orientation": atlas.orientation,
        "rotation_deg": angles,
        "scale": scale,
    }

    # ---- coarse rendering grid (about the atlas resolution), aligned with the frame grid
    step = np.maximum(res, params.render_step_um)
    n_coarse = np.maximum(np.round(np.asarray(frame_shape) * vf / step).astype(int), 2)
    coarse_step = np.asarray(frame_shape) * vf / n_coarse  # µm per coarse voxel
    idx = np.indices(tuple(n_coarse), dtype=np.float32).reshape(3, -1).T
    q = (idx + 0.5) * coarse_step - 0.5 * vf  # coarse voxel centres in frame µm
    p_vox = _frame_to_atlas_um(q, tf) / res
    labels = np.zeros(len(p_vox), np.uint32)
    inside = np.all((p_vox > -0.5) & (p_vox < np.asarray(atlas.shape) - 0.5), axis=1)
    r = np.rint(p_vox[inside]).astype(np.intp)
    labels[inside] = atlas.annotation[r[:, 0], r[:, 1], r[:, 2]]
    ref = ndi.map_coordinates(
        atlas.reference.astype(np.float32), p_vox.T, order=1, mode="constant", cval=0.0
    )
    labels = labels.reshape(tuple(n_coarse))
    ref = ref.reshape(tuple(n_coarse))
    del idx, q, p_vox

    # ---- per-region contrast jitter of the autofluorescence
    present, inverse = np.unique(labels, return_inverse=True)
    jitter = np.exp(rng.normal(0, params.region_contrast_cv, len(present)))
    jitter[present == 0] = 1.0
    ref_max = float(np.percentile(atlas.reference[brain], 99)) or 1.0
    auto_coarse = (
        (ref / ref_max) * jitter[inverse.reshape(labels.shape)] * params.autofluorescence_photons
    )

    # ---- cells: counts per leaf region, from its exact atlas volume in the sample's space
    atlas_vol = atlas.region_volumes_mm3().groupby("id")["volume_mm3"].sum()
    leaves = atlas_vol.index.to_numpy(np.int64)
    volume_mm3 = atlas_vol.to_numpy() / scale**3  # the pose's scale shrinks or grows tissue
    density, fold = region_fold_and_density(
        atlas.ontology,
        leaves,
        densities=densities,
        default_density=default_density,
        zero_density=zero_density,
        fold_changes=fold_changes,
    )
    mouse = np.exp(rng.normal(0, params.mouse_cv))
    region_mult = np.exp(rng.normal(0, params.region_cv, len(leaves)))
    expected = density * fold * volume_mm3 * mouse * region_mult
    n_cells = rng.poisson(expected)
    q_cells, atlas_vox, cell_labels, cell_hemi = _place_cells(
        leaves,
        n_cells,
        present,
        inverse.reshape(labels.shape),
        coarse_step,
        vf,
        frame_shape,
        tf,
        res,
        atlas,
        rng,
    )
    brightness = params.cell_brightness * np.exp(
        rng.normal(
            -0.5 * np.log1p(params.cell_brightness_cv**2),
            np.sqrt(np.log1p(params.cell_brightness_cv**2)),
            len(q_cells),
        )
    )

    # ---- render the frame volumes
    ratio = np.asarray(frame_shape) / n_coarse
    # Linear, not nearest: with a non-integer ratio (e.g. 2.5 raw voxels per coarse
    # voxel) nearest-neighbour ties all round one way and shift the whole image by
    # 1/8 of a coarse voxel against the true transform.
    auto = ndi.zoom(
        auto_coarse.astype(np.float32),
        ratio,
        order=1,
        grid_mode=True,
        mode="grid-constant",
        cval=0.0,
    )
    auto = ndi.gaussian_filter(
        auto[: frame_shape[0], : frame_shape[1], : frame_shape[2]],
        np.maximum(ratio / 2, 0.3),
        truncate=2.5,
    )
    psf_frame = np.asarray(params.psf_sigma_um)[
        _perm_raw_to_frame(atlas.orientation, params.orientation)
    ]
    sigma_vox = np.sqrt((params.soma_diameter_um / 4) ** 2 + psf_frame**2) / vf
    cells_img = np.zeros(frame_shape, np.float32)
    # peak ≈ brightness whether a soma spans many voxels or sits inside one
    _splat(cells_img, q_cells / vf, brightness * max(1.0, (2 * np.pi) ** 1.5 * np.prod(sigma_vox)))
    cells_img = ndi.gaussian_filter(cells_img, sigma_vox, truncate=3.0)

    artefacts: dict = {}
    space = AnatomicalSpace(atlas.orientation, shape=frame_shape)
    if params.edge_photons > 0:
        rim = _edge_rim(labels, ratio, frame_shape, vf, params.edge_width_um)
        auto[rim] += np.float32(params.edge_photons)
        artefacts["edge_rim"] = np.ascontiguousarray(space.map_stack_to(params.orientation, rim))
    illum = _illumination(frame_shape, params, rng)
    if params.tile_shape_um is not None:
        gain, tiles = _tile_gains(
            frame_shape, params, atlas.orientation, np.random.default_rng([seed, _STREAM_TILES])
        )
        illum = illum * gain
        artefacts.update(tiles)
        del gain
    signal = (cells_img + params.bleed_through * auto) * illum
    background = auto * illum
    del cells_img, auto
    signal = _camera(signal, params, rng)
    background = _camera(background, params, rng)

    # ---- back to the raw orientation (through brainglobe-space)
    signal = np.ascontiguousarray(space.map_stack_to(params.orientation, signal))
    background = np.ascontiguousarray(space.map_stack_to(params.orientation, background))
    if params.hot_pixel_rate_per_voxel > 0:
        hot_rng = np.random.default_rng([seed, _STREAM_HOT])
        size = signal.size
        n_hot = min(int(hot_rng.poisson(params.hot_pixel_rate_per_voxel * size)), size)
        flat = np.sort(hot_rng.choice(size, n_hot, replace=False))
        lo, hi = np.log(params.hot_pixel_counts[0]), np.log(params.hot_pixel_counts[1])
        amplitude = np.exp(hot_rng.uniform(lo, hi, n_hot))
        view = signal.reshape(-1)
        view[flat] = np.clip(view[flat] + np.rint(amplitude), 0, 65535).astype(np.uint16)
        artefacts["hot_pixels"] = np.stack(np.unravel_index(flat, signal.shape), axis=1)
        artefacts["hot_pixel_amplitudes"] = amplitude
    raw_vox = space.map_points_to(params.orientation, q_cells / vf + 0.5) - 0.5
    vraw = np.asarray(params.voxel_size_um)

    cells = pd.DataFrame(
        {
            "z_vox": raw_vox[:, 0],
            "y_vox": raw_vox[:, 1],
            "x_vox": raw_vox[:, 2],
            "z_um": raw_vox[:, 0] * vraw[0],
            "y_um": raw_vox[:, 1] * vraw[1],
            "x_um": raw_vox[:, 2] * vraw[2],
            "atlas_z_vox": atlas_vox[:, 0],
            "atlas_y_vox": atlas_vox[:, 1],
            "atlas_x_vox": atlas_vox[:, 2],
            "region_id": cell_labels.astype(np.int64),
            "hemisphere": cell_hemi.astype(np.int8),
            "brightness": brightness,
        }
    )
    placed = pd.Series(cell_labels.astype(np.int64)).value_counts()
    expected_counts = pd.DataFrame(
        {
            "region_id": leaves,
            "expected_count": expected,
            "count": placed.reindex(leaves, fill_value=0).to_numpy(),
            "volume_mm3": volume_mm3,
            "density_per_mm3": density,
            "fold_change": fold,
        }
    )
    tf["raw_shape"] = signal.shape
    log.info("simulated brain: %d cells, raw shape %s", len(cells), signal.shape)
    return SimulatedBrain(
        signal,
        background,
        cells,
        expected_counts,
        tf,
        tuple(float(v) for v in vraw),
        params.orientation,
        artefacts,
    )


def _place_cells(
    leaves,
    n_cells,
    present,
    coarse_index,
    coarse_step,
    vf,
    frame_shape,
    tf,
    res,
    atlas,
    rng,
    *,
    rounds: int = 8,
):
    """Draw ``n_cells[k]`` positions whose exact atlas label is ``leaves[k]``.

    Candidates are drawn uniformly inside the coarse voxels labelled with the
    region and kept when the exact image of the point under the true transform
    carries that label (rejection sampling), so every true cell lies in its
    region and each region receives exactly its drawn count (unless the region
    is too thin to be hit at all, which is logged).
    """
    flat = coarse_index.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=len(present)))])
    slot = {int(r): k for k, r in enumerate(present)}
    frame_max = (np.asarray(frame_shape) - 1) * vf
    need = n_cells.astype(int).copy()
    out_q, out_a, out_l, out_h = [], [], [], []
    for _ in range(rounds):
        draw_region, draw_idx = [], []
        for i in np.flatnonzero(need > 0):
            k = slot.get(int(leaves[i]))
            if k is None:
                continue
            pool = order[starts[k] : starts[k + 1]]
            n = 2 * need[i] + 2
            draw_region.append(np.full(n, i))
            draw_idx.append(pool[rng.integers(0, len(pool), n)])
        if not draw_region:
            break
        region = np.concatenate(draw_region)
        cidx = np.stack(np.unravel_index(np.concatenate(draw_idx), coarse_index.shape), axis=1)
        q = (cidx + rng.uniform(0, 1, cidx.shape)) * coarse_step - 0.5 * vf
        inside = np.all((q >= 0) & (q <= frame_max), axis=1)
        region, q = region[inside], q[inside]
        a = _frame_to_atlas_um(q, tf) / res
        lab, hemi = atlas.labels_at(a)
        ok = lab.astype(np.int64) == leaves[region]
        region, q, a, lab, hemi = region[ok], q[ok], a[ok], lab[ok], hemi[ok]
        # keep the first need[i] accepted draws of each region
        rank = np.zeros(len(region), int)
        if len(region):
            srt = np.argsort(region, kind="stable")
            first = np.r_[0, np.flatnonzero(np.diff(region[srt])) + 1]
            run = np.arange(len(srt)) - np.repeat(first, np.diff(np.r_[first, len(srt)]))
            rank[srt] = run
        take = rank < need[region]
        out_q.append(q[take])
        out_a.append(a[take])
        out_l.append(lab[take])
        out_h.append(hemi[take])
        need -= np.bincount(region[take], minlength=len(need))
    if need.sum():
        log.info(
            "%d cells could not be placed in regions too thin for the rendering grid",
            int(need.sum()),
        )
    return (
        np.concatenate(out_q) if out_q else np.zeros((0, 3)),
        np.concatenate(out_a) if out_a else np.zeros((0, 3)),
        np.concatenate(out_l) if out_l else np.zeros(0, np.uint32),
        np.concatenate(out_h) if out_h else np.zeros(0, np.uint8),
    )


def _perm_raw_to_frame(atlas_orientation: str, raw_orientation: str) -> np.ndarray:
    probe = AnatomicalSpace(raw_orientation, shape=(2, 3, 4))
    mat = probe.transformation_matrix_to(AnatomicalSpace(atlas_orientation, shape=(2, 3, 4)))
    return np.abs(np.asarray(mat)[:3, :3]).argmax(axis=1)


def _splat(volume: np.ndarray, points_vox: np.ndarray, weights: np.ndarray) -> None:
    """Add ``weights`` at sub-voxel points by trilinear splatting (in place)."""
    base = np.floor(points_vox).astype(np.intp)
    frac = points_vox - base
    shape = np.asarray(volume.shape)
    for corner in np.ndindex(2, 2, 2):
        c = np.asarray(corner)
        w = weights * np.prod(np.where(c, frac, 1 - frac), axis=1)
        pos = base + c
        ok = np.all((pos >= 0) & (pos < shape), axis=1)
        np.add.at(volume, tuple(pos[ok].T), w[ok].astype(volume.dtype))


def _edge_rim(labels, ratio, frame_shape, vf, width_um: float) -> np.ndarray:
    """Frame voxels of brain within ``width_um`` of its surface (boolean, frame shape).

    The brain is the coarse labelled grid upsampled like the autofluorescence; a
    voxel's depth is its distance to the nearest voxel outside less half a voxel.
    """
    inside = ndi.zoom(
        (labels > 0).astype(np.float32),
        ratio,
        order=1,
        grid_mode=True,
        mode="grid-constant",
        cval=0.0,
    )[: frame_shape[0], : frame_shape[1], : frame_shape[2]]
    inside = inside > 0.5
    depth = ndi.distance_transform_edt(inside, sampling=vf) - 0.5 * float(np.min(vf))
    return inside & (depth < width_um)


def _tile_gains(frame_shape, params: BrainParams, atlas_orientation: str, rng):
    """Per-tile multiplicative gain in the frame orientation; tiles in the raw (y, x) plane.

    Tiles start at the raw volume's first voxel; gains are log-normal with mean 1.
    """
    perm = _perm_raw_to_frame(atlas_orientation, params.orientation)
    raw_shape = [0, 0, 0]
    for i, p in enumerate(perm):
        raw_shape[p] = int(frame_shape[i])
    raw_shape = tuple(raw_shape)
    vy, vx = params.voxel_size_um[1], params.voxel_size_um[2]
    ty = max(1, int(round(params.tile_shape_um[0] / vy)))
    tx = max(1, int(round(params.tile_shape_um[1] / vx)))
    y_tile = np.arange(raw_shape[1]) // ty
    x_tile = np.arange(raw_shape[2]) // tx
    cv = params.tile_gain_cv
    gains = np.exp(
        rng.normal(
            -0.5 * np.log1p(cv**2),
            np.sqrt(np.log1p(cv**2)),
            (int(y_tile[-1]) + 1, int(x_tile[-1]) + 1),
        )
    )
    plane = gains[y_tile[:, None], x_tile[None, :]].astype(np.float32)
    raw = np.broadcast_to(plane[None], raw_shape)
    raw_space = AnatomicalSpace(params.orientation, shape=raw_shape)
    frame = np.ascontiguousarray(raw_space.map_stack_to(atlas_orientation, raw))
    tiles = {
        "tile_gains": gains,
        "tile_shape_vox": (ty, tx),
        "y_tile": y_tile,
        "x_tile": x_tile,
    }
    return frame, tiles


def _illumination(shape, params: BrainParams, rng) -> np.ndarray:
    """Multiplicative illumination: gradient along axis 2, stripes constant along axis 2."""
    x = np.linspace(0, 1, shape[2], dtype=np.float32)
    gradient = 1 - params.illumination_gradient * x
    stripes = rng.standard_normal((shape[0], shape[1])).astype(np.float32)
    stripes = ndi.gaussian_filter1d(stripes, 0.7, axis=1)
    stripes = ndi.gaussian_filter1d(stripes, 3.0, axis=0)
    stripes = 1 + params.stripe_amplitude * stripes / (stripes.std() or 1)
    return np.clip(stripes, 0.2, None)[:, :, None] * gradient[None, None, :]


def _camera(photons: np.ndarray, params: BrainParams, rng) -> np.ndarray:
    """Shot + read noise, offset, to uint16.

    Shot noise uses the Gaussian approximation of Poisson (variance = mean), so
    shot and read noise combine into one draw of variance ``photons + read²``.
    """
    photons = np.maximum(photons, 0, out=photons)
    sd = np.sqrt(photons + np.float32(params.read_noise**2))
    photons += sd * rng.standard_normal(photons.shape, dtype=np.float32)
    photons += np.float32(params.camera_offset)
    return np.clip(np.rint(photons, out=photons), 0, 65535).astype(np.uint16)
