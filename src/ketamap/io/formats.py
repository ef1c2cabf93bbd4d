"""Lazy readers for Imaris (``.ims``) and NIfTI (``.nii``, ``.nii.gz``) volumes.

Both return a Dask array (z, y, x) whose chunks read only their own part of
the file, and the voxel size (z, y, x) in µm stored in the file. The arrays
reference the file by a small picklable proxy that opens the file for each
read, so they compute under the threads scheduler, in worker processes and on
a ``dask.distributed`` cluster alike (no open handle is shipped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np

from ketamap.errors import InputError, ParameterError, require

__all__ = ["open_imaris", "open_nifti", "imaris_channels", "is_nifti"]

log = logging.getLogger(__name__)

_NIFTI_UNIT_TO_UM = {"meter": 1e6, "mm": 1e3, "micron": 1.0, "unknown": 1e3}
_IMS_UNIT_TO_UM = {"um": 1.0, "µm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6}


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".")


def is_nifti(path: Path) -> bool:
    """Tell whether ``path`` is named like a NIfTI file (``.nii`` or ``.nii.gz``)."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# --------------------------------------------------------------------------- Imaris


def _h5py():
    return require("h5py", needed_for="Reading Imaris files", install="h5py", error=InputError)


def _attr_text(attrs, name: str, where: str) -> str:
    """Imaris stores attributes as arrays of single bytes (b'1', b'0', ...)."""
    if name not in attrs:
        raise InputError(f"Imaris file {where} lacks the attribute {name} of DataSetInfo/Image.")
    value = attrs[name]
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, str):
        return value
    arr = np.asarray(value).ravel()
    if arr.dtype.kind in "SO":
        return b"".join(v if isinstance(v, bytes) else str(v).encode() for v in arr).decode(
            "latin-1"
        )
    return "".join(str(v) for v in arr)


class _ImarisProxy:
    """Picklable array-like over one Imaris dataset; each read opens the file."""

    def __init__(self, path: str, dataset: str, shape, dtype):
        self.path, self.dataset = path, dataset
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, index):
        h5py = _h5py()
        try:
            with h5py.File(self.path, "r") as f:
                return f[self.dataset][index]
        except OSError as e:
            raise InputError(f"Imaris file {self.path} cannot be read: {e}.") from e


def _imaris_channel_names(f) -> list[str]:
    try:
        tp = f["DataSet/ResolutionLevel 0/TimePoint 0"]
    except KeyError:
        return []
    names = [n for n in tp.keys() if n.startswith("Channel ")]
    return sorted(names, key=lambda n: int(n.split()[1]) if n.split()[1].isdigit() else 1 << 30)


