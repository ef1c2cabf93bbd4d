"""Cell tables on disk: Parquet + CSV, and cellfinder / ImageJ CellCounter XML.

Coordinates are voxel indices on the image grid, in columns ``z_vox``,
``y_vox``, ``x_vox``. In the CellCounter XML, ``MarkerX``/``MarkerY``/
``MarkerZ`` hold the x, y and z voxel indices as integers; marker type 2 means
"cell" and type 1 "non-cell" (cellfinder's convention).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, InputNotFoundError
from ketamap.io.atomic import atomic_path, write_table

__all__ = [
    "write_cells",
    "cells_to_cellfinder_xml",
    "read_cellfinder_xml",
    "read_points",
    "read_annotations",
]

log = logging.getLogger(__name__)

_VOX = ["z_vox", "y_vox", "x_vox"]


def _check_columns(cells: pd.DataFrame, where: str) -> None:
    missing = [c for c in _VOX if c not in cells.columns]
    if missing:
        raise InputError(f"{where} lacks the column(s) {', '.join(missing)}.")


def cells_to_cellfinder_xml(cells: pd.DataFrame) -> str:
    """Return cells as cellfinder / ImageJ CellCounter XML.

    Parameters
    ----------
    cells : DataFrame
        Columns ``z_vox``, ``y_vox``, ``x_vox`` (voxel indices); an optional
        integer ``cell_type`` column (1 = non-cell, 2 = cell) defaults to 2.

    Returns
    -------
    str
        The XML document; coordinates are rounded to the nearest integer.

    Raises
    ------
    InputError
        If a coordinate column is missing or holds NaN.

    Examples
    --------
    >>> table = pd.DataFrame({"z_vox": [1.2], "y_vox": [2.0], "x_vox": [3.6]})
    >>> "<MarkerX>4</MarkerX>" in cells_to_cellfinder_xml(table)
    True
    """
    _check_columns(cells, "The cell table")
    coords = cells[_VOX].to_numpy(dtype=np.float64)
    if not np.isfinite(coords).all():
        raise InputError("The cell table holds NaN or infinite coordinates.")
    coords = np.rint(coords).astype(np.int64)
    types = (
        cells["cell_type"].to_numpy(dtype=np.int64)
        if "cell_type" in cells.columns
        else np.full(len(cells), 2, dtype=np.int64)
    )
    root = ET.Element("CellCounter_Marker_File")
    props = ET.SubElement(root, "Image_Properties")
    ET.SubElement(props, "Image_Filename").text = "placeholder.tif"
    data = ET.SubElement(root, "Marker_Data")
    ET.SubElement(data, "Current_Type").text = "1"
    for t in sorted(set(types.tolist()) | {1, 2}):
        mt = ET.SubElement(data, "Marker_Type")
        ET.SubElement(mt, "Type").text = str(t)
        for z, y, x in coords[types == t]:
            m = ET.SubElement(mt, "Marker")
            ET.SubElement(m, "MarkerX").text = str(x)
            ET.SubElement(m, "MarkerY").text = str(y)
            ET.SubElement(m, "MarkerZ").text = str(z)
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def read_cellfinder_xml(path) -> pd.DataFrame:
    """Read a cellfinder / ImageJ CellCounter XML file.

    Parameters
    ----------
    path : path-like
        The XML file.

    Returns
    -------
    DataFrame
        Columns ``z_vox``, ``y_vox``, ``x_vox`` (float64) and ``cell_type``
        (int64; 1 = non-cell or unknown, 2 = cell), one row per marker.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If it is not CellCounter XML or a marker lacks a coordinate.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Points file {path} does not exist.")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise InputError(f"Points file {path} is not valid XML: {e}.") from e
    data = root.find("Marker_Data")
    if data is None:
        raise InputError(f"Points file {path} is not CellCounter XML (no Marker_Data element).")
    rows = []
    for mt in data.findall("Marker_Type"):
        try:
            t = int(mt.findtext("Type", "1"))
        except ValueError as e:
            raise InputError(f"Points file {path} has a non-integer marker Type.") from e
        for i, m in enumerate(mt.findall("Marker")):
            try:
                xyz = [float(m.findtext(k)) for k in ("MarkerX", "MarkerY", "MarkerZ")]
            except (TypeError, ValueError) as e:
                raise InputError(
                    f"Points file {path}: marker {i} of type {t} lacks a numeric "
                    "MarkerX, MarkerY or MarkerZ."
                ) from e
            rows.append((xyz[2], xyz[1], xyz[0], t))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    table = pd.DataFrame({c: arr[:, i] for i, c in enumerate(_VOX)})
    table["cell_type"] = arr[:, 3].astype(np.int64)
    log.info("read_cellfinder_xml: %d markers from %s", len(table), path)
    return table


def read_points(path) -> pd.DataFrame:
    """Read points from cellfinder XML, CSV or Parquet.

    Parameters
    ----------
    path : path-like
        ``.xml`` (cellfinder), or ``.csv`` / ``.parquet`` with ``z_vox``,
        ``y_vox``, ``x_vox`` columns (or ``z``, ``y``, ``x``, taken as voxels).

    Returns
    -------
    DataFrame
        At least ``z_vox``, ``y_vox``, ``x_vox`` as float64; other columns kept.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If the format is unsupported or the columns are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Points file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return read_cellfinder_xml(path)
    try:
        if suffix == ".csv":
            table = pd.read_csv(path)
        elif suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            raise InputError(
                f"Points file {path} has an unsupported format; use .xml (cellfinder), "
                ".csv or .parquet."
            )
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"Points file {path} cannot be read: {e}.") from e
    if "z_vox" not in table and {"z", "y", "x"} <= set(table.columns):
        table = table.rename(columns={"z": "z_vox", "y": "y_vox", "x": "x_vox"})
    _check_columns(table, f"Points file {path}")
    for c in _VOX:
        table[c] = table[c].astype(np.float64)
    return table


def read_annotations(path) -> pd.DataFrame:
    """Read annotated points: cellfinder XML, or CSV / Parquet with voxel columns.

    Parameters
    ----------
    path : path-like
        As for :func:`read_points`; a cellfinder classification XML carries each
        point's type (2 cell, 1 non-cell), a table may carry ``type`` or
        ``cell_type``.

    Returns
    -------
    DataFrame
        ``z_vox``, ``y_vox``, ``x_vox`` and, when the file has one, ``cell_type``.
    """
    table = read_points(path)
    return table.rename(columns={"type": "cell_type"}) if "cell_type" not in table else table


def write_cells(cells: pd.DataFrame, out_dir) -> dict[str, Path]:
    """Write a cell table as ``cells.parquet``, ``cells.csv`` and ``cells.xml``, atomically.

    Parameters
    ----------
    cells : DataFrame
        One row per cell with at least ``z_vox``, ``y_vox``, ``x_vox``.
    out_dir : path-like
        Folder to write into (created if needed).

    Returns
    -------
    dict
        ``{"parquet": Path, "csv": Path, "xml": Path}``.

    Raises
    ------
    InputError
        If a coordinate column is missing.
    """
    _check_columns(cells, "The cell table")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xml = cells_to_cellfinder_xml(cells)
    parquet = write_table(cells, out / "cells.parquet", csv=True)
    with atomic_path(out / "cells.xml") as tmp:
        tmp.write_text(xml, encoding="utf-8")
    log.info("write_cells: %d cells to %s", len(cells), out)
    return {"parquet": parquet, "csv": out / "cells.csv", "xml": out / "cells.xml"}
