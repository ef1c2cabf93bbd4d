"""Regularised B-spline free-form deformation (FFD) with a local correlation metric.

SimpleITK's registration framework optimises a B-spline transform with no
penalty on its bending, so nothing but the image data holds the control
points and they drift wherever the data is weak (docs/registration.md). This
module optimises the same transform (a SimpleITK ``BSplineTransform``, so the
rest of ketamap is unchanged) against

    cost(c) = - mean_{x in mask} LNCC(F, M o A o (id + u_c))(x) + bending_weight * BE(u_c)

where ``F`` is the fixed (sample) image, ``M`` the moving (atlas) image,
``A`` the affine found before, ``u_c`` the cubic B-spline displacement with
coefficients ``c``, LNCC the local normalised cross-correlation in a box
window and BE the bending energy (Rueckert et al. 1999). The gradient of both
terms is exact (up to the interpolation of the moving image's gradient), so
L-BFGS-B converges instead of being stopped early.

When atlas labels are given, the moving image is rescaled region by region
to the sample's contrast before every level after the first
(:func:`match_region_contrast`): LNCC forgives a gain that is the same
across a window, not a different gain on each side of a region boundary,
which pulls the boundary (docs/registration.md).

Arrays are (z, y, x); SimpleITK's (x, y, z) order is confined to
:func:`_itk_geometry` and :func:`to_sitk_bspline`.
"""

from __future__ import annotations

import logging

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from ketamap.wholebrain.transforms import linear_part

logger = logging.getLogger(__name__)


def _cubic_bspline(t: np.ndarray, derivative: int = 0) -> np.ndarray:
    """Centred cubic B-spline kernel (or its first or second derivative) at ``t``."""
    a = np.abs(t)
    s = np.sign(t)
    out = np.zeros_like(a)
    inner = a < 1
    outer = (a >= 1) & (a < 2)
    if derivative == 0:
        out[inner] = 2 / 3 - a[inner] ** 2 + a[inner] ** 3 / 2
        out[outer] = (2 - a[outer]) ** 3 / 6
    elif derivative == 1:
        out[inner] = s[inner] * (-2 * a[inner] + 1.5 * a[inner] ** 2)
        out[outer] = -s[outer] * (2 - a[outer]) ** 2 / 2
    else:
        out[inner] = -2 + 3 * a[inner]
        out[outer] = 2 - a[outer]
    return out


def _weights(points_um: np.ndarray, origin_um: float, spacing_um: float, n: int, derivative=0):
    """Matrix (len(points), n) of B-spline weights of control points ``origin + k * spacing``.

    Derivatives are with respect to the coordinate in control spacings.
    """
    t = (points_um[:, None] - origin_um) / spacing_um - np.arange(n)[None, :]
    return _cubic_bspline(t, derivative)


def _apply(mats, coeff):
    """Tensor product of per-axis matrices with a (3, nz, ny, nx) coefficient array."""
    out = coeff
    for axis, m in enumerate(mats):
        out = np.moveaxis(np.tensordot(m, out, axes=([1], [axis + 1])), 0, axis + 1)
    return out


def _apply_adjoint(mats, field):
    """Adjoint of :func:`_apply`: (3, Z, Y, X) field back onto the control grid."""
    out = field
    for axis, m in enumerate(mats):
        out = np.moveaxis(np.tensordot(m.T, out, axes=([1], [axis + 1])), 0, axis + 1)
    return out


def _itk_geometry(bspline: sitk.BSplineTransform):
    """Control grid of an ITK B-spline: origin (µm), spacing (µm), shape, all (z, y, x)."""
    image = bspline.GetCoefficientImages()[0]
    return (
        np.asarray(image.GetOrigin(), float)[::-1],
        np.asarray(image.GetSpacing(), float)[::-1],
        tuple(int(s) for s in image.GetSize()[::-1]),
    )


def to_sitk_bspline(bspline: sitk.BSplineTransform, coeff_zyx_um: np.ndarray) -> None:
    """Write (3, nz, ny, nx) displacement coefficients (z, y, x components, µm) into ``bspline``."""
    # ITK orders parameters by component x, y, z, each image x-fastest (= C order of zyx arrays)
    params = np.concatenate([coeff_zyx_um[k].ravel() for k in (2, 1, 0)])
    bspline.SetParameters(params.astype(float).tolist())


def _mats(geometry, axes_um):
    """Per-axis B-spline weight matrices of a control grid at the given axis coordinates."""
    origin, spacing, shape = geometry
    return [_weights(axes_um[a], origin[a], spacing[a], shape[a]) for a in range(3)]


def _box_sum(a, size):
    return ndi.uniform_filter(a, size=size, mode="constant") * float(size**3)