def imaris_channels(path) -> int:
    """Count the channels of an Imaris file (at resolution level 0, time point 0)."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            return len(_imaris_channel_names(f))
    except OSError as e:
        raise InputError(f"Imaris file {path} cannot be opened: {e}.") from e


def open_imaris(
    path, *, channel: int = 0, chunks: tuple[int, int, int] | None = None
) -> tuple[da.Array, tuple[float, float, float]]:
    """Open one channel of an Imaris 5.5 file (HDF5) lazily.

    Parameters
    ----------
    path : path-like
        The ``.ims`` file.
    channel : int
        Channel index (``Channel N`` under ``DataSet/ResolutionLevel 0/TimePoint 0``).
    chunks : tuple of int, optional
        Dask chunk shape (z, y, x); by default a multiple of the HDF5 chunks
        of about 64 MB.

    Returns
    -------
    volume : dask.array.Array
        Shape (z, y, x) cropped to ``ImageSizeZ/Y/X`` (Imaris pads its
        datasets to whole chunks), the stored dtype.
    voxel_size_um : tuple of float
        (z, y, x) from ``(ExtMax - ExtMin) / ImageSize`` and the ``Unit``
        attribute (µm when absent).

    Raises
    ------
    InputError
        If the file is not HDF5, lacks the Imaris layout, or has no such channel.
    """
    h5py = _h5py()
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"Imaris file {path} is not a readable HDF5 file: {e}.") from e
    with f:
        if "DataSetInfo/Image" not in f:
            raise InputError(f"Imaris file {path} has no DataSetInfo/Image group.")
        names = _imaris_channel_names(f)
        if not names:
            raise InputError(
                f"Imaris file {path} has no DataSet/ResolutionLevel 0/TimePoint 0/Channel N data."
            )
        if not 0 <= channel < len(names):
            raise ParameterError(
                f"Imaris file {path} has {len(names)} channel(s); channel {channel} does not exist."
            )
        attrs = f["DataSetInfo/Image"].attrs
        where = str(path)
        try:
            size = tuple(int(_attr_text(attrs, f"ImageSize{a}", where)) for a in "ZYX")
            ext_min = [float(_attr_text(attrs, f"ExtMin{i}", where)) for i in (2, 1, 0)]
            ext_max = [float(_attr_text(attrs, f"ExtMax{i}", where)) for i in (2, 1, 0)]
        except ValueError as e:
            raise InputError(f"Imaris file {path} has a non-numeric image size or extent.") from e
        unit = _attr_text(attrs, "Unit", where).strip() if "Unit" in attrs else "um"
        factor = _IMS_UNIT_TO_UM.get(unit.lower())
        if factor is None:
            raise InputError(f'Imaris file {path} has an unknown length unit "{unit}".')
        dataset = f"DataSet/ResolutionLevel 0/TimePoint 0/{names[channel]}/Data"
        if dataset not in f:
            raise InputError(f"Imaris file {path} has no dataset {dataset}.")
        ds = f[dataset]
        stored, dtype, h5chunks = ds.shape, ds.dtype, ds.chunks
    if len(stored) != 3 or any(s < n for s, n in zip(stored, size, strict=False)) or min(size) < 1:
        raise InputError(
            f"Imaris file {path}: dataset of shape {stored} cannot hold an image of size {size}."
        )
    voxel = tuple(
        abs(hi - lo) / n * factor for lo, hi, n in zip(ext_min, ext_max, size, strict=False)
    )
    if not all(np.isfinite(v) and v > 0 for v in voxel):
        raise InputError(f"Imaris file {path} has a zero or invalid extent (ExtMin/ExtMax).")
    if chunks is None:
        base = h5chunks or (1, *stored[1:])
        per = int(np.prod(base)) * np.dtype(dtype).itemsize
        nz = max(1, int(64e6 // max(per, 1)))
        chunks = (
            (min(size[0], base[0] * nz), size[1], size[2])
            if base[1:] == stored[1:]
            else (
                min(size[0], max(base[0], 32)),
                min(size[1], max(base[1], 512)),
                min(size[2], max(base[2], 512)),
            )
        )
    proxy = _ImarisProxy(str(path), dataset, stored, dtype)
    arr = da.from_array(
        proxy, chunks=tuple(chunks), lock=False, meta=np.empty((0, 0, 0), dtype), name=False
    )
    arr = arr[: size[0], : size[1], : size[2]]
    log.info("open_imaris: %s channel %d %s %s, voxel %s µm", path, channel, size, dtype, voxel)
    return arr, voxel


# --------------------------------------------------------------------------- NIfTI


def _nibabel():
    return require("nibabel", needed_for="Reading NIfTI files", install="nibabel", error=InputError)


class _NiftiProxy:
    """Picklable array-like over a NIfTI image in (z, y, x); each read opens the file.

    NIfTI stores axes (i, j, k) = (x, y, z); this proxy exposes them reversed.
    """

    def __init__(self, path: str, shape_xyz, dtype):
        self.path = path
        self.shape = tuple(reversed(shape_xyz))
        self.dtype, self.ndim = np.dtype(dtype), 3

    def __getitem__(self, index):
        nib = _nibabel()
        if not isinstance(index, tuple):
            index = (index,)
        index = index + (slice(None),) * (3 - len(index))
        try:
            proxy = nib.load(self.path).dataobj
            ndim = len(proxy.shape)
            xyz = (index[2], index[1], index[0])[:ndim] + (0,) * max(0, ndim - 3)
            block = np.asarray(proxy[xyz])
        except Exception as e:  # nibabel/gzip raise many types on damaged files
            raise InputError(f"NIfTI file {self.path} cannot be read: {_one_line(e)}.") from e
        block = block.reshape(block.shape + (1,) * (3 - block.ndim))
        return np.ascontiguousarray(block.T.astype(self.dtype, copy=False))


def open_nifti(
    path, *, chunks: tuple[int, int, int] | None = None
) -> tuple[da.Array, tuple[float, float, float]]:
    """Open a NIfTI-1/2 image (``.nii`` or ``.nii.gz``) lazily in (z, y, x).

    Parameters
    ----------
    path : path-like
        The NIfTI file. Trailing axes of length 1 (e.g. time) are dropped.
    chunks : tuple of int, optional
        Dask chunk shape (z, y, x); by default slabs of about 64 MB.

    Returns
    -------
    volume : dask.array.Array
        Shape (z, y, x) = the file's (k, j, i) axes; the stored dtype, or
        float32/float64 when the header sets an intensity scaling.
    voxel_size_um : tuple of float
        (z, y, x) from ``pixdim`` and the header's spatial unit (mm when unset).

    Notes
    -----
    The voxel axes are taken as stored; the anatomical orientation is the
    one given in the manifest, not the NIfTI affine. An uncompressed ``.nii``
    reads each chunk directly; a ``.nii.gz`` must be decompressed from its
    start for each chunk, so convert it once to OME-Zarr (``ketamap convert``)
    before running a large study on it.

    Raises
    ------
    InputError
        If the file is not a readable NIfTI image or is not 2D/3D.
    """
    nib = _nibabel()
    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        unit = img.header.get_xyzt_units()[0]
        proxy = img.dataobj
        probe = np.asarray(proxy[(slice(0, 1),) * len(shape)])
    except Exception as e:  # nibabel raises many types for damaged headers/data
        raise InputError(f"NIfTI file {path} cannot be read: {_one_line(e)}.") from e
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        shape, zooms = (*shape, 1), (*zooms[:2], 1.0)
    if len(shape) != 3:
        raise InputError(
            f"NIfTI file {path} holds an image of shape {img.shape}; expected (x, y, z)."
        )
    if 0 in shape:
        raise InputError(f"NIfTI file {path} holds an empty image of shape {shape}.")
    factor = _NIFTI_UNIT_TO_UM.get(unit, 1e3)
    voxel = tuple(float(z) * factor for z in reversed(zooms[:3]))
    dtype = probe.dtype
    zyx = tuple(reversed(shape))
    if chunks is None:
        plane = zyx[1] * zyx[2] * dtype.itemsize
        chunks = (max(1, min(zyx[0], int(64e6 // max(plane, 1)))), zyx[1], zyx[2])
    arr = da.from_array(
        _NiftiProxy(str(path), shape, dtype),
        chunks=tuple(chunks),
        lock=False,
        meta=np.empty((0, 0, 0), dtype),
        name=False,
    )
    log.info("open_nifti: %s %s %s, voxel %s µm", path, zyx, dtype, voxel)
    return arr, voxel
