"""The antspyx engine of :func:`ketamap.wholebrain.register.register_to_atlas`.

ANTs (``antsRegistration`` through antspyx) runs an affine stage and a SyN
(symmetric diffeomorphic) stage on the same work-grid images as the
SimpleITK engine. Its result is read back as SimpleITK transforms, so that
everything downstream (cell mapping, label warping, QC, the HDF5 transform
file) is the same for both engines:

* ``0GenericAffine.mat`` is an ITK transform file: ``sitk.ReadTransform``;
* ``1Warp.nii.gz`` is an ITK displacement field on the fixed (sample) grid:
  ``sitk.ReadImage`` -> ``sitk.DisplacementFieldTransform``.

The forward map of fixed (prepared sample) points to moving (atlas) points is
``x -> affine(warp(x))``, i.e. ``CompositeTransform([affine, warp])`` (ITK
applies the list last to first). Both images are handed to antspyx with the
same origin, spacing and identity direction as the SimpleITK images, so the
physical points of the two libraries coincide.

antspyx is optional (``pip install "ketamap[ants]"``); it is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ketamap.errors import RegistrationError, require

logger = logging.getLogger(__name__)

THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def import_ants():
    """Import antspyx, or raise one sentence saying how to get it."""
    return require(
        "ants",
        needed_for='Registration engine "antspyx"',
        install="ketamap[ants]",
        what="the antspyx package",
        otherwise=' or set engine = "simpleitk"',
    )


def _to_ants(ants, image: sitk.Image):
    """Convert a SimpleITK image to an ANTsImage on the same physical grid (indexed x, y, z)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # (z, y, x)
    return ants.from_numpy(
        np.ascontiguousarray(arr.transpose(2, 1, 0)),
        origin=tuple(float(v) for v in image.GetOrigin()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
    )


@contextlib.contextmanager
def _deterministic(ants, seed: int, n_threads: int):
    """Fix ANTs' random seed and (when asked) its thread count for the block, then restore."""
    previous_seed = ants.config._random_seed
    previous_threads = os.environ.get(THREADS_ENV)
    ants.config._random_seed = seed + 1
    if n_threads:
        os.environ[THREADS_ENV] = str(n_threads)
    try:
        yield
    finally:
        ants.config._random_seed = previous_seed
        if n_threads:
            if previous_threads is None:
                os.environ.pop(THREADS_ENV, None)
            else:
                os.environ[THREADS_ENV] = previous_threads


def register_ants(fixed: sitk.Image, moving: sitk.Image, params, mask: sitk.Image | None):
    """Affine + SyN registration with antspyx, returned as SimpleITK transforms.

    Parameters
    ----------
    fixed, moving : SimpleITK.Image
        Work-grid images (prepared sample, atlas reference), float32.
    params : RegistrationParams
        Uses ``metric``, ``histogram_bins``, ``syn_iterations``, ``deformable``,
        ``seed`` and ``n_threads``.
    mask : SimpleITK.Image or None
        Moving (atlas) mask, uint8, on the moving grid.

    Returns
    -------
    affine : SimpleITK.Transform
        The affine stage alone (for the QC pose checks).
    transform : SimpleITK.CompositeTransform
        Prepared sample physical point -> atlas physical point.

    Raises
    ------
    ParameterError
        If antspyx is not installed.
    RegistrationError
        If ANTs fails.
    """
    ants = import_ants()
    mattes = params.metric == "mattes"
    iterations = tuple(params.syn_iterations) if params.deformable else (0,)
    kwargs = {}
    if mask is not None:
        kwargs["moving_mask"] = _to_ants(ants, sitk.Cast(mask, sitk.sitkFloat32))
    with (
        tempfile.TemporaryDirectory(prefix="ketamap-ants-") as tmp,
        _deterministic(ants, params.seed, params.n_threads),
    ):
        prefix = str(Path(tmp) / "reg_")
        try:
            out = ants.registration(
                _to_ants(ants, fixed),
                _to_ants(ants, moving),
                type_of_transform="SyN" if params.deformable else "Affine",
                outprefix=prefix,
                # mutual information, or (global / local, radius 2) correlation
                aff_metric="mattes" if mattes else "GC",
                aff_sampling=params.histogram_bins,
                syn_metric="mattes" if mattes else "CC",
                syn_sampling=params.histogram_bins if mattes else 2,
                reg_iterations=iterations,
                **kwargs,
            )
        except RuntimeError as e:
            raise RegistrationError(f"antspyx could not register the sample ({e}).") from e
        affine_files = [f for f in out["fwdtransforms"] if f.endswith(".mat")]
        warp_files = [f for f in out["fwdtransforms"] if f.endswith("Warp.nii.gz")]
        if len(affine_files) != 1:
            raise RegistrationError("antspyx returned no affine transform.")
        affine = sitk.ReadTransform(affine_files[0])
        parts = [affine]
        if warp_files:
            field = sitk.ReadImage(warp_files[0], sitk.sitkVectorFloat64)
            parts.append(sitk.DisplacementFieldTransform(field))
    transform = sitk.CompositeTransform(parts)
    logger.info("antspyx %s: %d transform(s)", "SyN" if warp_files else "affine", len(parts))
    return affine, transform
