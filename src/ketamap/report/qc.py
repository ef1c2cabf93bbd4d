"""Quality-control images: atlas boundaries over a registered sample."""

from __future__ import annotations

import io

import numpy as np

__all__ = [
    "QC_ABSORBED_SUBTREES",
    "coarse_labels",
    "QC_BOUNDARY_LEVEL",
    "registration_checkerboard_png",
    "registration_overlay_png",
]


#: hierarchy depth at which the QC overlay draws region boundaries (root = 0): in the
#: Allen CCF the major divisions (cortical plate and subplate, striatum, pallidum,
#: thalamus, hypothalamus, midbrain, pons, medulla, cerebellum), not the hundreds of
#: leaf regions whose outlines cover the sample at atlas resolution
QC_BOUNDARY_LEVEL = 4
#: subtrees absorbed into the neighbouring regions in the QC overlay (white matter and
#: ventricles: dozens of thin tracts whose outlines would hide the grey-matter divisions)
QC_ABSORBED_SUBTREES = ("fiber tracts", "VS")


def coarse_labels(
    labels: np.ndarray,
    ontology,
    *,
    level: int = QC_BOUNDARY_LEVEL,
    absorbed: tuple[str, ...] = QC_ABSORBED_SUBTREES,
) -> np.ndarray:
    """Labels at a coarse hierarchy level, for outlines that stay readable.

    Every label is replaced by its ancestor at depth ``level``; voxels of the
    ``absorbed`` subtrees (white matter, ventricles) then take the label of the
    nearest voxel of another region inside the brain, so outlines follow the major
    divisions and not every thin tract.

    Parameters
    ----------
    labels : ndarray of int, any shape
        Region ids (0 outside the brain stays 0).
    ontology : Ontology
        The atlas' region hierarchy.
    level : int
        Hierarchy depth kept (root = 0).
    absorbed : tuple of str
        Acronyms (or names) of the subtrees absorbed; those the ontology does not
        have are ignored. When every brain voxel is absorbed, nothing is.

    Returns
    -------
    ndarray
        Same shape as ``labels``.

    Raises
    ------
    ParameterError
        If ``level`` is not a non-negative int.
    AtlasError
        If a label is not in the ontology.

    Examples
    --------
    >>> from ketamap.atlas import make_phantom
    >>> onto = make_phantom(resolution_um=200).ontology
    >>> labels = np.array([onto.lookup("VTA"), onto.lookup("cpd"), onto.lookup("SNr")])
    >>> [onto.acronym(int(r)) for r in coarse_labels(labels, onto, level=3)]
    ['MB', 'MB', 'MB']
    """
    from scipy import ndimage

    out = ontology.rollup(labels, level)
    ids = [
        d
        for key in absorbed
        if key in ontology
        for d in ontology.descendants(ontology.lookup(key), include_self=True)
    ]
    if not ids or out.size == 0:
        return out
    gone = np.isin(labels, ids)
    keep = (out > 0) & ~gone
    if not gone.any() or not keep.any():
        return out
    # index of the nearest kept voxel, for every voxel
    _, nearest = ndimage.distance_transform_edt(~keep, return_indices=True)
    filled = out[tuple(nearest)]
    return np.where(gone, filled, out)


