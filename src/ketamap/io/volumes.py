"""Open image volumes lazily as Dask arrays (z, y, x) and write OME-Zarr.

Supported inputs: a folder of 2D TIFF planes (one file per z plane, z order =
natural sort of the file names), a multipage TIFF or BigTIFF, an OME-Zarr image
(NGFF 0.4, highest resolution by default) or a plain Zarr array, an Imaris
``.ims`` file, a NIfTI ``.nii``/``.nii.gz`` file and a ``.npy`` file. Nothing
is read until the array is computed, except file headers to check shapes.
OME-Zarr is written as a multiscale pyramid, level by level, chunk by chunk.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import tifffile
import zarr

from ketamap.errors import InputError, InputNotFoundError, ParameterError
from ketamap.io.atomic import atomic_dir
from ketamap.io.formats import is_nifti, open_imaris, open_nifti
from ketamap.space import check_voxel_size

__all__ = [
    "lazy_array",
    "open_volume",
    "write_ome_zarr",
    "pyramid_factors",
    "read_voxel_size_um",
    "SUPPORTED_FORMATS",
]

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = (
    "a folder of 2D TIFF planes, a multipage TIFF (.tif/.tiff), "
    "an OME-Zarr or Zarr folder, an Imaris .ims file, a NIfTI .nii/.nii.gz file, or a .npy file"
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
        arr = lazy_array(mm.reshape(squeezed), chunks=(1, *squeezed[1:]))
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
        da.from_delayed(dask.delayed(_read_page)(path, i), shape=(1, *squeezed[1:]), dtype=dtype)
        for i in range(squeezed[0])
    ]
    log.info("open_volume: multipage TIFF %s %s %s (page by page)", path, squeezed, dtype)
    return da.concatenate(planes, axis=0)


def _zarr_image(path: Path, level: int = 0):
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        raise InputError(f"Zarr folder {path} cannot be opened: {e}.") from e
    if isinstance(node, zarr.Array):
        return node, None
    multiscales = node.attrs.get("multiscales")
    if multiscales:
        datasets = multiscales[0]["datasets"]
        if not 0 <= level < len(datasets):
            raise ParameterError(
                f"OME-Zarr image {path} has {len(datasets)} resolution level(s); "
                f"level {level} does not exist."
            )
        ds_path = datasets[level]["path"]
    else:
        names = sorted(node.array_keys())
        if not names:
            raise InputError(f"Zarr group {path} has no multiscales metadata and no array.")
        ds_path = names[0]
    try:
        return node[ds_path], multiscales[0] if multiscales else None
    except KeyError as e:
        raise InputError(f"Zarr group {path} names dataset {ds_path!r} which is missing.") from e


def _open_zarr(path: Path, chunks, level: int = 0) -> da.Array:
    arr, _ = _zarr_image(path, level)
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


class _Sliced:
    """An array that Dask reads chunk by chunk: its shape, dtype and slicing, no ``copy``.

    Dask (since 2024.12) copies NumPy arrays in ``da.from_array``, memory maps included:
    a memory-mapped volume would be read whole into memory when it is opened, and an
    in-memory one held twice.
    """

    def __init__(self, array: np.ndarray):
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.ndim = array.ndim

    def __getitem__(self, key):
        return self._array[key]


def lazy_array(array: np.ndarray, chunks="auto") -> da.Array:
    """Return a Dask array over a NumPy array or memory map without copying it.

    Parameters
    ----------
    array : numpy.ndarray or numpy.memmap
        Read one chunk at a time (a memory map stays on disk until a chunk is computed).
    chunks : tuple or "auto"
        Dask chunks.

    Returns
    -------
    dask.array.Array
    """
    return da.from_array(
        _Sliced(array),
        chunks=chunks,
        asarray=True,
        lock=False,
        meta=np.empty((0,) * array.ndim, array.dtype),
        name=False,  # no hashing of the data
    )


def check_volume(array, name: str):
    """Return ``array`` as a 3D numeric NumPy or Dask array, or raise one sentence.

    Parameters
    ----------
    array : array_like or dask.array.Array
    name : str
        What the array is, for the message (e.g. ``"signal"``).

    Raises
    ------
    InputError
        If the array is not 3D (z, y, x) or does not hold integers or floats.
    """
    arr = array if isinstance(array, da.Array) else np.asarray(array)
    if arr.ndim != 3:
        raise InputError(
            f"{name} must be a 3D array (z, y, x), got {arr.ndim} dimensions with shape "
            f"{tuple(arr.shape)}; add a leading axis for a single plane."
        )
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} must hold integers or floats, got dtype {arr.dtype}.")
    return arr


def _as_volume(arr: da.Array, path: Path) -> da.Array:
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{path} holds an array of shape {arr.shape}; expected (z, y, x).")
    if 0 in arr.shape:
        raise InputError(f"{path} holds an empty volume of shape {arr.shape}.")
    return arr


def open_volume(
    path, *, chunks: tuple[int, int, int] | None = None, channel: int = 0, level: int = 0
) -> da.Array:
    """Open an image volume lazily as a Dask array (z, y, x).

    Parameters
    ----------
    path : path-like
        A folder of 2D TIFF planes (z order = natural sort of the names), a
        multipage TIFF, an OME-Zarr (NGFF 0.4: ``multiscales[0]``, dataset
        ``level``) or plain Zarr folder, an Imaris ``.ims`` file, a NIfTI
        ``.nii``/``.nii.gz`` file, or a ``.npy`` file.
    chunks : tuple of int, optional
        Chunk shape (z, y, x) of the returned array; by default one plane per
        chunk for TIFF, the stored chunks for Zarr, slabs of about 64 MB for
        Imaris and NIfTI, and the whole array for ``.npy``.
    channel : int
        Channel of an Imaris file (ignored for other formats).
    level : int
        Resolution level of a multiscale OME-Zarr image (0 = full resolution).

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
        arr = _open_zarr(path, chunks, level) if _is_zarr(path) else _open_tiff_folder(path)
    elif path.suffix.lower() in _TIFF_SUFFIXES:
        arr = _open_tiff_file(path)
    elif path.suffix.lower() == ".ims":
        arr, _ = open_imaris(path, channel=channel, chunks=chunks)
    elif is_nifti(path):
        arr, _ = open_nifti(path, chunks=chunks)
    elif path.suffix.lower() == ".npy":
        try:
            mm = np.load(path, mmap_mode="r")
        except Exception as e:
            raise InputError(f"NumPy file {path} cannot be read: {e}.") from e
        arr = lazy_array(mm, chunks=(1, *mm.shape[1:]) if mm.ndim == 3 else mm.shape)
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