def lncc(fixed, warped, weight, size: int):
    """Weighted mean local NCC of two arrays and its gradient with respect to ``warped``.

    ``size`` is the box window edge (voxels). Returns (value, gradient).
    """
    n = float(size**3)
    sum_i = _box_sum(fixed, size)
    sum_j = _box_sum(warped, size)
    mean_i = sum_i / n
    mean_j = sum_j / n
    cross = _box_sum(fixed * warped, size) - sum_i * mean_j
    var_i = _box_sum(fixed * fixed, size) - sum_i * mean_i
    var_j = _box_sum(warped * warped, size) - sum_j * mean_j
    eps = 1e-5 * n
    var_i = np.maximum(var_i, eps)
    var_j = np.maximum(var_j, eps)
    cc = cross * cross / (var_i * var_j)
    total = float(weight.sum())
    value = float((weight * cc).sum() / total)
    alpha = weight * 2 * cross / (var_i * var_j) / total
    beta = weight * 2 * cross * cross / (var_i * var_j * var_j) / total
    grad = (
        fixed * _box_sum(alpha, size)
        - _box_sum(alpha * mean_i, size)
        - warped * _box_sum(beta, size)
        + _box_sum(beta * mean_j, size)
    )
    return value, grad


def match_region_contrast(
    fixed: np.ndarray,
    moving: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    moving_index: np.ndarray,
    *,
    min_voxels: int = 8,
    max_gain: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale ``moving`` region by region to the contrast of ``fixed``.

    Parameters
    ----------
    fixed : (Z, Y, X) ndarray
        The sample.
    moving : (Z', Y', X') ndarray
        The atlas reference.
    labels : (Z', Y', X') integer ndarray
        Atlas region ids on the moving grid (0 outside the brain).
    weight : (Z, Y, X) ndarray
        Fixed voxels to use (> 0).
    moving_index : (3, Z, Y, X) ndarray
        Moving-grid index (z, y, x) that the current transform gives every
        fixed voxel.

    Returns
    -------
    rescaled : (Z', Y', X') float32 ndarray
        ``moving`` times its region's gain, from the least-squares fit of
        ``fixed = gain[region] * warped moving + offset`` (one offset for the
        brain), relative to the median gain over regions and clipped to
        [1 / max_gain, max_gain] (a region whose fitted gain is not positive,
        such as one with no tissue in the sample, gets ``1 / max_gain``).
        Regions with fewer than ``min_voxels`` usable voxels, and the outside
        (label 0), keep gain 1.
    gains : (n_regions,) ndarray
        The gain of each region found, for the log.
    """
    warped = ndi.map_coordinates(moving, moving_index, order=1, mode="constant", cval=0.0)
    region = ndi.map_coordinates(labels, moving_index, order=0, mode="constant", cval=0)
    inside = (weight > 0) & (region > 0)
    if inside.sum() < 2 or np.ptp(warped[inside]) == 0:
        return moving.astype(np.float32), np.ones(0)
    floor = 0.05 * float(warped[inside].mean())
    keep = inside & (warped > floor)
    ids, counts = np.unique(region[keep], return_counts=True)
    ids = ids[counts >= min_voxels]
    if ids.size == 0:
        return moving.astype(np.float32), np.ones(0)
    keep &= np.isin(region, ids)
    # Least squares of fixed = gain[region] * warped + offset, one offset for the brain
    # (the sample may carry one against the reference: background, or noise around its
    # normalisation; LNCC ignores it, a ratio would not). Closed form from per-region
    # sums; unbiased under the sample's noise, unlike a median of ratios.
    f, w, r = fixed[keep].astype(np.float64), warped[keep].astype(np.float64), region[keep]
    n = ndi.sum_labels(np.ones_like(f), r, ids)
    sf, sw = ndi.sum_labels(f, r, ids), ndi.sum_labels(w, r, ids)
    sww, swf = ndi.sum_labels(w * w, r, ids), ndi.sum_labels(w * f, r, ids)
    spread = float(np.sum(n - sw * sw / sww))
    offset = float(np.sum(sf - swf * sw / sww)) / spread if spread > 1e-9 * n.sum() else 0.0
    log_gain = np.log(np.maximum(swf - offset * sw, 1e-12) / sww)
    bound = np.log(max_gain)
    gains = np.exp(np.clip(log_gain - np.median(log_gain), -bound, bound))
    pos = np.clip(np.searchsorted(ids, labels), 0, ids.size - 1)
    factor = np.where(ids[pos] == labels, gains[pos], 1.0)
    return (moving * factor).astype(np.float32), gains


class _Level:
    """Everything one pyramid level needs, precomputed."""

    def __init__(
        self,
        fixed,
        moving,
        weight,
        spacing_um,
        affine_matrix,
        affine_offset,
        geometry,
        shrink,
        sigma_um,
        window,
    ):
        origin, cspacing, cshape = geometry
        f = ndi.gaussian_filter(fixed, sigma_um / spacing_um) if sigma_um else fixed
        m = ndi.gaussian_filter(moving, sigma_um / spacing_um) if sigma_um else moving
        self.fixed = np.ascontiguousarray(f[::shrink, ::shrink, ::shrink], dtype=np.float32)
        self.weight = np.ascontiguousarray(weight[::shrink, ::shrink, ::shrink], dtype=np.float32)
        self.moving = m.astype(np.float32)
        self.moving_grad = np.stack(np.gradient(self.moving, *spacing_um)).astype(np.float32)
        self.spacing_um = spacing_um
        self.window = window
        shape = self.fixed.shape
        axes_um = [np.arange(n) * shrink * spacing_um[a] for a, n in enumerate(shape)]
        self.mats = [w.astype(np.float32) for w in _mats(geometry, axes_um)]
        grid = np.stack(np.meshgrid(*axes_um, indexing="ij"))
        # affine image of every fixed voxel (moving µm), (3, Z, Y, X)
        self.base = np.tensordot(affine_matrix, grid, axes=1) + affine_offset[:, None, None, None]
        self.matrix = affine_matrix
        # bending energy on a grid at half the control spacing over the fixed domain
        be_axes = [
            np.arange(0, shape[a] * shrink * spacing_um[a], cspacing[a] / 2) for a in range(3)
        ]
        self.be_mats = [
            [_weights(be_axes[a], origin[a], cspacing[a], cshape[a], d) for d in range(3)]
            for a in range(3)
        ]
        self.be_count = float(np.prod([len(x) for x in be_axes]))

    def warp(self, u):
        """Sample the moving image and its gradient (µm⁻¹, moving frame) at ``A(x + u(x))``."""
        points = self.base + np.tensordot(self.matrix, u, axes=1)
        idx = points / self.spacing_um[:, None, None, None]
        values = ndi.map_coordinates(self.moving, idx, order=1, mode="nearest")
        grads = np.stack(
            [ndi.map_coordinates(g, idx, order=1, mode="nearest") for g in self.moving_grad]
        )
        return values, grads

    def bending(self, coeff_vox):
        """Bending energy (mean over the evaluation grid) and its gradient."""
        value = 0.0
        grad = np.zeros_like(coeff_vox)
        for a in range(3):
            for b in range(a, 3):
                orders = [0, 0, 0]
                orders[a] += 1
                orders[b] += 1
                mats = [self.be_mats[k][orders[k]] for k in range(3)]
                d = _apply(mats, coeff_vox)
                w = 1.0 if a == b else 2.0
                value += w * float((d * d).sum())
                grad += _apply_adjoint(mats, 2 * w * d)
        return value / self.be_count, grad / self.be_count


def register_ffd(
    fixed: sitk.Image,
    moving: sitk.Image,
    affine: sitk.Transform,
    bspline: sitk.BSplineTransform,
    *,
    levels_um,
    weight: np.ndarray,
    bending_weight: float,
    iterations: int,
    window_um: float,
    meshes=None,
    moving_labels: np.ndarray | None = None,
) -> sitk.BSplineTransform:
    """Optimise ``bspline`` (in place) so that ``affine(x + u(x))`` maps ``fixed`` onto ``moving``.

    Parameters
    ----------
    fixed, moving : SimpleITK.Image
        Origin 0, identity direction, the same spacing.
    affine : SimpleITK.Transform
        Fixed µm -> moving µm, applied after the B-spline displacement.
    bspline : SimpleITK.BSplineTransform
        Receives the result; its control grid is the finest one and its
        parameters are overwritten.
    levels_um : sequence of float
        Effective voxel size per level, coarse to fine (shrink and Gaussian sigma
        ``level / 2`` as in the affine stage).
    weight : (Z, Y, X) ndarray
        Metric weight per fixed voxel (0 outside the brain).
    bending_weight : float
        Weight of the bending energy of each level's own increment, computed on
        displacements in fixed voxels and coordinates in that level's control
        spacings.
    iterations : int
        L-BFGS-B iterations per level.
    window_um : float
        Edge of the LNCC window (µm) at every level, at least 3 voxels.
    meshes : sequence of 3 ints per level, optional
        B-spline mesh size (x, y, z) of each level, each refining the one
        before (the last one is ``bspline``'s own); default: ``bspline``'s
        grid at every level.
    moving_labels : (Z, Y, X) integer ndarray, optional
        Atlas region ids on the moving grid. When given, every level after
        the first sees ``moving`` rescaled to the sample's contrast region by
        region (:func:`match_region_contrast`) through the transform found so
        far.

    Notes
    -----
    Each level adds a displacement on its own control grid to the sum of the
    coarser levels' and penalises the bending of that increment only (the
    multi-resolution free-form deformation of Rueckert et al., 1999), so a
    large, smooth deformation found on a coarse grid is not pulled back by
    the finer level. The sum is written into ``bspline`` by least squares on
    the fixed grid, exact when the grids nest.
    """
    spacing = np.asarray(fixed.GetSpacing(), float)[::-1]
    f = sitk.GetArrayFromImage(fixed).astype(np.float32)
    m = sitk.GetArrayFromImage(moving).astype(np.float32)
    if moving_labels is not None and moving_labels.shape != m.shape:
        raise ValueError(
            f"moving_labels has shape {moving_labels.shape}, the moving image {m.shape}."
        )
    matrix, offset = linear_part(affine)  # affine(x) = matrix @ x + offset, (z, y, x)
    if not np.any(weight > 0):
        # the affine put no sample voxel inside the atlas brain: nothing to fit (QC flags it)
        logger.warning("B-spline stage skipped: no sample voxel maps into the atlas brain")
        to_sitk_bspline(bspline, np.zeros((3, *_itk_geometry(bspline)[2])))
        return bspline
    vox = float(spacing.min())
    full_axes = [np.arange(n) * spacing[a] for a, n in enumerate(f.shape)]
    fields = []  # (geometry, coefficients in µm) of the finished levels
    final = _itk_geometry(bspline)
    meshes = meshes or [None] * len(levels_um)
    m_atlas = m
    for level_um, mesh in zip(levels_um, meshes, strict=True):
        if moving_labels is not None and fields:
            grid = np.stack(np.meshgrid(*full_axes, indexing="ij"))
            grid += sum(_apply(_mats(g, full_axes), c) for g, c in fields)
            points = np.tensordot(matrix, grid, axes=1) + offset[:, None, None, None]
            del grid
            m, gains = match_region_contrast(
                f, m_atlas, moving_labels, weight, points / spacing[:, None, None, None]
            )
            del points
            if gains.size:
                logger.info(
                    "FFD level %g µm: reference rescaled in %d regions, gains %.2f-%.2f (5-95 %%)",
                    level_um,
                    gains.size,
                    *np.percentile(gains, [5, 95]),
                )
        geometry = (
            final
            if mesh is None
            else _itk_geometry(sitk.BSplineTransformInitializer(fixed, list(mesh), 3))
        )
        shrink = max(1, int(round(level_um / vox)))
        window = max(3, int(round(window_um / (shrink * vox))) | 1)
        level = _Level(
            f, m, weight, spacing, matrix, offset, geometry, shrink, level_um / 2, window
        )
        level_axes = [ax[::shrink] for ax in full_axes]
        base = sum(
            (_apply(_mats(g, level_axes), c) for g, c in fields), np.zeros((3, *level.fixed.shape))
        ).astype(np.float32)
        history = []
        start = np.zeros((3, *geometry[2]))

        def cost(x, level=level, history=history, base=base, start=start):
            # the optimiser works in fixed voxels, the image maths in µm
            c = x.reshape(start.shape)
            u = base + _apply(level.mats, (c * vox).astype(np.float32))
            values, grads = level.warp(u)
            cc, dcc = lncc(level.fixed, values, level.weight, level.window)
            # d/du of the warped image: grad M (moving frame) through the affine's matrix
            force = np.tensordot(level.matrix.T, grads * dcc[None], axes=1)
            g_metric = _apply_adjoint(level.mats, force) * vox
            be, g_be = level.bending(c)
            history.append((cc, be))
            return -cc + bending_weight * be, (-g_metric + bending_weight * g_be).ravel()

        # one BLAS thread: the matrices are small, and spinning BLAS threads of
        # parallel registrations fight over the cores (2x slower with -j 2)
        with threadpool_limits(limits=1, user_api="blas"):
            result = minimize(
                cost,
                start.ravel(),
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": iterations, "maxcor": 10, "gtol": 1e-10, "ftol": 1e-12},
            )
        fields.append((geometry, result.x.reshape(start.shape) * vox))
        logger.info(
            "FFD level %g µm: LNCC %.4f -> %.4f, bending %.3g, %d evaluations (%s)",
            level_um,
            history[0][0],
            history[-1][0],
            history[-1][1],
            result.nfev,
            result.message,
        )
    # every level's field on the final control grid (exact when the grids nest)
    dense = sum(_apply(_mats(g, full_axes), c) for g, c in fields)
    coeff = _apply([np.linalg.pinv(w) for w in _mats(final, full_axes)], dense)
    to_sitk_bspline(bspline, coeff)
    return bspline