def registration_overlay_png(
    sample: np.ndarray,
    labels: np.ndarray,
    *,
    ontology=None,
    level: int = QC_BOUNDARY_LEVEL,
    absorbed: tuple[str, ...] = QC_ABSORBED_SUBTREES,
    title: str = "",
) -> bytes:
    """PNG of the warped atlas' region boundaries over the sample in three planes.

    Parameters
    ----------
    sample : ndarray, shape (Z, Y, X)
        The sample at atlas resolution and orientation (as registered).
    labels : ndarray of int, same shape
        The atlas annotation warped onto the sample grid (0 outside the brain).
    ontology : Ontology, optional
        The atlas' region hierarchy. With it, every label is replaced by its ancestor
        at depth ``level`` and the ``absorbed`` subtrees take their neighbours' labels
        (:func:`coarse_labels`) before boundaries are drawn, so the overlay outlines
        the major divisions and stays readable instead of outlining every leaf region.
        Without it the labels are drawn as given.
    level : int
        Hierarchy depth of the boundaries drawn (root = 0; default
        :data:`QC_BOUNDARY_LEVEL`). Ignored without ``ontology``.
    absorbed : tuple of str
        Subtrees whose outlines are not drawn (default white matter and ventricles).
        Ignored without ``ontology``.
    title : str
        Figure title (e.g. the subject id).

    Returns
    -------
    bytes
        The PNG file content (1500 × 500 px).

    Raises
    ------
    ValueError
        If ``sample`` and ``labels`` are not 3-D images of the same shape.
    ParameterError
        If ``level`` is not a non-negative int.
    AtlasError
        If a label is not in ``ontology``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    sample = np.asarray(sample, dtype=np.float32)
    labels = np.asarray(labels)
    if sample.ndim != 3 or sample.shape != labels.shape:
        raise ValueError(
            f"sample {sample.shape} and labels {labels.shape} must be 3-D images of the same shape."
        )
    if ontology is not None:
        labels = coarse_labels(labels, ontology, level=level, absorbed=absorbed)
    brain = labels > 0
    centre = [int(round(c)) for c in (np.argwhere(brain).mean(axis=0) if brain.any()
                                      else np.asarray(sample.shape) / 2)]  # fmt: skip
    lo, hi = np.percentile(sample, [1, 99.5]) if sample.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), dpi=100)
    names = ("axis 0 (coronal in asr)", "axis 1 (horizontal)", "axis 2 (sagittal)")
    for ax, axis, name in zip(axes, range(3), names, strict=True):
        img = np.take(sample, centre[axis], axis=axis)
        lab = np.take(labels, centre[axis], axis=axis)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")  # fmt: skip
        edges = np.ma.masked_where(~find_boundaries(lab, mode="inner"), np.ones(lab.shape))
        ax.imshow(edges, cmap="autumn", alpha=0.9, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    drawn = f"boundaries at hierarchy level {level}" if ontology is not None else "boundaries"
    fig.suptitle(f"{title}: atlas {drawn} on the registered sample", fontsize=10)
    return _png_bytes(fig)


def _unit(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] between the 1st and 99.5th percentiles inside ``mask`` (or everywhere)."""
    values = image[mask] if mask.any() else image.ravel()
    lo, hi = np.percentile(values, [1, 99.5]) if values.size else (0.0, 1.0)
    return np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def registration_checkerboard_png(
    sample: np.ndarray, warped_reference: np.ndarray, *, tiles: int = 8, title: str = ""
) -> bytes:
    """PNG checkerboard of the sample and the warped atlas reference in three planes.

    Tiles alternate between the two images (each scaled to its own 1st-99.5th
    percentile range inside the brain), so a good registration shows
    anatomical edges running on across tile borders and a bad one shows
    breaks.

    Parameters
    ----------
    sample : ndarray, shape (Z, Y, X)
        The prepared sample (atlas orientation and resolution).
    warped_reference : ndarray, same shape
        The atlas reference warped onto the sample grid
        (:func:`ketamap.wholebrain.register.warp_image_to_sample`).
    tiles : int
        Tiles along the longer side of each plane (at least 2).
    title : str
        Figure title (e.g. the subject id).

    Returns
    -------
    bytes
        The PNG file content.

    Raises
    ------
    ValueError
        If the two images differ in shape or are not 3-D, or ``tiles < 2``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sample = np.asarray(sample, dtype=np.float32)
    warped_reference = np.asarray(warped_reference, dtype=np.float32)
    if sample.ndim != 3 or sample.shape != warped_reference.shape:
        raise ValueError(
            f"sample {sample.shape} and warped_reference {warped_reference.shape} must be "
            f"3-D images of the same shape."
        )
    if tiles < 2:
        raise ValueError(f"tiles must be at least 2, got {tiles}.")
    a = _unit(sample, warped_reference > 0)
    b = _unit(warped_reference, warped_reference > 0)
    centre = [s // 2 for s in sample.shape]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=80)
    names = ("axis 0 (coronal in asr)", "axis 1 (horizontal)", "axis 2 (sagittal)")
    for ax, axis, name in zip(axes, range(3), names, strict=True):
        pa = np.take(a, centre[axis], axis=axis)
        pb = np.take(b, centre[axis], axis=axis)
        size = max(1, int(np.ceil(max(pa.shape) / tiles)))
        rows, cols = np.indices(pa.shape)
        board = ((rows // size + cols // size) % 2).astype(bool)
        ax.imshow(np.where(board, pa, pb), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}: checkerboard of sample and warped atlas reference", fontsize=10)
    return _png_bytes(fig)


def _png_bytes(fig) -> bytes:
    """Lay out, render and close a matplotlib figure; return the PNG file content."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
