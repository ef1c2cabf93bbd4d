"""Voxel-wise density maps of a census study: per mouse, per group, and their FWE test.

:func:`write_voxel_maps` turns every subject's cells (in atlas voxels) into a
smoothed density map on a coarser atlas grid, writes group means and log2 fold
changes, and runs :func:`ketamap.stats.voxels.voxel_test` per contrast. The same
function maps fibres: weighted points (a skeleton's length per atlas voxel) give
length-density maps (mm/mm³), written beside the cells' under a prefix. Maps
are written as OME-Zarr (for napari) and NIfTI (for ITK-SNAP, FSLeyes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ketamap.errors import InputError
from ketamap.io.atomic import write_table
from ketamap.stats.voxels import (
    VoxelParams,
    atlas_grid,
    atlas_points_um,
    density_map,
    group_maps,
    voxel_test,
)

if TYPE_CHECKING:
    from ketamap.atlas import Atlas

__all__ = ["write_voxel_maps", "map_points"]

log = logging.getLogger(__name__)


def _write_map(array: np.ndarray, stem: Path, voxel_size_um) -> None:
    """Write one map as ``stem.ome.zarr`` and ``stem.nii.gz`` (NIfTI-1, spacing in mm)."""
    import SimpleITK as sitk

    from ketamap.io.volumes import write_ome_zarr

    write_ome_zarr(array, stem.with_name(stem.name + ".ome.zarr"), voxel_size_um=voxel_size_um)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))  # (z, y, x) -> ITK (x, y, z)
    img.SetSpacing([float(v) / 1000.0 for v in reversed(voxel_size_um)])
    sitk.WriteImage(img, str(stem.with_name(stem.name + ".nii.gz")), useCompression=True)


def map_points(
    density_per_mm3, annotation: np.ndarray, voxel_size_um, *, name: str = "length_mm"
) -> pd.DataFrame:
    """Return the non-zero voxels of a density map on the atlas grid as weighted points.

    Turns a map such as a subject's fibre length density in atlas space (mm/mm³ per
    atlas voxel) into the point table that :func:`write_voxel_maps` takes with
    ``weight=name``: each voxel becomes a point at its centre carrying its amount
    (density times voxel volume: mm of fibre). Read a few planes at a time, so a
    Dask map is never held whole.

    Parameters
    ----------
    density_per_mm3 : array_like or dask.array.Array, shape (z, y, x)
        The map, on the atlas grid (same shape as ``annotation``).
    annotation : ndarray of int
        The atlas labels (gives each point its ``region_id``).
    voxel_size_um : tuple of float
        The atlas voxel size.
    name : str
        Name of the amount's column.

    Returns
    -------
    DataFrame
        ``atlas_z_vox``, ``atlas_y_vox``, ``atlas_x_vox`` (int64), ``region_id``
        (int64) and ``name`` (float64), one row per non-zero voxel.

    Raises
    ------
    InputError
        If the map is not on the atlas grid.

    Examples
    --------
    >>> d = np.zeros((2, 2, 2), np.float32); d[1, 0, 1] = 1000.0   # mm/mm³
    >>> t = map_points(d, np.ones((2, 2, 2), int), (100.0, 100.0, 100.0))
    >>> t[["atlas_z_vox", "atlas_x_vox", "length_mm"]].to_numpy().tolist()
    [[1.0, 1.0, 1.0]]
    """
    annotation = np.asarray(annotation)
    if tuple(density_per_mm3.shape) != annotation.shape:
        raise InputError(
            f"The map has shape {tuple(density_per_mm3.shape)} but the atlas {annotation.shape}: "
            "it was made with another atlas; run the stage that wrote it again."
        )
    voxel_mm3 = float(np.prod(voxel_size_um)) * 1e-9
    step = max(1, int(2**22 // max(1, int(np.prod(annotation.shape[1:])))))
    parts = []
    for z0 in range(0, annotation.shape[0], step):
        block = np.asarray(density_per_mm3[z0 : z0 + step])
        where = np.nonzero(block)
        idx = np.stack(where, axis=1).astype(np.int64) + [z0, 0, 0]
        parts.append(
            pd.DataFrame({
                "atlas_z_vox": idx[:, 0], "atlas_y_vox": idx[:, 1], "atlas_x_vox": idx[:, 2],
                "region_id": annotation[tuple(idx.T)].astype(np.int64),
                name: block[where].astype(np.float64) * voxel_mm3,
            })
        )  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def _block_regions(annotation: np.ndarray, voxels: np.ndarray, factor) -> np.ndarray:
    """Return the region of each map voxel: the commonest brain label of its atlas voxels.

    A map voxel is in the mask when at least half of its block is brain, so its centre
    may lie outside (label 0); the peak of a cluster at the brain's surface is then
    named after the brain region that fills its block. 0 only for a block without brain.
    """
    f = np.asarray(factor, dtype=np.int64)
    out = np.zeros(len(voxels), dtype=np.int64)
    for i, v in enumerate(np.asarray(voxels, dtype=np.int64)):
        block = annotation[tuple(slice(a * k, (a + 1) * k) for a, k in zip(v, f))]
        ids, counts = np.unique(block[block != 0], return_counts=True)
        if len(ids):
            out[i] = ids[np.argmax(counts)]
    return out


def write_voxel_maps(
    points: Sequence[pd.DataFrame],
    groups: Sequence[str],
    reference_group: str,
    atlas: Atlas,
    params: VoxelParams,
    out: Path,
    *,
    weight: str | None = None,
    prefix: str = "",
) -> dict:
    """Map densities voxel-wise, compare each group with the reference and write the maps.

    Parameters
    ----------
    points : sequence of DataFrame
        Per subject, its cells (or other points) in atlas voxels (``atlas_z_vox``,
        ``atlas_y_vox``, ``atlas_x_vox``) with ``region_id`` (points outside the brain,
        id 0, are left out).
    groups : sequence of str
        Per subject, its group.
    reference_group : str
        The group every other group is compared with.
    atlas : Atlas
        The atlas the cells were mapped to.
    params : VoxelParams
        Grid, kernel and test.
    out : Path
        Folder to write into: ``<prefix>voxel_maps/`` (``mask``, ``mean_density_<group>``,
        per contrast ``log2_fold_change_``, ``t_`` and ``p_fwe_`` maps, each as
        ``.ome.zarr`` and ``.nii.gz``) and ``<prefix>voxel_clusters.parquet`` / ``.csv``.
    weight : str, optional
        A column of the tables summed per map voxel instead of counting rows (e.g.
        ``"length_mm"`` of fibre skeleton voxels: the maps are then mm per mm³); the
        smoothing, log offset and test are the same.
    prefix : str
        Put before the output names (``"fibre_"``: ``fibre_voxel_maps/``,
        ``fibre_voxel_clusters``), so that several kinds of map sit side by side.

    Returns
    -------
    dict
        The grid, and per contrast the permutations run and what was called,
        or why the design cannot support the test (``skipped``).
    """
    factor, vox_um, mask = atlas_grid(atlas.annotation, atlas.resolution_um, params.resolution_um)
    maps = []
    for table in points:
        table = table[table["region_id"] > 0]
        xyz = table[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy(float)
        pts = atlas_points_um(xyz, atlas.resolution_um, factor)
        w = None if weight is None else table[weight].to_numpy(float)
        maps.append(density_map(pts, mask.shape, voxel_size_um=vox_um, weights=w,
                                radius_um=params.radius_um, kernel=params.kernel))  # fmt: skip
    maps = np.stack(maps)
    groups = list(groups)
    folder = out / f"{prefix}voxel_maps"
    folder.mkdir(parents=True, exist_ok=True)
    _write_map(mask.astype(np.uint8), folder / "mask", vox_um)
    means = group_maps(maps, groups)
    for g, m in means.items():
        _write_map(np.where(mask, m, 0).astype(np.float32), folder / f"mean_density_{g}", vox_um)
    logs = np.log(maps + params.log_offset_per_mm3)
    ref = reference_group
    is_ref = np.array([g == ref for g in groups])
    frames, contrasts = [], []
    for g in dict.fromkeys(groups):
        if g == ref:
            continue
        contrast = f"{g}_vs_{ref}"
        sel = np.array([x == g for x in groups])
        lfc = (np.log2(means[g] + params.log_offset_per_mm3)
               - np.log2(means[ref] + params.log_offset_per_mm3))  # fmt: skip
        lfc = np.where(mask, lfc, 0).astype(np.float32)
        _write_map(lfc, folder / f"log2_fold_change_{contrast}", vox_um)
        # the exact permutation test cannot go below 1 / (number of relabellings), 2 / ...
        # with equal groups (a relabelling and its mirror give the same |t|)
        n_ref, n_grp = int(is_ref.sum()), int(sel.sum())
        n_labels = math.comb(n_ref + n_grp, n_grp)
        smallest = (2 if n_ref == n_grp else 1) / n_labels
        if smallest > params.alpha:
            reason = (
                f"{contrast}: with {n_ref} and {n_grp} mice there are only {n_labels} "
                f"relabellings, so no FWE p below {smallest:.2g} is possible"
            )
            log.warning("voxel test skipped: %s", reason)
            contrasts.append({"contrast": contrast, "skipped": reason})
            continue
        res = voxel_test(logs[is_ref], logs[sel], mask=mask, params=params, voxel_size_um=vox_um)
        _write_map(res.t, folder / f"t_{contrast}", vox_um)
        _write_map(res.p_fwe, folder / f"p_fwe_{contrast}", vox_um)
        cl = res.clusters.copy()
        peak = cl[["peak_z_vox", "peak_y_vox", "peak_x_vox"]].to_numpy(np.int64)
        labels = _block_regions(atlas.annotation, peak, factor)
        cl.insert(0, "contrast", contrast)
        cl["peak_acronym"] = [atlas.ontology.acronym(int(r)) if r else "" for r in labels]
        cl["n_permutations"] = res.n_permutations
        cl["exact"] = res.exact
        frames.append(cl)
        contrasts.append({
            "contrast": contrast, "n_permutations": res.n_permutations, "exact": res.exact,
            "n_voxels_fwe": int((res.p_fwe < params.alpha).sum()),
            "n_clusters_fwe": int((res.clusters["p_fwe"] < params.alpha).sum()),
        })  # fmt: skip
    clusters = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_table(clusters, out / f"{prefix}voxel_clusters.parquet")
    return {"voxel_size_um": list(vox_um), "grid_shape": list(mask.shape),
            "atlas_block_factor": list(factor), "n_voxels_tested": int(mask.sum()),
            "contrasts": contrasts}  # fmt: skip
