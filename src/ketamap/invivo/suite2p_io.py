"""Read calcium traces: suite2p output folders (v0.14 and v1), NWB files and plain arrays.

A suite2p *plane folder* holds ``F.npy`` and ``Fneu.npy`` (ROIs × frames),
``iscell.npy`` (ROIs × 2: label, probability) and ``stat.npy`` (one dict per
ROI with ``ypix, xpix, lam, med``). The frame rate is ``fs`` in ``ops.npy``
(v0.14) or in ``settings.npy`` / ``db.npy`` (v1, which split ``ops`` into a
pipeline-settings and a recording dictionary). Pointing at a ``suite2p`` folder
or at a recording folder that contains ``suite2p/plane0`` also works when it
has a single plane.

Plain arrays are ``.npy`` or ``.csv`` files shaped (cells, frames), without a
header in CSV. NWB files are read by :mod:`ketamap.invivo.nwb_io` (optional
``pynwb``).

ROI footprints (``stat.npy``) and the mean image (``meanImg`` in ``ops.npy``,
or in v1's other dictionaries) are kept for matching cells across sessions.

Every reading problem is one :class:`~ketamap.errors.InputError` or
:class:`~ketamap.errors.InputNotFoundError` sentence naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ketamap.errors import InputError, InputNotFoundError
from ketamap.invivo.traces import Recording, check_traces

__all__ = ["Recording", "find_plane_folder", "read_suite2p", "read_array", "read_recording"]

log = logging.getLogger(__name__)


def _load_npy(path: Path, *, allow_pickle: bool = False):
    try:
        return np.load(path, allow_pickle=allow_pickle)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path} could not be read as a .npy file: {e}.") from e


def _find_key(obj, key: str):
    """Return ``obj[key]`` from a (possibly nested) suite2p dictionary, or None."""
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        obj = obj.item()
    if not isinstance(obj, dict):
        return None
    if key in obj:
        return obj[key]
    for v in obj.values():
        if isinstance(v, dict):
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def _find_fs(obj) -> float | None:
    """Return ``fs`` from a (possibly nested) suite2p dictionary."""
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.size == 1:
        obj = obj.item()
    if not isinstance(obj, dict):
        return None
    if "fs" in obj:
        try:
            return float(obj["fs"])
        except (TypeError, ValueError):
            return None
    for v in obj.values():
        if isinstance(v, dict):
            fs = _find_fs(v)
            if fs is not None:
                return fs
    return None


def find_plane_folder(path: str | Path) -> Path:
    """Return the suite2p plane folder (the one holding ``F.npy``) at or below ``path``.

    Raises
    ------
    InputNotFoundError
        If ``path`` does not exist or holds no suite2p plane.
    InputError
        If it holds several planes (pick one).
    """
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError(f"suite2p folder {path} does not exist.")
    if (path / "F.npy").is_file():
        return path
    for base in (path, path / "suite2p"):
        planes = sorted(p for p in base.glob("plane*") if (p / "F.npy").is_file())
        if len(planes) == 1:
            return planes[0]
        if len(planes) > 1:
            raise InputError(
                f"{base} holds {len(planes)} suite2p planes; point the session at one plane folder."
            )
    raise InputNotFoundError(
        f"{path} holds no suite2p output (no F.npy in it or in suite2p/plane*/)."
    )


def read_suite2p(path: str | Path, *, only_cells: bool = True) -> Recording:
    """Read a suite2p plane folder (v0.14 ``ops.npy`` or v1 ``settings.npy``/``db.npy``).

    Parameters
    ----------
    path : path-like
        A plane folder, a ``suite2p`` folder or a recording folder containing one plane.
    only_cells : bool
        Keep only ROIs labelled as cells in ``iscell.npy`` (all ROIs if absent).

    Returns
    -------
    Recording

    Raises
    ------
    InputNotFoundError
        If the folder or ``Fneu.npy`` is missing.
    InputError
        If arrays are malformed or their shapes disagree.
    """
    plane = find_plane_folder(path)
    F = check_traces(_load_npy(plane / "F.npy"), name=str(plane / "F.npy"))
    if not (plane / "Fneu.npy").is_file():
        raise InputNotFoundError(f"{plane} has F.npy but no Fneu.npy.")
    Fneu = check_traces(_load_npy(plane / "Fneu.npy"), name=str(plane / "Fneu.npy"))
    if Fneu.shape != F.shape:
        raise InputError(f"{plane}: F.npy has shape {F.shape} but Fneu.npy has shape {Fneu.shape}.")
    keep = np.ones(F.shape[0], dtype=bool)
    if only_cells and (plane / "iscell.npy").is_file():
        iscell = np.asarray(_load_npy(plane / "iscell.npy"))
        label = iscell[:, 0] if iscell.ndim == 2 else iscell
        if label.shape[0] != F.shape[0]:
            raise InputError(
                f"{plane}: iscell.npy has {label.shape[0]} rows but F.npy has {F.shape[0]} ROIs."
            )
        keep = label.astype(float) > 0.5
    fs, mean_image = None, None
    for name in ("ops.npy", "settings.npy", "db.npy", "reg_outputs.npy", "detect_outputs.npy"):
        if (plane / name).is_file():
            d = _load_npy(plane / name, allow_pickle=True)
            fs = _find_fs(d) if fs is None else fs
            if mean_image is None:
                for key in ("meanImg", "meanImgE"):
                    img = _find_key(d, key)
                    if isinstance(img, np.ndarray) and img.ndim == 2:
                        mean_image = img.astype(np.float32)
                        break
    idx = np.nonzero(keep)[0]
    footprints = None
    if (plane / "stat.npy").is_file():
        stat = _load_npy(plane / "stat.npy", allow_pickle=True)
        if len(stat) != F.shape[0]:
            raise InputError(f"{plane}: stat.npy has {len(stat)} ROIs but F.npy has {F.shape[0]}.")
        footprints = [stat[i] for i in idx]
    log.info("read %s: %d of %d ROIs are cells, %d frames", plane, len(idx), len(keep), F.shape[1])
    return Recording(F[keep], Fneu[keep], idx, fs, str(plane), footprints, mean_image)


def read_array(path: str | Path, *, neuropil: str | Path | None = None) -> Recording:
    """Read a (cells, frames) array from ``.npy`` or headerless ``.csv``.

    Parameters
    ----------
    path : path-like
        The fluorescence array.
    neuropil : path-like, optional
        A neuropil array of the same shape.

    Returns
    -------
    Recording
        With ``frame_rate_hz=None`` (give it in the sessions file).

    Raises
    ------
    InputNotFoundError, InputError
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"trace file {path} does not exist.")

    def _read(p: Path) -> np.ndarray:
        if p.suffix.lower() == ".npy":
            return check_traces(_load_npy(p), name=str(p))
        if p.suffix.lower() == ".csv":
            try:
                arr = np.loadtxt(p, delimiter=",", dtype=np.float32, ndmin=2)
            except ValueError as e:
                raise InputError(f"{p} is not a numeric CSV of cells × frames: {e}.") from e
            return check_traces(arr, name=str(p))
        raise InputError(f"trace file {p} must end in .npy or .csv, got {p.suffix!r}.")

    F = _read(path)
    Fneu = None
    if neuropil is not None:
        npath = Path(neuropil)
        if not npath.is_file():
            raise InputNotFoundError(f"neuropil file {npath} does not exist.")
        Fneu = _read(npath)
        if Fneu.shape != F.shape:
            raise InputError(f"{npath} has shape {Fneu.shape} but {path} has shape {F.shape}.")
    return Recording(F, Fneu, np.arange(F.shape[0]), None, str(path))


def read_recording(
    path: str | Path, *, neuropil: str | Path | None = None, series: str | None = None
) -> Recording:
    """Read a session's traces: a suite2p folder, an NWB file or a plain array file.

    ``series`` names the ``RoiResponseSeries`` to read from an NWB file.
    """
    path = Path(path)
    if path.is_dir():
        return read_suite2p(path)
    if path.suffix.lower() == ".nwb":
        from ketamap.invivo.nwb_io import read_nwb

        return read_nwb(path, series=series)
    return read_array(path, neuropil=neuropil)