def pyramid_factors(
    shape: tuple[int, int, int],
    voxel_size_um: tuple[float, float, float],
    *,
    levels: int | None = None,
    chunks: tuple[int, int, int] = (64, 128, 128),
) -> list[tuple[int, int, int]]:
    """Downsampling factors (z, y, x) of each level after the first of a pyramid.

    Every level halves y and x; z is halved too while the voxel is near
    isotropic (z voxel at most 1.5 times the y voxel at that level), so
    anisotropic light-sheet stacks move towards isotropic voxels.

    Parameters
    ----------
    shape : tuple of int
        Shape (z, y, x) of level 0.
    voxel_size_um : tuple of float
        Voxel size (z, y, x) of level 0 in µm.
    levels : int, optional
        Number of levels including level 0; by default, as many as needed for
        the smallest level to fit in one chunk.
    chunks : tuple of int
        Chunk shape (z, y, x) used to decide when to stop (``levels=None``).

    Returns
    -------
    list of tuple of int
        One (fz, fy, fx) per level after level 0, each relative to the level before.

    Examples
    --------
    >>> pyramid_factors((100, 1000, 1000), (5.0, 2.0, 2.0), chunks=(64, 256, 256))
    [(1, 2, 2), (2, 2, 2)]
    """
    if levels is not None and (not isinstance(levels, int) or levels < 1):
        raise ParameterError(f"levels must be a whole number of at least 1, got {levels!r}.")
    shape = list(int(n) for n in shape)
    vs = list(float(v) for v in voxel_size_um)
    out: list[tuple[int, int, int]] = []
    while True:
        if levels is not None and len(out) + 1 >= levels:
            break
        if levels is None and all(n <= c for n, c in zip(shape, chunks, strict=False)):
            break
        if shape[1] == 1 and shape[2] == 1 and shape[0] == 1:
            break
        fz = 2 if shape[0] > 1 and vs[0] <= 1.5 * vs[1] else 1
        f = (fz, 2 if shape[1] > 1 else 1, 2 if shape[2] > 1 else 1)
        out.append(f)
        shape = [math.ceil(n / k) for n, k in zip(shape, f, strict=False)]
        vs = [v * k for v, k in zip(vs, f, strict=False)]
    return out


