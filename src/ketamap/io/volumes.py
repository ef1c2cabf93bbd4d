"""Open image volumes lazily as Dask arrays (z, y, x) and write OME-Zarr.

Supported inputs: a folder of 2D TIFF planes (one file per z plane, z order =
natural sort of the file names), a multipage TIFF, an OME-Zarr image (NGFF
0.4, highest resolution) or a plain Zarr array, and a ``.npy`` file. Nothing
is read until the array is computed, except file headers to check shapes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr

from ketamap.errors import InputError, InputNotFoundError, ParameterError
from ketamap.io.atomic import atomic_dir
from ketamap.space import check_voxel_size

__all__ = ["open_volume", "write_ome_zarr", "read_voxel_size_um", "SUPPORTED_FORMATS"]

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "a folder of 2D TIFF planes, a multipage TIFF (.tif/.tiff), "
    "an OME-Zarr or Zarr folder, or a .npy file"
)
_TIFF_SUFFIXES = (".tif", ".tiff")
_UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _is_zarr(path: Path) -> bool:
    return any((path / n).exists() for n in (".zgroup", ".zarray", ".zattrs"))


def _read_plane(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    try:
        plane = tifffile.imread(path)
    except FileNotFoundError as e:
        raise InputError(f"TIFF plane {path} disappeared before it could be read.") from e
    except Exception as e:  # tifffile raises many types for corrupt files
        raise InputError(f"TIFF plane {path} cannot be read: {e}.") from e
    if plane.shape != shape or plane.dtype != dtype:
        raise InputError(
            f"TIFF plane {path} has shape {plane.shape} and dtype {plane.dtype}, "
            f"but the first plane has shape {shape} and dtype {dtype}."
        )
    return plane[None]


def _check_numbering(files: list[Path]) -> None:
    """Raise if the planes are numbered with a gap (e.g. ..._0003 missing)."""
    parts = [re.fullmatch(r"(.*?)(\d+)(\D*)", f.stem) for f in files]
    if not all(parts) or len({(p.group(1), p.group(3)) for p in parts}) != 1:
        return
    numbers = [int(p.group(2)) for p in parts]
    steps = np.diff(numbers)
    if len(steps) and np.any(steps != steps[0]):
        i = int(np.argmax(steps != steps[0]))
        raise InputError(
            f"TIFF planes in {files[0].parent} are not evenly numbered: after {files[i].name} "
            f"comes {files[i + 1].name}; a plane is probably missing."
        )


def _open_tiff_folder(path: Path) -> da.Array:
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise InputError(
            f"Folder {path} holds no TIFF planes and is not a Zarr folder; "
            f"supported inputs are {SUPPORTED_FORMATS}."
        )
    _check_numbering(files)
    first_shape, first_dtype = None, None
    for f in files:  # headers only: catch a bad plane before hours of computation
        try:
            with tifffile.TiffFile(f) as tf:
                page = tf.pages[0]
                shape, dtype = tuple(page.shape), np.dtype(page.dtype)
                n_pages = len(tf.pages)
        except Exception as e:
            raise InputError(f"TIFF plane {f} cannot be read: {e}.") from e
        if len(shape) != 2 or n_pages != 1:
            raise InputError(
                f"TIFF plane {f} is not a single 2D plane (shape {shape}, {n_pages} pages)."
            )
        if first_shape is None:
            first_shape, first_dtype = shape, dtype
        elif shape != first_shape or dtype != first_dtype:
            raise InputError(
                f"TIFF plane {f} has shape {shape} and dtype {dtype}, but {files[0].name} "
                f"has shape {first_shape} and dtype {first_dtype}."
            )
    planes = [
        da.from_delayed(
            dask.delayed(_read_plane)(f, first_shape, first_dtype),
            shape=(1, *first_shape),
            dtype=first_dtype,
        )
        for f in files
    ]
    log.info(
        "open_volume: %d TIFF planes of %s %s in %s", len(files), first_shape, first_dtype, path
    )
    return da.concatenate(planes, axis=0)


def _read_page(path: Path, index: int) -> np.ndarray:
    try:
        return tifffile.imread(path, key=index)[None]
    except Exception as e:
        raise InputError(f"Page {index} of TIFF file {path} cannot be read: {e}.") from e


def _open_tiff_file(path: Path) -> da.Array:
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            n_pages = len(series.pages)
    except Exception as e:
        raise InputError(f"TIFF file {path} cannot be read: {e}.") from e
    squeezed = tuple(n for n in shape if n != 1) if len(shape) > 3 else shape
    if len(squeezed) == 2:
        squeezed = (1, *squeezed)
    if len(squeezed) != 3:
        raise InputError(
            f"TIFF file {path} holds an image of shape {shape}; expected a (z, y, x) stack."
        )
    try:
        mm = tifffile.memmap(path, mode="r")
        arr = da.from_array(mm.reshape(squeezed), chunks=(1, *squeezed[1:]))
        log.info("open_volume: memory-mapped TIFF %s %s %s", path, squeezed, dtype)
        return arr
    except (ValueError, TypeError, OSError):
        pass  # compressed or not contiguous: read page by page
    if n_pages != squeezed[0]:
        raise InputError(
            f"TIFF file {path} stores its {squeezed[0]} planes in {n_pages} pages; "
            "only one plane per page can be read lazily."
        )
    planes = [
        da.from_delayed(
            dask.delayed(_read_page)(path, i), shape=(1, *squeezed[1:]), dtype=dtype
        )
        for i in range(squeezed[0])
    ]
    log.info("open_volume: multipage TIFF %s %s %s (page by page)", path, squeezed, dtype)
    return da.concatenate(planes, axis=0)


def _zarr_image(path: Path):
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        raise InputError(f"Zarr folder {path} cannot be opened: {e}.") from e
    if isinstance(node, zarr.Array):
        return node, None
    multiscales = node.attrs.get("multiscales")
    if multiscales:
        ds_path = multiscales[0]["datasets"][0]["path"]
    else:
        names = sorted(node.array_keys())
        if not names:
            raise InputError(f"Zarr group {path} has no multiscales metadata and no array.")
        ds_path = names[0]
    try:
        return node[ds_path], multiscales[0] if multiscales else None
    except KeyError as e:
        raise InputError(f"Zarr group {path} names dataset {ds_path!r} which is missing.") from e


def _open_zarr(path: Path, chunks) -> da.Array:
    arr, _ = _zarr_image(path)
    if arr.ndim > 3:
        if any(n != 1 for n in arr.shape[:-3]):
            raise InputError(
                f"Zarr image {path} has shape {arr.shape}; expected (z, y, x) "
                "(leading channel/time axes must have length 1)."
            )
    elif arr.ndim != 3:
        raise InputError(f"Zarr image {path} has shape {arr.shape}; expected (z, y, x).")
    out = da.from_zarr(arr, chunks=chunks) if chunks else da.from_zarr(arr)
    while out.ndim > 3:
        out = out[0]
    return out


def _as_volume(arr: da.Array, path: Path) -> da.Array:
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{path} holds an array of shape {arr.shape}; expected (z, y, x).")
    if 0 in arr.shape:
        raise InputError(f"{path} holds an empty volume of shape {arr.shape}.")
    return arr


def open_volume(path, *, chunks: tuple[int, int, int] | None = None) -> da.Array:
    """Open an image volume lazily as a Dask array (z, y, x).

    Parameters
    ----------
    path : path-like
        A folder of 2D TIFF planes (z order = natural sort of the names), a
        multipage TIFF, an OME-Zarr (NGFF 0.4: ``multiscales[0]``, dataset 0)
        or plain Zarr folder, or a ``.npy`` file.
    chunks : tuple of int, optional
        Chunk shape (z, y, x) of the returned array; by default one plane per
        chunk for TIFF, the stored chunks for Zarr, and the whole array for
        ``.npy``.

    Returns
    -------
    dask.array.Array
        Shape (z, y, x), the stored dtype. A single 2D image becomes (1, y, x).

    Raises
    ------
    InputNotFoundError
        If ``path`` does not exist.
    InputError
        If the format is not supported, a plane is missing or unreadable, or
        planes differ in shape or dtype (naming the file).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "v.npy"), np.zeros((2, 3, 4), np.uint16))
    >>> open_volume(os.path.join(d, "v.npy")).shape
    (2, 3, 4)
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"Volume {path} does not exist.")
    if path.is_dir():
        arr = _open_zarr(path, chunks) if _is_zarr(path) else _open_tiff_folder(path)
    elif path.suffix.lower() in _TIFF_SUFFIXES:
        arr = _open_tiff_file(path)
    elif path.suffix.lower() == ".npy":
        try:
            mm = np.load(path, mmap_mode="r")
        except Exception as e:
            raise InputError(f"NumPy file {path} cannot be read: {e}.") from e
        arr = da.from_array(mm, chunks=mm.shape)
    else:
        raise InputError(f"Volume {path} has an unsupported format; use {SUPPORTED_FORMATS}.")
    arr = _as_volume(arr, path)
    if chunks is not None:
        arr = arr.rechunk(tuple(chunks))
    return arr


