"""Spaces and image helpers for registration: orientation codes, the prepared grid, QC.

Three grids take part in whole-brain registration, all indexed (z, y, x):

``raw``
    The sample as acquired: its own shape, voxel size and orientation code.
``prepared``
    The raw sample reoriented to the atlas' orientation (through
    :class:`brainglobe_space.AnatomicalSpace`) and resampled to the atlas
    resolution. Its voxel ``j`` sits at the physical point ``j * resolution_um``
    (origin 0). This is the *fixed* image of the registration.
``atlas``
    The atlas grid; voxel ``i`` sits at ``i * resolution_um`` (origin 0).

Raw and prepared grids are tied through voxel *edges*: raw voxel ``p`` spans
``[p, p + 1)`` in edge units, so a flip maps ``p + 0.5`` to ``n - (p + 0.5)``
(which is what ``AnatomicalSpace.map_points_to`` does), and prepared voxel
``j`` is centred on the edge coordinate ``(j + 0.5) * f`` of the reoriented raw
grid, with ``f = resolution_um / voxel_size_um`` per axis.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import dask.array as da
import numpy as np
import SimpleITK as sitk
from brainglobe_space import AnatomicalSpace
from scipy import ndimage as ndi

from ketamap.errors import InputError
from ketamap.io.volumes import lazy_array
from ketamap.space import check_orientation, check_voxel_size

__all__ = [
    "brain_mask",
    "check_volume",
    "affine_summary",
    "dice",
    "flatten_intensity",
    "grid_mesh_size",
    "jacobian_stats",
    "ncc",
    "normalise_intensity",
    "quality_control",
    "prepare_sample",
    "prepared_shape",
    "raw_to_prepared_vox",
    "to_sitk",
]

logger = logging.getLogger(__name__)


def _sizes(value, where: str) -> tuple[float, float, float]:
    """One or three voxel sizes (numbers, sequences or numpy arrays) as a checked 3-tuple."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return check_voxel_size(value, where=where)


def _space_map(orientation: str, atlas_orientation: str):
    """Axis order and flips from the raw to the atlas orientation (brainglobe-space)."""
    order, flips, _, _ = AnatomicalSpace(orientation).map_to(AnatomicalSpace(atlas_orientation))
    return tuple(int(o) for o in order), tuple(bool(f) for f in flips)


def _factors(voxel_size_um, orientation, atlas_orientation, atlas_resolution_um):
    """Downsampling factors ``resolution / voxel size`` per atlas-ordered axis."""
    order, _ = _space_map(orientation, atlas_orientation)
    vs = np.asarray(voxel_size_um, dtype=float)[list(order)]
    return np.asarray(atlas_resolution_um, dtype=float) / vs


def prepared_shape(
    shape_vox: Sequence[int],
    *,
    voxel_size_um,
    orientation: str,
    atlas_orientation: str,
    atlas_resolution_um,
) -> tuple[int, int, int]:
    """Shape of the prepared grid for a raw sample of shape ``shape_vox``.

    Parameters
    ----------
    shape_vox : 3 ints
        Raw shape (z, y, x) in the sample's own orientation.
    voxel_size_um, orientation, atlas_orientation, atlas_resolution_um
        As in :func:`prepare_sample`.

    Returns
    -------
    tuple of 3 int
        ``round(extent / resolution)`` per atlas axis, at least 1.
    """
    vs = _sizes(voxel_size_um, "voxel_size_um")
    res = _sizes(atlas_resolution_um, "atlas_resolution_um")
    order, _ = _space_map(orientation, atlas_orientation)
    n = np.asarray(shape_vox, dtype=float)[list(order)]
    f = _factors(vs, orientation, atlas_orientation, res)
    return tuple(max(1, int(round(v))) for v in n / f)


