"""Manual spine annotations: export the automatic result, import a corrected one.

Two formats:

* one CSV for the whole study, columns ``dendrite, session, spine_id, y_px,
  x_px`` (pixels of each session's own image). ``spine_id`` may be left empty
  for added spines: they are then tracked automatically.
* napari points layers: one CSV per dendrite and session, named
  ``<dendrite>__<session>.csv``, with napari's columns ``index, axis-0,
  axis-1`` (axis-0 is y, axis-1 is x). Load one with *File › Open* over the
  image, edit the points, and save the layer back under the same name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError, InputNotFoundError
from ketamap.io.atomic import atomic_path

__all__ = ["ANNOTATION_COLUMNS", "export_annotations", "export_napari", "import_annotations"]

ANNOTATION_COLUMNS = ["dendrite", "session", "spine_id", "y_px", "x_px"]


def export_annotations(spines: pd.DataFrame, path: str | Path) -> Path:
    """Write detections as an editable annotation CSV.

    Parameters
    ----------
    spines : DataFrame
        At least ``dendrite, session, spine_id, y_px, x_px``.
    path : path-like
        The CSV to write (atomically).

    Returns
    -------
    Path
    """
    path = Path(path)
    missing = [c for c in ANNOTATION_COLUMNS if c not in spines]
    if missing:
        raise InputError(f"cannot export annotations: columns {missing} are missing.")
    with atomic_path(path) as tmp:
        spines[ANNOTATION_COLUMNS].to_csv(tmp, index=False, float_format="%.2f")
    return path


def export_napari(spines: pd.DataFrame, folder: str | Path) -> list[Path]:
    """Write one napari points CSV (``index, axis-0, axis-1``) per dendrite and session.

    Parameters
    ----------
    spines : DataFrame
        ``dendrite, session, y_px, x_px``.
    folder : path-like
        Folder to write ``<dendrite>__<session>.csv`` into.

    Returns
    -------
    list of Path
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (dend, sess), g in spines.groupby(["dendrite", "session"], sort=True):
        p = folder / f"{dend}__{sess}.csv"
        table = pd.DataFrame(
            {
                "index": np.arange(len(g)),
                "axis-0": g["y_px"].to_numpy(),
                "axis-1": g["x_px"].to_numpy(),
            }
        )
        with atomic_path(p) as tmp:
            table.to_csv(tmp, index=False, float_format="%.2f")
        paths.append(p)
    return paths


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f'annotation file "{path}" is not a readable CSV table.') from e


def import_annotations(path: str | Path) -> pd.DataFrame:
    """Read corrected annotations: one study CSV, or a folder of napari points CSVs.

    Parameters
    ----------
    path : path-like
        A CSV with ``dendrite, session, y_px, x_px`` (``spine_id`` optional,
        may be empty), or a folder of ``<dendrite>__<session>.csv`` napari
        points files.

    Returns
    -------
    DataFrame
        ``dendrite, session, spine_id, y_px, x_px``; ``spine_id`` is a
        nullable integer (missing where the user gave none).

    Raises
    ------
    InputNotFoundError
        If the path does not exist.
    InputError
        For a file without the needed columns or with non-numeric positions.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f'annotation file "{path}" does not exist.')
    if path.is_dir():
        frames = []
        for f in sorted(path.glob("*__*.csv")):
            t = _read_csv(f)
            if not {"axis-0", "axis-1"} <= set(t.columns):
                raise InputError(f'napari points file "{f}" has no axis-0/axis-1 columns.')
            dend, sess = f.stem.split("__", 1)
            frames.append(
                pd.DataFrame(
                    {
                        "dendrite": dend,
                        "session": sess,
                        "spine_id": pd.NA,
                        "y_px": t["axis-0"],
                        "x_px": t["axis-1"],
                    }
                )
            )
        if not frames:
            raise InputError(f'folder "{path}" holds no <dendrite>__<session>.csv points files.')
        table = pd.concat(frames, ignore_index=True)
    else:
        table = _read_csv(path)
        missing = [c for c in ("dendrite", "session", "y_px", "x_px") if c not in table]
        if missing:
            raise InputError(f'annotation file "{path}" lacks the column(s) {", ".join(missing)}.')
        if "spine_id" not in table:
            table["spine_id"] = pd.NA
    for c in ("y_px", "x_px"):
        if not pd.api.types.is_numeric_dtype(table[c]) or table[c].isna().any():
            raise InputError(f'annotation file "{path}": column {c} must hold numbers only.')
    table["dendrite"] = table["dendrite"].astype(str)
    table["session"] = table["session"].astype(str)
    table["spine_id"] = pd.to_numeric(table["spine_id"], errors="coerce").astype("Int64")
    return table[ANNOTATION_COLUMNS]
