"""napari readers for ketamap's outputs: a census subject, a cells file, spines, ensembles.

Each reader returns napari *layer data*: a list of ``(data, kwargs, layer_type)``
tuples, built without napari itself (so they are tested, and usable, without a
viewer). :func:`get_reader` is the plugin's reader hook: it returns a reader for
a path it recognises and None for any other (napari's convention), so napari
can offer the path to other plugins; a path it recognises but cannot read
raises one :class:`~ketamap.errors.KetamapError` sentence. :func:`read` does
the same outside napari and raises for a path that is not a ketamap output.

What is recognised:

* a **census subject** folder of a study, ``<study>/subjects/<id>/`` (or one of
  its stage folders ``detect/``, ``register/``, ``quantify/``):
  :func:`read_subject`;
* a **cells file**: ``.parquet`` or ``.csv`` with ``z_vox, y_vox, x_vox``
  columns, a cellfinder / CellCounter ``.xml``, or a proofreading labels file:
  :func:`read_cells_file`;
* a **spines** output folder (``ketamap spines``) and an **ensembles** output
  folder (``ketamap ensembles``): :func:`ketamap.napari.invivo.read_spines` and
  :func:`ketamap.napari.invivo.read_ensembles`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, KetamapError
from ketamap.napari._layers import (
    VOX,
    hex_rgba,
    image_layer,
    label_colours,
    ome_zarr_levels,
    png_layer,
    points_layer,
)

__all__ = [
    "get_reader",
    "read",
    "read_subject",
    "read_cells_file",
    "find_subject",
    "default_labels_path",
    "CELL_FEATURES",
]

log = logging.getLogger(__name__)

#: Feature columns a cells layer carries when the table has them (hover shows them).
CELL_FEATURES = (
    "snr",
    "contrast",
    "intensity",
    "cell_probability",
    "p_cell",
    "score",
    "acronym",
    "region_id",
    "hemisphere",
)

STAGES = ("detect", "register", "quantify")
CELL_SUFFIXES = (".parquet", ".csv", ".xml")
#: At most this many voxels in the atlas labels shown over a subject (the atlas is
#: warped at a coarser grid beyond it: an overlay, not a measurement).
ATLAS_MAX_VOXELS = 2**23

LayerData = tuple


# --------------------------------------------------------------------------- dispatch


def _one_path(path) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return Path(os.fspath(path))
    except TypeError:
        return None


def _kind(path: Path) -> str | None:
    """Tell what ketamap output ``path`` is: subject, spines, ensembles, cells, or None."""
    if path.is_dir():
        if subject_folder(path) is not None:
            return "subject"
        from ketamap.napari.invivo import is_ensembles_output, is_spines_output

        if is_spines_output(path):
            return "spines"
        if is_ensembles_output(path):
            return "ensembles"
        return None
    if path.is_file() and path.suffix.lower() in CELL_SUFFIXES and _is_cells_file(path):
        return "cells"
    return None


def get_reader(path) -> Callable[[str], list[LayerData]] | None:
    """Return a reader for a ketamap output, None for any other path (the reader hook).

    Parameters
    ----------
    path : str or list of str
        What napari was asked to open (one path).

    Returns
    -------
    callable or None
        ``reader(path) -> list of layer data``.
    """
    p = _one_path(path)
    if p is None:
        return None
    try:
        kind = _kind(p)
    except OSError:
        return None
    return None if kind is None else read


def read(path) -> list[LayerData]:
    """Read a ketamap output as napari layer data.

    Parameters
    ----------
    path : path-like or list of one
        A census subject folder, a cells file, a spines or an ensembles output folder.

    Returns
    -------
    list of tuple
        ``(data, kwargs, layer_type)`` per layer.

    Raises
    ------
    InputNotFoundError
        If the path does not exist.
    InputError
        If it is not a ketamap output, or it is one that cannot be read.
    """
    from ketamap.errors import InputNotFoundError

    p = _one_path(path)
    if p is None:
        raise InputError("Open one ketamap output at a time.")
    if not p.exists():
        raise InputNotFoundError(f"{p} does not exist.")
    kind = _kind(p)
    if kind == "subject":
        return read_subject(p)
    if kind == "cells":
        return read_cells_file(p)
    if kind in ("spines", "ensembles"):
        from ketamap.napari import invivo

        return invivo.read_spines(p) if kind == "spines" else invivo.read_ensembles(p)
    raise InputError(
        f"{p} is not a ketamap output: open a census subject folder (<study>/subjects/<id>), "
        "a cells file (.parquet, .csv or .xml with z_vox, y_vox, x_vox), or a spines or "
        "ensembles output folder."
    )


# --------------------------------------------------------------------------- cells files


def _columns(path: Path) -> list[str] | None:
    """Return a CSV or Parquet file's columns without reading its rows (None if unreadable)."""
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None