def prepare_sample(
    sample,
    *,
    voxel_size_um,
    orientation: str,
    atlas_orientation: str,
    atlas_resolution_um,
) -> np.ndarray:
    """Reorient a raw sample to the atlas orientation and resample it to the atlas resolution.

    The raw volume is reoriented with ``AnatomicalSpace.map_stack_to`` (a lazy
    transpose and flip for dask input), then reduced by block means of the
    integer part ``k = floor(f)`` of the factor ``f = resolution / voxel size``
    (block-wise on dask chunks, so memory stays bounded by the output), then
    smoothed by the Gaussian whose variance tops the block's up to that of a
    block of the full factor, ``(g**2 - 1) / 12`` with ``g = f / k``, and
    finally sampled with trilinear interpolation at the prepared voxel centres.

    Parameters
    ----------
    sample : (Z, Y, X) array or dask array
        Raw volume, any real dtype, in the sample's orientation.
    voxel_size_um : float or 3 floats
        Raw voxel size (z, y, x) in µm.
    orientation : str
        BrainGlobe orientation code of the raw sample, e.g. ``"psl"``.
    atlas_orientation : str
        Orientation code of the atlas, e.g. ``"asr"``.
    atlas_resolution_um : float or 3 floats
        Atlas voxel size in µm, in atlas axis order.

    Returns
    -------
    ndarray of float32
        Shape :func:`prepared_shape`, atlas axis order.

    Raises
    ------
    InputError
        For a sample that is not a non-empty real 3-D array, or a bad voxel
        size or orientation code.
    """
    orientation = check_orientation(orientation)
    atlas_orientation = check_orientation(atlas_orientation, where="atlas_orientation")
    vs = _sizes(voxel_size_um, "voxel_size_um")
    res = _sizes(atlas_resolution_um, "atlas_resolution_um")
    if not hasattr(sample, "shape") or not hasattr(sample, "dtype"):
        sample = np.asarray(sample)
    if len(sample.shape) != 3 or min(sample.shape) == 0:
        raise InputError(
            f"sample must be a non-empty 3-D array (z, y, x), got shape {sample.shape}."
        )
    if not (np.issubdtype(sample.dtype, np.integer) or np.issubdtype(sample.dtype, np.floating)):
        raise InputError(f"sample must hold real numbers, got dtype {sample.dtype}.")

    out_shape = prepared_shape(
        sample.shape,
        voxel_size_um=vs,
        orientation=orientation,
        atlas_orientation=atlas_orientation,
        atlas_resolution_um=res,
    )
    f = _factors(vs, orientation, atlas_orientation, res)
    arr = sample if isinstance(sample, da.Array) else lazy_array(np.asarray(sample))
    arr = AnatomicalSpace(orientation).map_stack_to(atlas_orientation, arr)
    k = np.maximum(1, np.floor(f + 1e-9)).astype(int)
    k = np.minimum(k, arr.shape)
    if np.any(k > 1):
        arr = da.coarsen(np.mean, arr.astype(np.float32), dict(enumerate(k)), trim_excess=True)
    block = np.asarray(arr.astype(np.float32).compute(), dtype=np.float32)
    g = f / k
    sigma = np.sqrt(np.maximum(0.0, (g**2 - 1.0) / 12.0))
    if np.any(sigma > 0):
        block = ndi.gaussian_filter(block, sigma, mode="nearest")
    if tuple(block.shape) == out_shape and np.allclose(g, 1.0):
        return block
    coords = [(np.arange(m) + 0.5) * gi - 0.5 for m, gi in zip(out_shape, g, strict=True)]
    grid = np.meshgrid(*coords, indexing="ij", sparse=True)
    grid = [np.broadcast_to(c, out_shape) for c in grid]
    out = ndi.map_coordinates(block, grid, order=1, mode="nearest", output=np.float32)
    logger.debug("prepared sample %s -> %s (factors %s)", sample.shape, out_shape, f)
    return out


def raw_to_prepared_vox(
    points_vox: np.ndarray,
    *,
    shape_vox,
    voxel_size_um,
    orientation: str,
    atlas_orientation: str,
    atlas_resolution_um,
) -> np.ndarray:
    """Map raw voxel coordinates to continuous prepared-grid voxel coordinates.

    Parameters
    ----------
    points_vox : (N, 3) array
        (z, y, x) voxel coordinates in the raw grid and orientation.
    shape_vox : 3 ints
        Raw shape, needed for flips.
    voxel_size_um, orientation, atlas_orientation, atlas_resolution_um
        As in :func:`prepare_sample`.

    Returns
    -------
    (N, 3) ndarray of float64
        Voxel coordinates on the prepared grid, atlas axis order.

    Raises
    ------
    InputError
        For an orientation code that is not one of the 48 valid ones.
    """
    orientation = check_orientation(orientation)
    atlas_orientation = check_orientation(atlas_orientation, where="atlas_orientation")
    vs = _sizes(voxel_size_um, "voxel_size_um")
    res = _sizes(atlas_resolution_um, "atlas_resolution_um")
    pts = np.asarray(points_vox, dtype=float).reshape(-1, 3)
    source = AnatomicalSpace(orientation, shape=tuple(int(s) for s in shape_vox))
    # Voxel centres sit at edge coordinate p + 0.5; a flip maps it to n - (p + 0.5).
    edges = source.map_points_to(AnatomicalSpace(atlas_orientation), pts + 0.5)
    f = _factors(vs, orientation, atlas_orientation, res)
    return edges / f - 0.5


