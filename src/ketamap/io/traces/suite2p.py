"""Read calcium traces: suite2p output folders (v0.14 and v1), NWB files and plain arrays.

A suite2p *plane folder* holds ``F.npy`` and ``Fneu.npy`` (ROIs × frames),
``iscell.npy`` (ROIs × 2: label, probability) and ``stat.npy`` (one dict per
ROI with ``ypix, xpix, lam, med``). The frame rate is ``fs`` in ``ops.npy``
(v0.14) or in ``settings.npy`` / ``db.npy`` (v1, which split ``ops`` into a
pipeline-settings and a recording dictionary). Pointing at a ``suite2p`` folder
or at a recording folder that contains ``suite2p/plane0`` also works when it
has a single plane.

Plain arrays are ``.npy`` or ``.csv`` files shaped (cells, frames), without a
header in CSV. NWB files are read by :mod:`ketamap.io.traces.nwb` (optional
``pynwb``).

ROI footprints (``stat.npy``) and the mean image (``meanImg`` in ``ops.npy``,
or in v1's other dictionaries) are kept for matching cells across sessions.

Every reading problem is one :class:`~ketamap.errors.InputError` or
:class:`~ketamap.errors.InputNotFoundError` sentence naming the file.

Security: suite2p keeps ``stat``, ``ops`` and v1's dictionaries as pickled
object arrays, and ``np.load`` with pickles allowed would run any code a
crafted pickle names. These files are read by :func:`load_npy_safe` instead: a
restricted unpickler that rebuilds only NumPy arrays, dtypes and scalars,
dicts, lists, tuples, sets and plain values (int, float, complex, bool, str,
bytes, None, dates and times; file paths come back as text) and refuses any
other global with one :class:`~ketamap.errors.InputError` sentence naming the
file and the global.
"""

from __future__ import annotations

import codecs
import datetime
import logging
import pickle
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from numpy.lib import format as npy_format

from ketamap.errors import InputError, InputNotFoundError
from ketamap.io.traces import Recording, check_traces

__all__ = [
    "Recording",
    "find_plane_folder",
    "load_npy_safe",
    "read_suite2p",
    "read_array",
    "read_recording",
]

log = logging.getLogger(__name__)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _load_npy(path: Path):
    """Read a numeric .npy file; object arrays are refused (no pickles)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path} could not be read as a .npy file: {_one_line(e)}.") from e


def _latin1_bytes(text, encoding="latin1"):
    """Rebuild bytes the way protocol-2 pickles do (``_codecs.encode``), latin-1 text only."""
    if not isinstance(text, str) or codecs.lookup(str(encoding)).name != "iso8859-1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 bytes")
    return text.encode("latin1")


def _path_text(flavour):
    """Return a builder turning a pickled ``pathlib`` path (user-written ``db.npy``) into text."""

    def build(*parts):
        if not all(isinstance(p, str) for p in parts):
            raise pickle.UnpicklingError("a pickled path holds parts that are not text")
        return str(flavour(*parts))

    return build


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Return the globals a suite2p pickle may name, mapped to what they rebuild.

    NumPy 1.x writes ``numpy.core.multiarray``, NumPy 2.x ``numpy._core.multiarray``;
    both map to the running NumPy's functions, taken from what its own objects
    pickle to (no private module is imported). Pickle protocol 2 (``np.save``
    before NumPy 1.17) names ``__builtin__`` and ``_codecs.encode`` (for bytes);
    protocols 3 and 4 name ``builtins``.
    """
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(core, "_reconstruct")] = reconstruct
        allowed[(core, "scalar")] = scalar
    plain = (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)
    for module in ("builtins", "__builtin__"):
        for t in plain:
            allowed[(module, t.__name__)] = t
    allowed[("_codecs", "encode")] = _latin1_bytes
    # suite2p >= 0.10 stores the processing time: ops["date_proc"] = datetime.now().astimezone()
    dates = (datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone)
    for t in dates:
        allowed[("datetime", t.__name__)] = t
    for module in ("pathlib", "pathlib._local"):
        for name in ("PurePosixPath", "PosixPath"):
            allowed[(module, name)] = _path_text(PurePosixPath)
        for name in ("PureWindowsPath", "WindowsPath"):
            allowed[(module, name)] = _path_text(PureWindowsPath)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the whitelist."""

    def __init__(self, module: str, name: str):
        text = f"{module}.{name}"
        self.qualname = "".join(c if c.isprintable() else "?" for c in text)[:200]
        super().__init__(self.qualname)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only the whitelisted globals (:func:`_allowed_globals`)."""

    def find_class(self, module, name):
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        raise _RefusedGlobal(str(module), str(name))

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_npy_safe(path: str | Path) -> np.ndarray:
    """Read a .npy file that may hold pickled objects, without running any code.

    Numeric arrays are read by ``np.load(..., allow_pickle=False)``. Object
    arrays (suite2p's ``stat.npy``, ``ops.npy`` and v1's dictionaries) are
    unpickled by a restricted unpickler that rebuilds only NumPy arrays, dtypes
    and scalars, dicts, lists, tuples, sets and plain values (int, float,
    complex, bool, str, bytes, None, and the ``datetime`` types suite2p uses
    for its processing date); pickled ``pathlib`` paths come back as strings.
    Any other global (a function such as ``os.system``, any other class) is
    refused before anything is called.

    Parameters
    ----------
    path : path-like
        The .npy file.

    Returns
    -------
    ndarray

    Raises
    ------
    InputError
        If the file is not a .npy file, is truncated, or its pickle names a
        global outside the whitelist (the sentence names the file and the global).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                _, _, dtype = npy_format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                # 3.0 differs from 2.0 only in the header's text encoding (UTF-8 field
                # names); whether the dtype holds objects does not depend on it.
                _, _, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            obj = _unpickle(fh) if dtype.hasobject else None
    except _RefusedGlobal as e:
        raise InputError(
            f"{path} holds a pickled {e.qualname}, which ketamap refuses to load because "
            "only arrays, dicts, lists, tuples and plain values are read from pickled files."
        ) from None
    except (ValueError, OSError, EOFError, MemoryError) as e:
        raise InputError(f"{path} could not be read as a .npy file: {_one_line(e)}.") from e
    if obj is None:
        return _load_npy(path)
    if not isinstance(obj, np.ndarray):
        raise InputError(
            f"{path} could not be read as a .npy file: its pickle holds a "
            f"{type(obj).__name__}, not an array."
        )
    return obj


def _unpickle(fh):
    """Unpickle an object array's payload with :class:`_SafeUnpickler`."""
    try:
        return _SafeUnpickler(fh).load()
    except (_RefusedGlobal, OSError, MemoryError):
        raise
    except Exception as e:  # a malformed pickle fails in many ways; all are bad input
        raise ValueError(f"its pickled objects are malformed ({_one_line(e)})") from e


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
            d = load_npy_safe(plane / name)
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
        stat = load_npy_safe(plane / "stat.npy")
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
        from ketamap.io.traces.nwb import read_nwb

        return read_nwb(path, series=series)
    return read_array(path, neuropil=neuropil)