def _is_cellcounter(path: Path) -> bool:
    import xml.etree.ElementTree as ET

    try:
        for _, elem in ET.iterparse(path, events=("start",)):
            return elem.tag == "CellCounter_Marker_File"
    except (ET.ParseError, OSError):
        return False
    return False


_KETAMAP_TABLES = ("cells", "cells_atlas", "labels", "candidates")


def _is_cells_file(path: Path) -> bool:
    """Tell a cells file: ketamap's names, a table with a voxel column, CellCounter XML."""
    if path.suffix.lower() == ".xml":
        return _is_cellcounter(path)
    columns = _columns(path)
    if columns is None:
        return path.stem in _KETAMAP_TABLES
    named = path.stem in _KETAMAP_TABLES
    return named or bool({"z_vox", "y_vox", "x_vox"} & set(columns))


def _voxel_size_from_table(table: pd.DataFrame):
    """Voxel size (z, y, x) from a table that has both ``*_vox`` and ``*_um`` columns, else None."""
    if not {"z_um", "y_um", "x_um"} <= set(table.columns) or len(table) == 0:
        return None
    out = []
    for axis in "zyx":
        vox = table[f"{axis}_vox"].to_numpy(float)
        um = table[f"{axis}_um"].to_numpy(float)
        ok = np.abs(vox) > 0.5
        if not ok.any():
            return None
        ratio = float(np.median(um[ok] / vox[ok]))
        if not (math.isfinite(ratio) and ratio > 0):
            return None
        out.append(ratio)
    return tuple(out)


def cell_features(table: pd.DataFrame) -> pd.DataFrame:
    """Return the feature columns of a cells table shown in napari (:data:`CELL_FEATURES`).

    ``hemisphere`` codes (1 left, 2 right) become words.
    """
    cols = [c for c in CELL_FEATURES if c in table.columns]
    feats = table[cols].reset_index(drop=True).copy()
    if "acronym" in feats:
        feats = feats.rename(columns={"acronym": "region"})
        feats["region"] = feats["region"].fillna("").astype(str)
    if "hemisphere" in feats:
        feats["hemisphere"] = (
            feats["hemisphere"].map({1: "left", 2: "right"}).fillna("").astype(str)
        )
    return feats


def read_cells_file(path, *, voxel_size_um=None) -> list[LayerData]:
    """Read a cells file as one points layer.

    Parameters
    ----------
    path : path-like
        Parquet or CSV with ``z_vox, y_vox, x_vox`` (other columns become
        features), cellfinder XML (``cell_type`` 2 cell, 1 non-cell, coloured),
        or a labels file (``label``: cell / not_cell, coloured).
    voxel_size_um : 3 floats, optional
        The voxel size, for a world in µm; by default read from ``z_um`` / ``z_vox``
        when the table has both, else the world is in voxels.

    Returns
    -------
    list of tuple
        One ``(data, kwargs, "points")``.

    Raises
    ------
    InputError
        If the file lacks a coordinate column (one sentence naming them).
    """
    from ketamap.io.points import read_points

    path = Path(path)
    table = read_points(path)
    vs = voxel_size_um or _voxel_size_from_table(table)
    feats = cell_features(table)
    colours = None
    if "label" in table.columns:
        from ketamap.io.labels import read_labels

        labels = read_labels(path)
        feats["label"] = labels["label"].to_numpy(dtype=object)
        colours = label_colours(feats["label"])
    elif "cell_type" in table.columns:
        types = table["cell_type"].to_numpy()
        feats["cell_type"] = types
        colours = label_colours(np.where(types == 2, "cell", "not_cell"))
    return [
        points_layer(
            table,
            name=path.stem if path.stem not in ("cells", "labels") else path.name,
            voxel_size_um=vs,
            colours=colours,
            features=feats,
            metadata={"kind": "cells", "cells_file": str(path)},
        )
    ]


