"""Load the Allen CCFv3 2017 files (annotation, hemispheres, ontology CSV).

The files as distributed with ClearMap and kept in ``../shared/data``:
``ABA_25um_2017_annotation.tif.lzma`` (uint32, 456 x 528 x 320, axes
left-right, anterior-posterior, dorsal-ventral), the matching
``ABA_25um_2017_hemispheres.tif.lzma`` (0/255) and
``structure_tree_safe_2017.csv``. ``transpose(1, 2, 0)`` gives the usual CCF
array (528 x 320 x 456), which BrainGlobe calls ``"asr"``: axis 0 anterior ->
posterior, axis 1 superior -> inferior, axis 2 right -> left.

Nothing is cached on disk: LZMA files are decompressed in memory.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.atlas.core import LEFT, RIGHT, Atlas
from ketamap.atlas.ontology import Ontology
from ketamap.errors import InputError, InputNotFoundError, ParameterError

__all__ = ["load_allen", "read_allen_structures", "read_volume", "ALLEN_RESOLUTIONS_UM"]

logger = logging.getLogger(__name__)

#: Resolutions (µm) :func:`load_allen` can produce from the 25 µm files.
ALLEN_RESOLUTIONS_UM = (25.0, 50.0, 100.0)
_SOURCE_UM = 25.0
_FILE_SHAPE = (456, 528, 320)  # (LR, AP, DV), as in the ClearMap 2017 files
_ASR_SHAPE = (528, 320, 456)  # (AP, DV, LR) = BrainGlobe "asr"


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF volume, decompressing ``.lzma`` / ``.xz`` files in memory.

    Parameters
    ----------
    path : path-like
        A ``.tif``/``.tiff`` file, optionally LZMA-compressed.

    Returns
    -------
    ndarray
        The volume as stored in the file.

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If it cannot be decompressed or read as TIFF.
    """
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Atlas file {path} does not exist.")
    try:
        if path.suffix.lower() in (".lzma", ".xz"):
            data = lzma.decompress(path.read_bytes())
            return tifffile.imread(io.BytesIO(data))
        return tifffile.imread(path)
    except (lzma.LZMAError, ValueError, OSError) as e:
        raise InputError(
            f"Atlas file {path} cannot be read as a (LZMA-compressed) TIFF: {e}"
        ) from e


def read_allen_structures(path: str | os.PathLike) -> Ontology:
    """Read the Allen structure CSV (``structure_tree_safe_2017.csv``) as an Ontology.

    Parameters
    ----------
    path : path-like
        CSV with columns ``id``, ``acronym``, ``name``, ``parent_structure_id``
        and optionally ``color_hex_triplet``.

    Returns
    -------
    Ontology

    Raises
    ------
    InputNotFoundError
        If the file does not exist.
    InputError
        If a required column is missing.
    AtlasError
        If the tree is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Allen structure file {path} does not exist.")
    df = pd.read_csv(path)
    need = ["id", "acronym", "name", "parent_structure_id"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"Allen structure file {path} lacks the column(s) {', '.join(missing)}.")
    table = pd.DataFrame(
        {
            "id": df["id"].astype(np.int64),
            "acronym": df["acronym"].astype(str),
            "name": df["name"].astype(str),
            "parent_id": pd.array(df["parent_structure_id"], dtype="Int64"),
        }
    )
    if "color_hex_triplet" in df.columns:
        table["color_hex"] = df["color_hex_triplet"].astype(str)
    return Ontology(table)


def _to_asr(volume: np.ndarray, path) -> np.ndarray:
    if volume.shape == _FILE_SHAPE:
        return volume.transpose(1, 2, 0)
    if volume.shape == _ASR_SHAPE:
        return volume
    raise InputError(
        f"Allen volume {path} has shape {volume.shape}; expected the 25 µm CCF grid "
        f"{_FILE_SHAPE} (LR, AP, DV) or {_ASR_SHAPE} (AP, DV, LR)."
    )


def _hemispheres_asr(raw: np.ndarray) -> np.ndarray:
    """Map a two-valued hemisphere volume (asr) to 1 = left, 2 = right.

    In "asr" axis 2 starts at the right: the value that fills the low half of
    axis 2 is the right hemisphere. (In the 2017 file 255 marks that half.)
    """
    values = np.unique(raw[:, :, [0, -1]])
    if len(values) != 2:
        raise InputError(
            f"The hemispheres volume must hold two values (one per side) at its lateral "
            f"faces, got {values.tolist()}."
        )
    n2 = raw.shape[2]
    low = raw[:, :, : n2 // 2]
    right_value = values[0] if (low == values[0]).mean() > 0.5 else values[1]
    out = np.where(raw == right_value, RIGHT, LEFT).astype(np.uint8)
    logger.debug("hemisphere value %s -> right (2)", right_value)
    return out


def _symmetric_hemispheres(shape) -> np.ndarray:
    hemi = np.full(shape, RIGHT, dtype=np.uint8)
    hemi[:, :, shape[2] // 2 :] = LEFT
    return hemi


def _downsample_labels(volume: np.ndarray, factor: int) -> np.ndarray:
    """Nearest sampling at the centre of each ``factor``³ block."""
    if factor == 1:
        return np.ascontiguousarray(volume)
    o = factor // 2
    return np.ascontiguousarray(volume[o::factor, o::factor, o::factor])


def _downsample_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Anti-aliased downsampling: the mean of each ``factor``³ block (float32)."""
    v = np.asarray(volume, dtype=np.float32)
    n = [s // factor for s in v.shape]
    v = v[: n[0] * factor, : n[1] * factor, : n[2] * factor]
    return v.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))