def to_sitk(array: np.ndarray, spacing_um) -> sitk.Image:
    """Wrap a (z, y, x) array as a SimpleITK image with origin 0 and (z, y, x) spacing.

    Parameters
    ----------
    array : (Z, Y, X) ndarray
    spacing_um : 3 floats
        Voxel size (z, y, x) in µm; SimpleITK receives it as (x, y, z).

    Returns
    -------
    SimpleITK.Image
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in spacing_um[::-1]))
    image.SetOrigin((0.0, 0.0, 0.0))
    return image


def grid_mesh_size(shape_vox, spacing_um, grid_spacing_um: float) -> list[int]:
    """B-spline mesh size (x, y, z) for a control-point spacing in µm (at least 1)."""
    extent = np.asarray(shape_vox, dtype=float) * np.asarray(spacing_um, dtype=float)
    return [max(1, int(math.ceil(e / grid_spacing_um - 1e-9))) for e in extent[::-1]]


# --------------------------------------------------------------------------- images and QC


def check_volume(array, name: str) -> np.ndarray:
    """Return ``array`` as a non-empty real 3-D ndarray, or raise InputError naming ``name``."""
    array = np.asarray(array)
    if array.ndim != 3 or array.size == 0:
        raise InputError(
            f"{name} must be a non-empty 3-D array (z, y, x), got shape {array.shape}."
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}.")
    return array


def normalise_intensity(array: np.ndarray, name: str) -> np.ndarray:
    """Scale to [0, 1] between the 0.5th and 99.5th percentiles (float32)."""
    a = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or infinite values.")
    step = max(1, a.size // 2_000_000)
    lo, hi = np.percentile(a.ravel()[::step], [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        raise InputError(f"{name} is constant ({lo:g}), so there is nothing to register.")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Foreground by Otsu's threshold on a smoothed image, holes filled, largest part."""
    from skimage.filters import threshold_otsu

    smooth = ndi.gaussian_filter(image, 1.0)
    mask = smooth > threshold_otsu(smooth)
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndi.binary_fill_holes(mask)