# --------------------------------------------------------------------------- subject


def subject_folder(path: Path) -> Path | None:
    """Return the census subject folder ``path`` is (or is a stage folder of), else None."""
    path = Path(path)
    candidates = [path]
    if path.name in STAGES:
        candidates.append(path.parent)
    for folder in candidates:
        marks = (
            folder / "detect" / "cells.parquet",
            folder / "register" / "registration.json",
            folder / "quantify" / "cells_atlas.parquet",
        )
        if any(m.is_file() for m in marks):
            return folder
    return None


def find_subject(folder: Path):
    """Find the study and subject of a subject folder ``<study>/subjects/<id>``.

    Looks for the manifest (any ``*.toml`` in the study folder that is a study
    manifest naming this subject); ``(None, None)`` when there is none.
    """
    from ketamap.manifest import load_study

    folder = Path(folder)
    if folder.parent.name != "subjects":
        return None, None
    root = folder.parent.parent
    for toml in sorted(root.glob("*.toml")):
        try:
            study = load_study(toml, check_paths=False)
        except (KetamapError, OSError):
            continue
        for s in study.subjects:
            if s.id == folder.name:
                return study, s
    return None, None


def default_labels_path(folder: Path, study=None, subject=None) -> Path:
    """Where a subject's proofreading labels go by default.

    The path the manifest names for the subject (``proofread`` in its
    ``[[subjects]]`` entry) when it names one, else
    ``<study>/proofread/<id>/labels.csv`` (beside the study's outputs, not in a
    stage folder a re-run replaces); for a subject folder outside a study,
    ``<folder>/labels.csv``.
    """
    named = subject.proofread if subject is not None else None
    if named is not None:
        return Path(named)
    folder = Path(folder)
    if study is not None:
        return Path(study.root) / "proofread" / folder.name / "labels.csv"
    return folder / "labels.csv"


def _registration_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "register" / "registration.json").read_text())
    except (OSError, ValueError):
        return {}


def read_subject(path) -> list[LayerData]:
    """Read a census subject folder: signal, atlas regions, tissue mask, cells, QC images.

    Parameters
    ----------
    path : path-like
        ``<study>/subjects/<id>`` (or one of its stage folders).

    Returns
    -------
    list of tuple
        In drawing order: the signal (and the autofluorescence, hidden) as lazy
        images — every level of an OME-Zarr pyramid — when the study manifest is
        found; the atlas warped to the sample as labels whose hover shows the
        region's acronym, name and hemisphere (when the subject is registered and
        the atlas loads); the tissue mask (hidden); the QC images (hidden); and
        the cells as points with their SNR, contrast, intensity and region. The
        world is in µm.

    Raises
    ------
    InputError
        If the folder is not a census subject, or its cells table cannot be read.
    """
    path = Path(path)
    folder = subject_folder(path)
    if folder is None:
        raise InputError(
            f"{path} is not a census subject folder (no detect/cells.parquet, "
            "register/registration.json or quantify/cells_atlas.parquet in it)."
        )
    sid = folder.name
    study, subject = find_subject(folder)
    meta = _registration_meta(folder)
    vs = None
    if subject is not None:
        vs = tuple(float(v) for v in subject.voxel_size_um)
    elif meta.get("sample_voxel_size_um"):
        vs = tuple(float(v) for v in meta["sample_voxel_size_um"])
    cells_file = folder / "quantify" / "cells_atlas.parquet"
    if not cells_file.is_file():
        cells_file = folder / "detect" / "cells.parquet"
    cells = None
    if cells_file.is_file():
        from ketamap.io.points import read_points

        cells = read_points(cells_file)
        vs = vs or _voxel_size_from_table(cells)
    vs = vs or (1.0, 1.0, 1.0)

    layers: list[LayerData] = []
    if subject is not None:
        marker = study.marker or "signal"
        for channel, name, visible in (
            (subject.signal, f"{sid} {marker}", True),
            (subject.background, f"{sid} autofluorescence", False),
        ):
            if channel is None:
                continue
            if not Path(channel).exists():
                log.warning("%s: the image %s is gone; it is not shown", sid, channel)
                continue
            layers.append(image_layer(Path(channel), vs, name=name, visible=visible))
    else:
        log.warning("%s: no study manifest names this subject; its images are not shown", sid)

    if study is not None and (folder / "register" / "registration.json").is_file():
        atlas_layer = _atlas_layer(folder, study, vs, name=f"{sid} atlas regions")
        if atlas_layer is not None:
            layers.append(atlas_layer)
    mask = _tissue_layer(folder / "detect" / "tissue_mask.ome.zarr", name=f"{sid} tissue mask")
    if mask is not None:
        layers.append(mask)
    for png, title in (("qc.png", "registration QC"), ("qc_checkerboard.png", "checkerboard QC")):
        if (folder / "register" / png).is_file():
            layer = png_layer(folder / "register" / png, name=f"{sid} {title}")
            if layer is not None:
                layers.append(layer)
    if cells is not None:
        layers.append(
            points_layer(
                cells,
                name=f"{sid} cells",
                voxel_size_um=vs,
                features=cell_features(cells),
                metadata={
                    "kind": "candidates",
                    "subject": sid,
                    "subject_dir": str(folder),
                    "cells_file": str(cells_file),
                    "labels_path": str(default_labels_path(folder, study, subject)),
                },
            )
        )
    if not layers:
        raise InputError(f"Census subject {folder} holds nothing napari can show yet.")
    return layers


