"""Small builders of napari layer data: ``(data, kwargs, layer_type)`` tuples, no napari needed.

Every layer of the plugin is placed in one world space, in µm: a volume's voxel
``p`` lies at ``p * voxel_size_um`` (its centre), which is also where OME-Zarr's
``scale`` puts it. Points keep their voxel coordinates as data and carry the
voxel size as their ``scale``, so that what napari saves back is in voxels again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

VOX = ["z_vox", "y_vox", "x_vox"]

#: Colours shared with the report's figures: a cell, a non-cell, a candidate not yet labelled.
CELL_RGBA = (0.333, 0.659, 0.408, 1.0)  # #55a868
NOT_CELL_RGBA = (0.769, 0.306, 0.322, 1.0)  # #c44e52
CANDIDATE_RGBA = (0.949, 0.757, 0.306, 1.0)  # #f2c14e
LABEL_RGBA = {"cell": CELL_RGBA, "not_cell": NOT_CELL_RGBA, None: CANDIDATE_RGBA}


def hex_rgba(colour: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """Return ``"#RRGGBB"`` (or ``"RRGGBB"``) as an RGBA tuple of floats.

    Examples
    --------
    >>> hex_rgba("#ff0000")
    (1.0, 0.0, 0.0, 1.0)
    """
    text = colour.lstrip("#")
    return tuple(int(text[i : i + 2], 16) / 255 for i in (0, 2, 4)) + (float(alpha),)


def label_colours(labels) -> np.ndarray:
    """Return one RGBA row per point: green for a cell, red for a non-cell, else yellow."""
    values = list(labels)
    if not values:
        return np.zeros((0, 4))
    return np.array(
        [LABEL_RGBA.get(v if isinstance(v, str) else None, CANDIDATE_RGBA) for v in values],
        dtype=float,
    )


def ome_zarr_levels(path: Path) -> list[dict]:
    """Return the datasets of an OME-Zarr image: ``path``, ``scale``, ``translation`` (µm).

    Returns an empty list for anything that is not an OME-Zarr folder with
    ``multiscales`` metadata.
    """
    attrs = Path(path) / ".zattrs"
    if not attrs.is_file():
        return []
    try:
        ms = json.loads(attrs.read_text())["multiscales"][0]
        out = []
        for ds in ms["datasets"]:
            scale, shift = np.ones(3), np.zeros(3)
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = np.asarray(t["scale"], dtype=float)[-3:]
                elif t.get("type") == "translation":
                    shift = np.asarray(t["translation"], dtype=float)[-3:]
            out.append({"path": str(ds["path"]), "scale": scale, "translation": shift})
        return out
    except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError, OSError):
        return []


def contrast_limits(array) -> tuple[float, float]:
    """Return a display range: the 0.5th to 99.9th percentile of a small array (or its middle).

    Reads one plane of a large array (the middle z plane), never the whole volume.
    """
    a = array
    if int(np.prod(a.shape)) > 2**24:
        a = a[a.shape[0] // 2]
    values = np.asarray(a).astype(np.float32, copy=False).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    step = max(1, values.size // 1_000_000)
    lo, hi = np.percentile(values[::step], [0.5, 99.9])
    if not hi > lo:
        lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def image_layer(
    path: Path,
    voxel_size_um,
    *,
    name: str,
    colormap: str = "gray",
    visible: bool = True,
    blending: str = "additive",
) -> tuple:
    """Return a volume as a lazy image layer: every level of an OME-Zarr pyramid, or one array.

    Parameters
    ----------
    path : Path
        Any volume :func:`ketamap.io.volumes.open_volume` reads.
    voxel_size_um : 3 floats
        Voxel size (z, y, x) of the full-resolution level.
    name, colormap, visible, blending
        Layer settings.

    Returns
    -------
    tuple
        ``(data, kwargs, "image")``: a list of Dask arrays with ``multiscale=True``
        for a pyramid, else one Dask array. Nothing is read but the coarsest level
        (or one plane) for the display range.
    """
    from ketamap.io.volumes import open_volume

    levels = ome_zarr_levels(path)
    if len(levels) > 1:
        data = [open_volume(path, level=k) for k in range(len(levels))]
        shapes = [d.shape for d in data]
        if all(all(a >= b for a, b in zip(s, t)) for s, t in zip(shapes, shapes[1:])):
            limits = contrast_limits(data[-1])
            kwargs = {"multiscale": True}
        else:  # not a pyramid napari can use: the full resolution only
            data, kwargs = data[0], {"multiscale": False}
            limits = contrast_limits(data)
    else:
        data = open_volume(path)
        kwargs = {"multiscale": False}
        limits = contrast_limits(data)
    kwargs |= {
        "name": name,
        "scale": tuple(float(v) for v in voxel_size_um),
        "colormap": colormap,
        "contrast_limits": limits,
        "blending": blending,
        "visible": visible,
        "metadata": {"ketamap": {"kind": "volume", "path": str(path)}},
    }
    return data, kwargs, "image"


def point_size(voxel_size_um, soma_um: float = 15.0) -> float:
    """Return a point size in voxels: twice a soma, at least 3 voxels (a coarse brain shows it)."""
    return float(max(3.0, 2.0 * soma_um / float(np.min(voxel_size_um))))


def points_layer(
    table: pd.DataFrame,
    *,
    name: str,
    voxel_size_um=None,
    colours=None,
    features: pd.DataFrame | None = None,
    metadata: dict | None = None,
    visible: bool = True,
    size: float | None = None,
) -> tuple:
    """Return cells as a points layer: voxel coordinates as data, the voxel size as scale.

    Parameters
    ----------
    table : DataFrame
        ``z_vox, y_vox, x_vox``.
    name : str
        Layer name.
    voxel_size_um : 3 floats, optional
        Voxel size; None leaves the world in voxels.
    colours : (n, 4) array, optional
        Ring colour of each point (default: the candidate yellow).
    features : DataFrame, optional
        One row per point, shown when hovering and kept by napari.
    metadata : dict, optional
        Stored under ``metadata["ketamap"]``.
    visible : bool
    size : float, optional
        Point size in voxels (default :func:`point_size`).

    Returns
    -------
    tuple
        ``(data, kwargs, "points")``.
    """
    data = table[VOX].to_numpy(dtype=np.float64).reshape(-1, 3)
    vs = (1.0, 1.0, 1.0) if voxel_size_um is None else tuple(float(v) for v in voxel_size_um)
    if colours is None:
        colours = np.tile(CANDIDATE_RGBA, (len(data), 1))
    kwargs = {
        "name": name,
        "scale": vs,
        "size": point_size(vs) if size is None else float(size),
        "symbol": "ring",
        "face_color": np.asarray(colours, dtype=float),
        "border_width": 0.0,
        "visible": visible,
        "metadata": {"ketamap": dict(metadata or {}) | {"voxel_size_um": list(vs)}},
    }
    if features is not None:
        kwargs["features"] = features.reset_index(drop=True)
    return data, kwargs, "points"


def png_layer(path: Path, *, name: str) -> tuple | None:
    """Return a PNG (a QC figure) as a hidden RGB image layer, or None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        log.warning("QC image %s cannot be read (%s); it is not shown", path, e)
        return None
    return rgb, {"name": name, "rgb": True, "visible": False}, "image"