def flatten_intensity(image: np.ndarray, brain: np.ndarray, sigma_um: float, res) -> np.ndarray:
    """Divide the brain by its local mean over ``sigma_um`` (removes illumination gradients).

    The local mean is a normalised convolution restricted to the brain mask,
    computed on a 4x coarser grid. Applied alike to sample and reference, it
    removes slow intensity trends (light-sheet illumination, depth
    attenuation) while keeping tissue contrast finer than ``sigma_um``.
    """
    if sigma_um <= 0 or not brain.any():
        return image
    step = 4
    small = image[::step, ::step, ::step] * brain[::step, ::step, ::step]
    weight = brain[::step, ::step, ::step].astype(np.float32)
    sigma = [sigma_um / (step * r) for r in res]
    num = ndi.gaussian_filter(small, sigma, mode="constant")
    den = ndi.gaussian_filter(weight, sigma, mode="constant")
    local = num / np.maximum(den, 1e-3)
    zoom = [n / m for n, m in zip(image.shape, local.shape, strict=True)]
    local = ndi.zoom(local, zoom, order=1, mode="nearest", grid_mode=True)
    level = float(image[brain].mean())
    local = np.where(brain, np.maximum(local, 0.05 * level), level)
    return (0.5 * image / local).astype(np.float32)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` inside ``mask``."""
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    if x.size < 2:
        return 0.0
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def matching_blur(
    sample: np.ndarray, reference: np.ndarray, mask: np.ndarray, sigmas_um, spacing_um
) -> tuple[float, list[float]]:
    """Find the Gaussian blur of ``reference`` that best matches the sharpness of ``sample``.

    Parameters
    ----------
    sample : (Z, Y, X) ndarray
        The prepared sample.
    reference : (Z, Y, X) ndarray
        The atlas reference already aligned with ``sample`` (e.g. through an
        affine), on the same grid.
    mask : (Z, Y, X) bool ndarray
        Voxels to compare (the brain).
    sigmas_um : sequence of float
        Candidate Gaussian sigmas in µm; 0 (no blur) should be among them.
    spacing_um : float or 3 floats
        Voxel size of the grid (z, y, x) in µm.

    Returns
    -------
    sigma_um : float
        The candidate whose blurred reference has the highest normalised
        cross-correlation with ``sample`` inside ``mask``.
    correlations : list of float
        That correlation for every candidate, in order.

    Notes
    -----
    Noise in the sample lowers every candidate's correlation alike, so it
    does not pull the choice towards blur. A misalignment does, a little:
    compare after an affine, when what is left is the local deformation
    (on the simulated brains the choice after the affine matches the one
    after the first B-spline level).
    """
    spacing = np.broadcast_to(np.asarray(spacing_um, dtype=float), (3,))
    correlations = [
        ncc(sample, ndi.gaussian_filter(reference, s / spacing) if s > 0 else reference, mask)
        for s in sigmas_um
    ]
    return float(sigmas_um[int(np.argmax(correlations))]), correlations


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / total) if total else 0.0


def dense_atlas_vox(transform, shape_vox, spacing_um, *, step: int = 2) -> np.ndarray:
    """Atlas voxel coordinates of every voxel of the prepared grid, shape (3, Z, Y, X).

    The transform is evaluated once on a grid ``step`` voxels apart and
    interpolated trilinearly in between: exact for the affine part and far
    below a voxel for a B-spline whose control points are millimetres apart.
    Resampling through these coordinates with scipy is many times faster than
    evaluating ITK's composite transform at every voxel.
    """
    shape = np.asarray(shape_vox, dtype=int)
    res = np.asarray(spacing_um, dtype=float)
    n = (np.ceil((shape - 1) / step) + 1).astype(int)
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        [int(v) for v in n[::-1]],
        (0.0, 0.0, 0.0),
        [float(v) for v in (step * res)[::-1]],
    )
    disp = sitk.GetArrayViewFromImage(field)  # (z, y, x, 3), components (x, y, z)
    out = np.empty((3, *shape), dtype=np.float32)
    for axis in range(3):
        comp = np.ascontiguousarray(disp[..., 2 - axis], dtype=np.float32)
        with warnings.catch_warnings():
            # a 1-D matrix is a diagonal one (40 % faster than the 2-D form); SciPy < 1.16
            # warns that this changed in SciPy 0.18, which is the behaviour wanted here
            warnings.filterwarnings("ignore", "The behavior of affine_transform", UserWarning)
            up = ndi.affine_transform(
                comp, [1.0 / step] * 3, output_shape=tuple(shape), order=1, mode="nearest"
            )
        ramp = np.arange(shape[axis], dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(3)]
        )
        out[axis] = ramp + up / np.float32(res[axis])
    return out


def jacobian_stats(transform, shape_vox, spacing_um, fixed_mask) -> tuple[float, float]:
    """Minimum Jacobian determinant and folded fraction inside the mask (2x coarser grid)."""
    shape = tuple(max(1, s // 2) for s in shape_vox)
    spacing = tuple(2.0 * s for s in spacing_um)
    origin = tuple(0.5 * s for s in spacing_um[::-1])  # coarse voxel centres
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, shape[::-1], origin, spacing[::-1]
    )
    det = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    mask = fixed_mask[: 2 * shape[0] : 2, : 2 * shape[1] : 2, : 2 * shape[2] : 2]
    mask = mask[: det.shape[0], : det.shape[1], : det.shape[2]]
    values = det[mask] if mask.any() else det.ravel()
    return float(values.min()), float(np.mean(values <= 0))


def linear_part(transform, at_um=(0.0, 0.0, 0.0), step_um: float = 100.0):
    """Linear part ``A`` and image ``T(at)`` of a (locally) affine transform, in (z, y, x).

    Finite differences over ``step_um`` at ``at_um`` (exact for an affine
    transform), so that ``T(x) ~ T(at) + A (x - at)`` with all points (z, y, x) µm.
    """

    def image(point_zyx):  # ITK takes and returns (x, y, z)
        return np.asarray(transform.TransformPoint(tuple(map(float, point_zyx[::-1]))))[::-1]

    at = np.asarray(at_um, dtype=float)
    p0 = image(at)
    cols = [image(at + step_um * e) - p0 for e in np.eye(3)]
    return np.stack(cols, axis=1) / step_um, p0


def affine_summary(transform, centre_um) -> tuple[np.ndarray, float, bool]:
    """Scale, rotation and handedness of a (locally) affine transform at a point.

    The linear part ``A`` is taken by finite differences at ``centre_um``
    (exact for an affine transform), then split by polar decomposition
    ``A = R S`` (``R = U V^T`` from the SVD ``A = U diag(s) V^T``).

    Parameters
    ----------
    transform : SimpleITK.Transform
        Prepared sample physical point -> atlas physical point.
    centre_um : 3 floats
        Where to take the linear part, (z, y, x) µm on the prepared grid.

    Returns
    -------
    scales : (3,) ndarray of float64
        Singular values of ``A``, descending: atlas length per sample length
        along the principal axes (2 when the declared voxel size is half the
        true one, 0.5 when it is twice).
    rotation_deg : float
        Angle of the rotation ``R`` (0-180°); a correct orientation code
        leaves only the mounting tilt.
    mirrored : bool
        ``det A < 0``: the transform flips the brain's handedness.
    """
    a, _ = linear_part(transform, centre_um)  # scales, det and angle are axis-order blind
    u, s, vt = np.linalg.svd(a)
    rot = u @ vt
    mirrored = bool(np.linalg.det(a) < 0)
    if mirrored:
        rot = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1.0, 1.0))))
    return s, angle, mirrored


def quality_control(
    fixed_arr,
    fixed_brain,
    moving_arr,
    initial,
    transform,
    atlas_brain,
    res,
    params,
    affine=None,
    step=2,
):
    """QC measures of a registration on the prepared grid, and the flag with its reasons.

    ``affine`` (the affine stage's transform) adds the plausibility checks of
    scale and rotation that catch a wrong voxel size or orientation code even
    when the images happen to match well after registration. ``step`` is the
    sampling step of the dense evaluation (see :func:`dense_atlas_vox`).
    """
    fixed = to_sitk(fixed_arr, res)
    moving = to_sitk(moving_arr, res)
    before = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, initial, sitk.sitkLinear, 0.0))
    coords = dense_atlas_vox(transform, fixed_arr.shape, res, step=step)
    after = ndi.map_coordinates(
        moving_arr.astype(np.float32, copy=False), coords, order=1, mode="constant", cval=0.0
    )
    warped_brain = ndi.map_coordinates(
        atlas_brain.astype(np.uint8), coords, order=0, mode="constant", cval=0
    ).astype(bool)
    # The same thresholding on both images: a bias of the intensity mask (dim
    # tissue left out of a real autofluorescence mask) then cancels out.
    reference_brain = brain_mask(moving_arr)
    warped_reference_brain = ndi.map_coordinates(
        reference_brain.astype(np.uint8), coords, order=0, mode="constant", cval=0
    ).astype(bool)
    del coords
    union = fixed_brain | warped_brain
    jac_min, folded = jacobian_stats(transform, fixed_arr.shape, res, fixed_brain)
    qc = {
        "correlation_before": round(ncc(fixed_arr, before, union), 4),
        "correlation_after": round(ncc(fixed_arr, after, union), 4),
        "dice_brain_mask": round(dice(fixed_brain, warped_reference_brain), 4),
        "dice_atlas_mask": round(dice(fixed_brain, warped_brain), 4),
        "jacobian_min": round(jac_min, 4),
        "fraction_folded": round(folded, 6),
    }
    reasons = []
    if affine is not None:
        centre = (
            np.argwhere(fixed_brain).mean(axis=0)
            if fixed_brain.any()
            else (np.asarray(fixed_arr.shape) - 1) / 2
        ) * np.asarray(res, dtype=float)
        scales, angle, mirrored = affine_summary(affine, centre)
        qc["affine_scale"] = [round(float(v), 4) for v in scales]
        qc["affine_rotation_deg"] = round(angle, 2)
        qc["affine_mirrored"] = mirrored
        if scales.min() < params.qc_min_scale or scales.max() > params.qc_max_scale:
            reasons.append(
                f"the affine stage rescales the sample by {scales.min():.2f}-{scales.max():.2f}, "
                f"outside {params.qc_min_scale}-{params.qc_max_scale} (is the voxel size right?)"
            )
        if angle > params.qc_max_rotation_deg:
            reasons.append(
                f"the affine stage rotates the sample by {angle:.0f} degrees, more than "
                f"{params.qc_max_rotation_deg:g} (is the orientation code right?)"
            )
        if mirrored:
            reasons.append("the affine stage mirrors the sample (is the orientation code right?)")
    if qc["correlation_after"] < params.qc_min_correlation:
        reasons.append(
            f"correlation after registration {qc['correlation_after']:.3f} is below "
            f"{params.qc_min_correlation}"
        )
    if qc["correlation_after"] < qc["correlation_before"]:
        reasons.append(
            f"correlation fell from {qc['correlation_before']:.3f} to {qc['correlation_after']:.3f}"
        )
    if qc["dice_brain_mask"] < params.qc_min_dice:
        reasons.append(f"brain-mask Dice {qc['dice_brain_mask']:.3f} is below {params.qc_min_dice}")
    if qc["fraction_folded"] > params.qc_max_fraction_folded:
        reasons.append(
            f"{100 * qc['fraction_folded']:.2f}% of the brain is folded (Jacobian determinant <= 0)"
        )
    qc["flagged"] = bool(reasons)
    qc["reasons"] = reasons
    return qc