def _tissue_layer(path: Path, *, name: str) -> LayerData | None:
    """Return the coarse tissue mask as hidden labels, placed by its OME-Zarr transforms."""
    levels = ome_zarr_levels(path)
    if not levels:
        return None
    from ketamap.io.volumes import open_volume

    mask = (np.asarray(open_volume(path).compute()) > 0).astype(np.uint8)
    kwargs = {
        "name": name,
        "scale": tuple(levels[0]["scale"]),
        "translate": tuple(levels[0]["translation"]),
        "opacity": 0.3,
        "visible": False,
        "features": pd.DataFrame({"index": [1], "tissue": ["tissue"]}),
        "colormap": {None: "transparent", 0: "transparent", 1: "#4c9be8"},
    }
    return mask, kwargs, "labels"


def prepared_to_raw_affine(registration) -> np.ndarray:
    """Return the 4×4 affine from prepared-grid voxels to raw sample voxels.

    The prepared grid is the raw sample reoriented to the atlas orientation and
    resampled to the atlas resolution (see :mod:`ketamap.wholebrain.transforms`);
    the map between the two is linear, so it is read off four points.
    """
    from ketamap.wholebrain.transforms import raw_to_prepared_vox

    basis = np.vstack([np.zeros(3), np.eye(3)])
    prepared = raw_to_prepared_vox(
        basis,
        shape_vox=registration.sample_shape_vox,
        voxel_size_um=registration.sample_voxel_size_um,
        orientation=registration.sample_orientation,
        atlas_orientation=registration.atlas_orientation,
        atlas_resolution_um=registration.atlas_resolution_um,
    )
    forward = np.eye(4)
    forward[:3, :3] = (prepared[1:] - prepared[0]).T
    forward[:3, 3] = prepared[0]
    return np.linalg.inv(forward)


def _coarser(registration, atlas, max_voxels: int):
    """Return the registration and atlas arrays on a grid of at most ``max_voxels``."""
    n = int(np.prod(registration.prepared_shape_vox))
    f = max(1, math.ceil((n / max_voxels) ** (1 / 3))) if n > max_voxels else 1
    annotation = atlas.annotation[::f, ::f, ::f]
    hemispheres = np.asarray(atlas.hemispheres)[::f, ::f, ::f]
    if f > 1:
        registration = dataclasses.replace(
            registration,
            atlas_shape_vox=tuple(int(s) for s in annotation.shape),
            atlas_resolution_um=tuple(float(r) * f for r in registration.atlas_resolution_um),
        )
    return registration, annotation, hemispheres, f


