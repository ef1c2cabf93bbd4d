"""What each per-subject stage of the census writes into its folder.

One function per stage, called by the study pipeline
(:func:`ketamap.pipelines.census.run_subject`) and by the single-stage
commands (``ketamap detect``, ``ketamap register``, ``ketamap quantify``), so
that both write the same files:

- :func:`detect_into`: ``cells.parquet``/``.csv``/``.xml``, ``tissue_mask.ome.zarr``,
  ``detection_qc.json``;
- :func:`register_into`: the transform, ``registration.json``, ``volumes_by_label.parquet``,
  ``volumes.csv``, ``qc.png`` and ``qc_checkerboard.png``;
- :func:`quantify_into`: ``cells_atlas``, ``regions`` (Parquet and CSV), ``summary.json``;
- :func:`fibres_into`: ``fibre_mask.ome.zarr``, ``skeleton.ome.zarr``, ``fibre_qc.json``
  and, with a registration, ``fibre_regions`` (Parquet and CSV) and
  ``fibre_density_atlas.ome.zarr`` (length density in atlas space).

Each writes into a folder it is given (the engine's temporary folder) and returns
the stage's headline numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path, write_json, write_table

if TYPE_CHECKING:
    from ketamap.atlas import Atlas
    from ketamap.wholebrain.detect import DetectionParams
    from ketamap.wholebrain.fibres import FibreParams
    from ketamap.wholebrain.register import RegistrationParams

__all__ = ["detect_into", "register_into", "quantify_into", "fibres_into", "write_registration"]


def detect_into(
    folder: Path,
    signal,
    *,
    voxel_size_um,
    params: DetectionParams,
    background=None,
    classifier=None,
) -> dict:
    """Detect somata and write the cells, the tissue mask and the detection QC.

    Parameters
    ----------
    folder : Path
        Folder to write into.
    signal : array-like
        The marker channel (z, y, x), NumPy or Dask.
    voxel_size_um : tuple of float
        Voxel size z, y, x in µm.
    params : DetectionParams
        Detection parameters.
    background : array-like, optional
        The autofluorescence channel, same shape.
    classifier : optional
        A trained second-pass classifier (:func:`ketamap.wholebrain.classify.load_classifier`);
        candidates it rejects are dropped and counted (``n_rejected_by_classifier``).

    Returns
    -------
    dict
        ``n_cells``, ``shape`` and the QC numbers (flags included).
    """
    from ketamap.io.points import write_cells
    from ketamap.wholebrain.classify import classify_cells
    from ketamap.wholebrain.detect import detect_cells, flag_detection
    from ketamap.wholebrain.tissue import write_detection_qc

    cells, qc = detect_cells(
        signal, voxel_size_um=voxel_size_um, params=params, background=background, return_qc=True
    )
    if classifier is not None:  # the trained second pass
        n = len(cells)
        cells = classify_cells(cells, classifier)
        qc = flag_detection(
            qc | {"n_rejected_by_classifier": n - len(cells)}, len(cells), params.qc_min_cells
        )
    write_cells(cells, folder)
    numbers = write_detection_qc(qc, folder, voxel_size_um=voxel_size_um)
    return {"n_cells": len(cells), "shape": list(signal.shape)} | numbers


def register_into(
    folder: Path,
    image,
    atlas: Atlas,
    *,
    voxel_size_um,
    orientation: str,
    params: RegistrationParams,
    title: str,
) -> dict:
    """Register a brain to the atlas and write the registration with its QC.

    Parameters
    ----------
    folder : Path
        Folder to write into.
    image : array-like
        The image registered (the autofluorescence channel, or the signal).
    atlas : Atlas
        The atlas (with a reference image).
    voxel_size_um : tuple of float
        Voxel size z, y, x in µm.
    orientation : str
        The image's BrainGlobe orientation code.
    params : RegistrationParams
        Registration parameters.
    title : str
        Title of the QC images (the subject).

    Returns
    -------
    dict
        The registration's scalar QC numbers (``flagged``, ``correlation_after`` ...).
    """
    from ketamap.wholebrain.register import register_to_atlas

    reg = register_to_atlas(image, atlas, voxel_size_um=voxel_size_um, orientation=orientation,
                            params=params)  # fmt: skip
    write_registration(folder, reg, atlas, image, voxel_size_um=voxel_size_um,
                       orientation=orientation, title=title)  # fmt: skip
    return {k: v for k, v in reg.qc.items() if not isinstance(v, (list, dict))} | {
        "reasons": list(reg.qc.get("reasons", []))
    }


def quantify_into(
    folder: Path,
    cells: pd.DataFrame,
    registration_dir: Path,
    atlas: Atlas,
    *,
    tissue_dir=None,
    proofread: Path | None = None,
) -> dict:
    """Map cells to the atlas, count them per region and write the tables.

    Parameters
    ----------
    folder : Path
        Folder to write into.
    cells : DataFrame
        Detected cells (``z_vox``, ``y_vox``, ``x_vox`` ...).
    registration_dir : Path
        A folder written by :func:`register_into`.
    atlas : Atlas
        The atlas of that registration.
    tissue_dir : Path, optional
        A folder written by :func:`detect_into`: its tissue mask's agreement with
        the registered atlas brain is added (``tissue_atlas_dice``).
    proofread : Path, optional
        A labels file (:mod:`ketamap.io.labels`): candidates labelled ``not_cell`` are
        not counted. Every label must match a candidate (within one voxel).

    Returns
    -------
    dict
        The quantification summary (cells in regions, outside the atlas, unlabelled)
        and, with ``proofread``, ``n_proofread``, ``n_rejected_by_proofreading`` and
        the share of labelled candidates that are cells with its Wilson 95 % interval
        (``proofread_precision``, ``_low``, ``_high``).

    Raises
    ------
    InputError
        If a label matches no candidate (the detection changed since proofreading).
    """
    from ketamap.errors import InputError
    from ketamap.wholebrain.quantify import quantify_cells
    from ketamap.wholebrain.register import load_registration
    from ketamap.wholebrain.tissue import read_tissue_mask, tissue_atlas_dice

    volumes_file = Path(registration_dir) / "volumes_by_label.parquet"
    if not volumes_file.exists():
        raise InputError(f'"{registration_dir}" is not an output folder of "ketamap register".')
    reg = load_registration(registration_dir)
    checked = {}
    if proofread is not None:
        cells, checked = _proofread(cells, proofread)
    cells_atlas, table, summary = quantify_cells(cells, reg, atlas, pd.read_parquet(volumes_file))
    summary |= checked
    if tissue_dir is not None:
        tissue = read_tissue_mask(tissue_dir)
        summary["tissue_atlas_dice"] = (
            None if tissue is None else tissue_atlas_dice(tissue, reg, atlas)
        )
    write_table(cells_atlas, folder / "cells_atlas.parquet")
    write_table(table, folder / "regions.parquet")
    write_json(summary, folder / "summary.json")
    return summary


def _proofread(cells: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, dict]:
    """Drop the candidates labelled ``not_cell``; return the kept cells and the numbers."""
    from ketamap.errors import InputError
    from ketamap.io.labels import match_labels, precision_estimate, read_labels

    labels = read_labels(path)
    per_cell, unmatched = match_labels(cells, labels, tolerance_vox=1.0)
    if len(unmatched):
        z, y, x = unmatched[["z_vox", "y_vox", "x_vox"]].iloc[0]
        raise InputError(
            f"{len(unmatched)} of {len(labels)} labels in {path} match no detected candidate "
            f"(the first at voxel ({z:g}, {y:g}, {x:g})): the detection changed since "
            "proofreading; proofread this subject again or remove those rows."
        )
    rejected = (per_cell == "not_cell").to_numpy()
    estimate = precision_estimate(per_cell)
    numbers = {
        "proofread_labels": str(path),
        "n_proofread": estimate["n_labelled"],
        "n_rejected_by_proofreading": int(rejected.sum()),
        "proofread_precision": estimate["precision"],
        "proofread_precision_low": estimate["low"],
        "proofread_precision_high": estimate["high"],
    }
    return cells[~rejected].reset_index(drop=True), numbers


def fibres_into(
    folder: Path,
    signal,
    *,
    voxel_size_um,
    params: FibreParams,
    background=None,
    tissue=None,
    somata=None,
    registration_dir: Path | None = None,
    atlas: Atlas | None = None,
) -> dict:
    """Segment fibres; write the mask, the skeleton, the QC, the region table and atlas map.

    Parameters
    ----------
    folder : Path
        Folder to write into.
    signal : array-like
        The fibre channel (z, y, x), NumPy or Dask (may be the cells' channel).
    voxel_size_um : tuple of float
        Voxel size z, y, x in µm.
    params : FibreParams
        Segmentation parameters.
    background : array-like, optional
        The autofluorescence channel, same shape.
    tissue : TissueMask, optional
        The detect stage's tissue mask (found here when None and ``params.tissue_mask``).
    somata : DataFrame, optional
        Detected cells (``z_vox, y_vox, x_vox``): their bodies are not fibre.
    registration_dir : Path, optional
        A folder written by :func:`register_into`; with ``atlas``, fibre length,
        voxel fraction and intensity are tabulated per region (``fibre_regions``), and
        the skeleton's length is mapped onto the atlas grid
        (``fibre_density_atlas.ome.zarr``: float32, mm per mm³, the atlas' voxel size
        and orientation, not smoothed; :func:`~ketamap.wholebrain.fibres.fibre_density_atlas`).
    atlas : Atlas, optional
        The atlas of that registration.

    Returns
    -------
    dict
        The QC numbers and ``total_length_mm``; with a registration also ``n_regions``,
        ``atlas_length_mm`` (the length the atlas map holds: the skeleton voxels that map
        inside the atlas volume).
    """
    import dask.array as da

    from ketamap.io.volumes import lazy_array, open_volume
    from ketamap.wholebrain.fibres import (
        FIBRE_DENSITY_ATLAS_FILE,
        fibre_density_atlas,
        fibre_length_table,
        labels_on_sample_grid,
        segment_fibres,
        skeleton_lengths,
        write_fibre_outputs,
    )

    if (registration_dir is None) != (atlas is None):
        from ketamap.errors import ParameterError

        raise ParameterError("A per-region fibre table needs both the registration and the atlas.")
    signal = signal if isinstance(signal, da.Array) else lazy_array(signal)
    mask, skeleton, qc = segment_fibres(
        signal,
        voxel_size_um=voxel_size_um,
        params=params,
        background=background,
        tissue=tissue,
        somata=somata,
    )
    paths = write_fibre_outputs(mask, skeleton, folder, voxel_size_um=voxel_size_um)
    skeleton = open_volume(paths["skeleton"])
    lengths = skeleton_lengths(skeleton, voxel_size_um, smoothing=params.length_smoothing)
    numbers = {k: v for k, v in qc.items() if k != "tissue" and not isinstance(v, (list, dict))}
    if registration_dir is None:
        numbers["total_length_mm"] = float(da.asarray(lengths).sum().compute()) / 1000.0
    else:
        from ketamap.io.volumes import write_ome_zarr
        from ketamap.wholebrain.register import load_registration, warp_labels_to_sample

        reg = load_registration(registration_dir)
        found = fibre_density_atlas(lengths, reg)  # its pass over the lengths gives the total
        write_ome_zarr(found.density_mm_per_mm3, folder / FIBRE_DENSITY_ATLAS_FILE,
                       voxel_size_um=found.voxel_size_um)  # fmt: skip
        numbers["total_length_mm"] = found.length_um / 1000.0
        numbers["atlas_length_mm"] = found.length_in_atlas_um / 1000.0
        packed = warp_labels_to_sample(
            reg, atlas.annotation.astype(np.uint64) * 4 + atlas.hemispheres
        )
        labels, hemispheres = labels_on_sample_grid(reg, packed, chunks=skeleton.chunksize)
        table = fibre_length_table(skeleton, labels, hemispheres, voxel_size_um, atlas.ontology,
                                   mask=open_volume(paths["fibre_mask"]), intensity=signal,
                                   smoothing=params.length_smoothing)  # fmt: skip
        write_table(table, folder / "fibre_regions.parquet")
        numbers["n_regions"] = int(table["region_id"].nunique())
    write_json(numbers, folder / "fibre_qc.json")
    return numbers


def write_registration(
    folder: Path, reg, atlas, image, *, voxel_size_um, orientation: str, title: str
) -> None:
    """Write a registration with its region volumes in sample space and its QC images.

    Writes the transform and ``registration.json`` (QC numbers),
    ``volumes_by_label.parquet`` (leaf label, hemisphere, volume in mm³ in the
    animal's own space), ``volumes.csv`` (acronym, left and right volume),
    ``qc.png`` (atlas boundaries, at a coarse hierarchy level, over the sample in
    three planes) and, when the atlas has a reference, ``qc_checkerboard.png``
    (sample vs warped reference).
    """
    from ketamap.report.qc import registration_checkerboard_png, registration_overlay_png
    from ketamap.wholebrain.quantify import label_volumes_mm3
    from ketamap.wholebrain.register import (
        prepare_sample,
        save_registration,
        warp_image_to_sample,
        warp_labels_to_sample,
    )

    save_registration(reg, folder)
    # one warp for both: region id and hemisphere packed as id * 4 + side (exact in uint64)
    packed = warp_labels_to_sample(reg, atlas.annotation.astype(np.uint64) * 4 + atlas.hemispheres)
    labels = packed // 4
    volumes = label_volumes_mm3(labels, packed % 4, atlas.resolution_um)
    write_table(volumes, folder / "volumes_by_label.parquet", csv=False)
    volumes["acronym"] = [atlas.ontology.acronym(int(r)) for r in volumes["region_id"]]
    wide = volumes.pivot_table(
        index="acronym", columns="hemisphere", values="volume_mm3", aggfunc="sum", fill_value=0.0
    )
    wide = (
        wide.reindex(columns=[1, 2], fill_value=0.0)
        .rename(columns={1: "left_volume_mm3", 2: "right_volume_mm3"})
        .reset_index()
    )
    with atomic_path(folder / "volumes.csv") as tmp:
        wide.to_csv(tmp, index=False)
    prepared = prepare_sample(
        image,
        voxel_size_um=voxel_size_um,
        orientation=orientation,
        atlas_orientation=atlas.orientation,
        atlas_resolution_um=atlas.resolution_um,
    )
    with atomic_path(folder / "qc.png") as png:
        png.write_bytes(
            registration_overlay_png(prepared, labels, ontology=atlas.ontology, title=title)
        )
    if atlas.reference is not None:
        warped = warp_image_to_sample(reg, atlas.reference)
        with atomic_path(folder / "qc_checkerboard.png") as png:
            png.write_bytes(registration_checkerboard_png(prepared, warped, title=title))
