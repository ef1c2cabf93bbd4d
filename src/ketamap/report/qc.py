"""Quality-control images: atlas boundaries over a registered sample."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["registration_overlay_png"]


def registration_overlay_png(sample: np.ndarray, labels: np.ndarray, *, title: str = "") -> bytes:
    """PNG of the warped atlas' region boundaries over the sample in three planes.

    Parameters
    ----------
    sample : ndarray, shape (Z, Y, X)
        The sample at atlas resolution and orientation (as registered).
    labels : ndarray of int, same shape
        The atlas annotation warped onto the sample grid.
    title : str
        Figure title (e.g. the subject id).

    Returns
    -------
    bytes
        The PNG file content.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    sample = np.asarray(sample, dtype=np.float32)
    labels = np.asarray(labels)
    brain = labels > 0
    centre = [int(round(c)) for c in (np.argwhere(brain).mean(axis=0) if brain.any()
                                      else np.asarray(sample.shape) / 2)]
    lo, hi = np.percentile(sample, [1, 99.5]) if sample.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=80)
    for ax, axis, name in zip(axes, range(3), ("axis 0 (coronal in asr)", "axis 1 (horizontal)",
                                                  "axis 2 (sagittal)")):
        img = np.take(sample, centre[axis], axis=axis)
        lab = np.take(labels, centre[axis], axis=axis)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        edges = np.ma.masked_where(~find_boundaries(lab, mode="inner"), np.ones(lab.shape))
        ax.imshow(edges, cmap="autumn", alpha=0.9, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}: atlas boundaries on the registered sample", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