def _compressor(spec):
    from numcodecs import Blosc
    from numcodecs.abc import Codec

    if spec is None or isinstance(spec, Codec):
        return spec
    if spec == "blosc-zstd":
        return Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
    raise ParameterError(
        f'compressor must be "blosc-zstd", None or a numcodecs codec, got {spec!r}.'
    )


def write_ome_zarr(
    array,
    path,
    *,
    voxel_size_um: tuple[float, float, float],
    chunks: tuple[int, int, int] = (64, 128, 128),
    compressor="blosc-zstd",
) -> Path:
    """Write a (z, y, x) volume as a single-level OME-Zarr image (NGFF 0.4), atomically.

    Parameters
    ----------
    array : numpy.ndarray or dask.array.Array, shape (z, y, x)
        The volume. A Dask array is written chunk by chunk, never whole.
    path : path-like
        Destination folder (e.g. ``signal.ome.zarr``); replaced only once the
        new image is complete.
    voxel_size_um : tuple of float
        Voxel size (z, y, x) in µm, stored as the ``scale`` transformation.
    chunks : tuple of int
        Zarr chunk shape (clipped to the array shape).
    compressor : "blosc-zstd", None or numcodecs codec
        Compression; the default is Blosc with zstd level 5 and bit shuffle.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ParameterError
        If ``voxel_size_um`` or ``compressor`` is invalid.
    InputError
        If ``array`` is not 3D.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "v.ome.zarr")
    >>> _ = write_ome_zarr(np.ones((2, 3, 4), np.uint8), p, voxel_size_um=(5, 2, 2))
    >>> read_voxel_size_um(p)
    (5.0, 2.0, 2.0)
    """
    vs = check_voxel_size(voxel_size_um)
    codec = _compressor(compressor)
    arr = array if isinstance(array, da.Array) else np.asarray(array)
    if arr.ndim != 3:
        raise InputError(f"Cannot write a volume of shape {tuple(arr.shape)}; expected (z, y, x).")
    zchunks = tuple(max(1, min(int(c), n)) for c, n in zip(chunks, arr.shape))
    path = Path(path)
    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        z = root.create_dataset(
            "0",
            shape=arr.shape,
            chunks=zchunks,
            dtype=arr.dtype,
            compressor=codec,
            dimension_separator="/",
            overwrite=True,
        )
        if isinstance(arr, da.Array):
            da.store(arr.rechunk(zchunks), z, lock=False)
        else:
            z[...] = arr
        root.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": path.name,
                "axes": [
                    {"name": ax, "type": "space", "unit": "micrometer"} for ax in ("z", "y", "x")
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": list(vs)}],
                    }
                ],
            }
        ]
    log.info("write_ome_zarr: %s %s %s, voxel %s µm", path, arr.shape, arr.dtype, vs)
    return path


def read_voxel_size_um(path) -> tuple[float, float, float] | None:
    """Return the voxel size (z, y, x) in µm stored in OME-Zarr metadata, else None.

    Parameters
    ----------
    path : path-like
        Any volume accepted by :func:`open_volume`.

    Returns
    -------
    tuple of float or None
        From ``multiscales[0]``: the ``scale`` of dataset 0 times any
        multiscale-level ``scale``, converted to µm from the axes' units; None
        for formats without such metadata.

    Raises
    ------
    InputNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"Volume {path} does not exist.")
    attrs_file = path / ".zattrs"
    if not (path.is_dir() and attrs_file.exists()):
        return None
    try:
        ms = json.loads(attrs_file.read_text())["multiscales"][0]
        scale = np.ones(len(ms["axes"]))
        for level in (ms["datasets"][0], ms):
            for t in level.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = scale * np.asarray(t["scale"], dtype=float)
        factors = [_UNIT_TO_UM.get(a.get("unit", "micrometer"), 1.0) for a in ms["axes"]]
    except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError, OSError):
        return None
    spatial = scale[-3:] * np.asarray(factors[-3:])
    return tuple(float(v) for v in spatial)

