"""Calcium-imaging traces read from suite2p folders, NWB files and plain arrays.

Every reader returns a :class:`Recording` (the kept cells' fluorescence, the
neuropil, the frame rate and, where the input has them, ROI footprints and the
mean image), with traces checked by :func:`check_traces`:

- :mod:`ketamap.io.traces.suite2p`: suite2p folders (0.x to v1, pickles read
  without running code) and ``.npy`` arrays, and :func:`read_recording`, which
  picks the reader from the path;
- :mod:`ketamap.io.traces.nwb`: NWB files (``RoiResponseSeries``), with pynwb.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ketamap.errors import InputError

__all__ = ["Recording", "check_traces"]


@dataclass(frozen=True)
class Recording:
    """Traces of one session.

    Attributes
    ----------
    F : ndarray of float32, shape (cells, frames)
        ROI fluorescence of the kept cells.
    Fneu : ndarray of float32, shape (cells, frames) or None
        Neuropil fluorescence, when known.
    cell_index : ndarray of int, shape (cells,)
        Index of each kept cell in the input (suite2p ROI number or array row).
    frame_rate_hz : float or None
        Frame rate read from the input, if it records one.
    source : str
        Where the traces came from.
    footprints : list of dict or None
        ROI footprints of the kept cells (suite2p ``stat`` entries with
        ``ypix, xpix, lam``), when the input has them.
    mean_image : ndarray of float32, shape (y, x), or None
        Mean image of the session, when the input has one.
    """

    F: np.ndarray
    Fneu: np.ndarray | None
    cell_index: np.ndarray
    frame_rate_hz: float | None
    source: str
    footprints: list | None = None
    mean_image: np.ndarray | None = None


def check_traces(F: np.ndarray, *, name: str = "traces") -> np.ndarray:
    """Return ``F`` as a float32 (cells, frames) array, or raise one clear sentence.

    Parameters
    ----------
    F : array_like, shape (cells, frames)
        Fluorescence traces.
    name : str
        What to call the array in errors.

    Returns
    -------
    ndarray of float32, shape (cells, frames)

    Raises
    ------
    InputError
        If the array is not 2-D, not numeric, or holds NaN or infinite values.
    """
    try:
        arr = np.asarray(F)
    except (TypeError, ValueError) as e:  # ragged input
        raise InputError(f"{name} could not be read as a numeric array: {e}.") from e
    if arr.ndim != 2:
        raise InputError(f"{name} must be 2-D (cells, frames), got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float32, copy=False)
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.argmax(~np.isfinite(arr).all(axis=1)))
        raise InputError(f"{name} holds NaN or infinite values (first in cell {bad}).")
    return arr