def _downsample(arr: da.Array, factors: tuple[int, int, int]) -> da.Array:
    """Mean over blocks of ``factors`` voxels (the edge replicated), cast back to the dtype."""
    pad = [(0, (-n) % f) for n, f in zip(arr.shape, factors, strict=False)]
    if any(p[1] for p in pad):
        arr = da.pad(arr, pad, mode="edge")
    chunks = []
    for c, f in zip(arr.chunks, factors, strict=False):
        size = max(c)
        chunks.append(max(f, size + (-size) % f))
    arr = arr.rechunk(tuple(chunks))
    mean = da.coarsen(np.mean, arr.astype(np.float32), dict(enumerate(factors)))
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        mean = da.clip(da.round(mean), info.min, info.max)
    return mean.astype(arr.dtype)


def write_ome_zarr(
    array,
    path,
    *,
    voxel_size_um: tuple[float, float, float],
    chunks: tuple[int, int, int] = (64, 128, 128),
    compressor="blosc-zstd",
    levels: int | None = 1,
    translation_um: tuple[float, float, float] | None = None,
) -> Path:
    """Write a (z, y, x) volume as a multiscale OME-Zarr image (NGFF 0.4), atomically.

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
    levels : int or None
        Number of resolution levels (1 = full resolution only). None adds
        levels until the smallest fits in one chunk. Each level is the mean of
        2×2 (y, x) or 2×2×2 voxel blocks of the level before (see
        :func:`pyramid_factors`), computed chunk-wise from the level already
        written, so memory stays bounded by a few chunks per worker.
    translation_um : tuple of float, optional
        Position (z, y, x) in µm of the centre of the first voxel, stored as a
        ``translation`` after the ``scale`` of every level (e.g. half a block
        minus half a voxel for a coarse grid of blocks of a finer image, so
        that the two overlay). None: the first voxel's centre is at 0.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ParameterError
        If ``voxel_size_um``, ``compressor`` or ``levels`` is invalid.
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
    origin = np.zeros(3)
    if translation_um is not None:
        try:
            origin = np.asarray(translation_um, dtype=float).reshape(3)
        except (TypeError, ValueError):
            origin = np.full(3, np.nan)
        if not np.isfinite(origin).all():
            raise ParameterError(
                f"translation_um must be three finite numbers (z, y, x) in µm, got "
                f"{translation_um!r}."
            )
    factors = pyramid_factors(arr.shape, vs, levels=levels, chunks=chunks)
    path = Path(path)
    datasets = []
    with atomic_dir(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        level_arr, total = arr, np.ones(3)
        for k in range(len(factors) + 1):
            if k:
                level_arr = _downsample(da.from_zarr(root[str(k - 1)]), factors[k - 1])
                total = total * np.asarray(factors[k - 1])
            zchunks = tuple(
                max(1, min(int(c), n)) for c, n in zip(chunks, level_arr.shape, strict=False)
            )
            z = root.create_dataset(
                str(k),
                shape=level_arr.shape,
                chunks=zchunks,
                dtype=level_arr.dtype,
                compressor=codec,
                dimension_separator="/",
                overwrite=True,
            )
            if isinstance(level_arr, da.Array):
                da.store(level_arr.rechunk(zchunks), z, lock=False)
            else:
                z[...] = level_arr
            transforms = [
                {"type": "scale", "scale": [float(v * f) for v, f in zip(vs, total, strict=False)]}
            ]
            shift = [float(o + (f - 1) / 2 * v) for o, v, f in zip(origin, vs, total, strict=False)]
            if k or translation_um is not None:
                transforms.append({"type": "translation", "translation": shift})
            datasets.append({"path": str(k), "coordinateTransformations": transforms})
            log.info("write_ome_zarr: level %d %s", k, level_arr.shape)
        root.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": path.name,
                "axes": [
                    {"name": ax, "type": "space", "unit": "micrometer"} for ax in ("z", "y", "x")
                ],
                "datasets": datasets,
                "type": "mean",
                "metadata": {"method": "mean of 2x2(x2) voxel blocks", "package": "ketamap"},
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
        multiscale-level ``scale``, converted to µm from the axes' units; from
        the header of an Imaris or NIfTI file; None for formats without such
        metadata.

    Raises
    ------
    InputNotFoundError
        If ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"Volume {path} does not exist.")
    if path.is_file() and path.suffix.lower() == ".ims":
        return open_imaris(path)[1]
    if path.is_file() and is_nifti(path):
        return open_nifti(path)[1]
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