def atlas_labels(registration, atlas, *, max_voxels: int = ATLAS_MAX_VOXELS):
    """Warp the atlas regions to the sample, as compact labels with their features.

    Parameters
    ----------
    registration : Registration
        A subject's registration (:func:`ketamap.wholebrain.register.load_registration`).
    atlas : Atlas
        The atlas it was registered to.
    max_voxels : int
        Largest number of voxels of the warped grid; a larger prepared grid is
        warped from the atlas decimated by an integer factor.

    Returns
    -------
    labels : ndarray of uint16 or uint32
        On the prepared grid (atlas orientation and resolution, the sample's
        space), 0 outside the brain; one value per (region, hemisphere).
    features : DataFrame
        ``index`` (the label value), ``acronym``, ``name``, ``hemisphere``
        (left / right / "") and ``region_id``, one row per label value.
    affine : ndarray (4, 4)
        From the labels' voxels to raw sample voxels.
    """
    from ketamap.wholebrain.register import warp_labels_to_sample

    reg, annotation, hemis, factor = _coarser(registration, atlas, max_voxels)
    packed = annotation.astype(np.int64) * 4 + hemis.astype(np.int64)
    codes, uniques = pd.factorize(packed.ravel(), sort=True)
    dtype = np.uint16 if len(uniques) < 2**16 - 1 else np.uint32
    compact = codes.reshape(packed.shape).astype(dtype)
    # value 0 stays "outside" only if the atlas has background: shift every code by one
    # and send the background (id 0) back to 0
    compact = compact + dtype(1)
    background = np.flatnonzero(uniques // 4 == 0)
    if len(background):
        compact[np.isin(compact, background + 1)] = 0
    warped = warp_labels_to_sample(reg, compact)
    onto = atlas.ontology
    rows = []
    for k, value in enumerate(uniques):
        rid, side = int(value // 4), int(value % 4)
        if rid == 0:
            continue
        try:
            acronym, name = onto.acronym(rid), onto.name(rid)
        except KetamapError:
            acronym, name = str(rid), str(rid)
        rows.append(
            {
                "index": k + 1,
                "acronym": acronym,
                "name": name,
                "hemisphere": {1: "left", 2: "right"}.get(side, ""),
                "region_id": rid,
            }
        )
    features = pd.DataFrame(rows, columns=["index", "acronym", "name", "hemisphere", "region_id"])
    affine = prepared_to_raw_affine(registration)
    if factor > 1:
        affine = affine @ np.diag([factor, factor, factor, 1.0])
    return warped, features, affine


def _atlas_colours(atlas, features: pd.DataFrame) -> dict:
    table = atlas.ontology.table.set_index("id")
    out = {None: "transparent", 0: "transparent"}
    for value, rid in zip(features["index"], features["region_id"]):
        colour = table["color_hex"].get(rid)
        if isinstance(colour, str) and len(colour) == 6:
            out[int(value)] = hex_rgba(colour)
    return out


def _atlas_layer(folder: Path, study, vs, *, name: str) -> LayerData | None:
    """Return the atlas warped into the subject, or None (logged) when it cannot be built."""
    from ketamap.atlas import load_atlas
    from ketamap.wholebrain.register import load_registration

    try:
        reg = load_registration(folder / "register")
        atlas = load_atlas(study.atlas_spec)
        labels, features, affine = atlas_labels(reg, atlas)
    except KetamapError as e:
        log.warning("%s: the atlas regions are not shown: %s", folder.name, e)
        return None
    world = np.diag([*[float(v) for v in vs], 1.0]) @ affine
    kwargs = {
        "name": name,
        "affine": world,
        "features": features,
        "colormap": _atlas_colours(atlas, features),
        "opacity": 0.35,
        "blending": "translucent_no_depth",
        "metadata": {"ketamap": {"kind": "atlas", "atlas": study.atlas_spec}},
    }
    return labels, kwargs, "labels"


def cells_table(layer_data: LayerData) -> pd.DataFrame:
    """Return a points layer's data and features as a cells table (``z_vox`` ...)."""
    data, kwargs, _ = layer_data
    table = pd.DataFrame(np.asarray(data, dtype=float).reshape(-1, 3), columns=VOX)
    features = kwargs.get("features")
    if features is not None and len(features) == len(table):
        table = pd.concat([table, pd.DataFrame(features).reset_index(drop=True)], axis=1)
    return table