def load_allen(
    annotation_path: str | os.PathLike,
    structures_path: str | os.PathLike,
    *,
    hemispheres_path: str | os.PathLike | None = None,
    reference_path: str | os.PathLike | None = None,
    resolution_um: float = 25.0,
    name: str = "allen_mouse",
) -> Atlas:
    """Load the Allen CCFv3 2017 annotation as an ``"asr"`` atlas.

    Parameters
    ----------
    annotation_path : path-like
        ``ABA_25um_2017_annotation.tif.lzma`` (or the same volume as plain
        TIFF), 25 µm, shape 456 x 528 x 320 (LR, AP, DV) or 528 x 320 x 456.
    structures_path : path-like
        ``structure_tree_safe_2017.csv``.
    hemispheres_path : path-like, optional
        ``ABA_25um_2017_hemispheres.tif.lzma``. The value filling the right
        half (low axis-2 indices in asr) becomes 2, the other 1. Without it
        the volume is split at the midline (BrainGlobe's rule for symmetric
        atlases).
    reference_path : path-like, optional
        An intensity template already in asr: either on the 25 µm grid
        (it is then block-averaged to ``resolution_um``) or on the output grid
        (e.g. ``brain_in_ccf_100um.tiff``, 132 x 80 x 114, at 100 µm).
    resolution_um : {25, 50, 100}
        Output voxel size. Labels are resampled by nearest sampling at the
        centre of each 2³ or 4³ block (unbiased for volumes, and keeps every
        label an original id); a 25 µm reference by block averaging.
    name : str
        Atlas name stem; the atlas is named ``f"{name}_{resolution_um}um"``.

    Returns
    -------
    Atlas
        uint32 annotation (ids above 65535 kept), hemispheres 1 = left,
        2 = right, orientation ``"asr"``, reference float32 or uint16 or None.

    Raises
    ------
    ParameterError
        If ``resolution_um`` is not 25, 50 or 100.
    InputNotFoundError
        If a file does not exist.
    InputError
        If a volume has an unexpected shape (the message names both shapes)
        or the hemispheres are not two-valued.

    Examples
    --------
    >>> atlas = load_allen(  # doctest: +SKIP
    ...     "ABA_25um_2017_annotation.tif.lzma", "structure_tree_safe_2017.csv",
    ...     hemispheres_path="ABA_25um_2017_hemispheres.tif.lzma", resolution_um=50)
    >>> atlas.shape  # doctest: +SKIP
    (264, 160, 228)
    """
    if isinstance(resolution_um, bool) or float(resolution_um) not in ALLEN_RESOLUTIONS_UM:
        raise ParameterError(
            f"load_allen resolution_um must be one of 25, 50 or 100 µm, got {resolution_um!r}."
        )
    res = float(resolution_um)
    factor = int(round(res / _SOURCE_UM))
    ontology = read_allen_structures(structures_path)

    ann = _to_asr(read_volume(annotation_path), annotation_path)
    if not np.issubdtype(ann.dtype, np.integer):
        raise InputError(
            f"Allen annotation {annotation_path} must hold integer labels, got {ann.dtype}."
        )
    annotation = _downsample_labels(ann, factor).astype(np.uint32, copy=False)
    del ann

    if hemispheres_path is not None:
        hemi_raw = _to_asr(read_volume(hemispheres_path), hemispheres_path)
        hemispheres = _hemispheres_asr(_downsample_labels(hemi_raw, factor))
    else:
        hemispheres = _symmetric_hemispheres(annotation.shape)

    reference = None
    if reference_path is not None:
        ref = read_volume(reference_path)
        if ref.shape == annotation.shape:
            reference = ref
        elif factor > 1 and ref.shape == _ASR_SHAPE:
            reference = _downsample_mean(ref, factor)
        else:
            raise InputError(
                f"Reference {reference_path} has shape {ref.shape}, but the annotation at "
                f"{res:g} µm has shape {annotation.shape} (asr); they must match."
            )
        if reference.dtype not in (np.float32, np.uint16):
            reference = reference.astype(np.float32)
    atlas = Atlas(
        name=f"{name}_{res:g}um",
        annotation=annotation,
        hemispheres=hemispheres,
        resolution_um=(res, res, res),
        orientation="asr",
        ontology=ontology,
        reference=reference,
    )
    logger.info("loaded %s: shape %s", atlas.name, atlas.shape)
    return atlas
