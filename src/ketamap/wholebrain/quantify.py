"""Count cells per atlas region at every level of the hierarchy.

Cells arrive with atlas coordinates; each is given the leaf region and
hemisphere of its atlas voxel. Leaf counts and leaf volumes (measured in the
animal's own space, from the annotation warped into the sample) are then
rolled up to every ancestor in one merge and group-by, so each region's row
holds the cells and volume of its whole subtree. Cells outside the atlas
volume or in unlabelled voxels are counted in a summary, never silently
dropped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ketamap.errors import InputError
from ketamap.wholebrain.register import cells_to_atlas

__all__ = [
    "assign_regions",
    "label_volumes_mm3",
    "count_regions",
    "cell_summary",
    "check_cells_match_image",
    "quantify_cells",
]

# cells may lie at most this share outside the registered image (sub-voxel centres at the
# border), and their µm columns may imply a voxel size at most this far from the image's
_MAX_OUTSIDE_SHARE = 0.01
_VOXEL_SIZE_RTOL = 0.01

_HEMI = {1: "left", 2: "right"}


def check_cells_match_image(
    cells: pd.DataFrame, shape_vox: tuple[int, int, int], voxel_size_um
) -> None:
    """Raise one sentence if ``cells`` were not detected in the image of this shape and size.

    Parameters
    ----------
    cells : DataFrame
        ``z_vox, y_vox, x_vox`` (and optionally ``z_um, y_um, x_um``).
    shape_vox : tuple of int
        The registered image's shape (z, y, x).
    voxel_size_um : tuple of float
        Its voxel size (z, y, x).

    Raises
    ------
    InputError
        If more than 1 % of the cells lie outside the image, or the µm columns imply a
        voxel size more than 1 % away from the image's.

    Examples
    --------
    >>> cells = pd.DataFrame({"z_vox": [1.0], "y_vox": [2.0], "x_vox": [3.0]})
    >>> check_cells_match_image(cells, (10, 10, 10), (5.0, 2.0, 2.0))
    """
    if len(cells) == 0:
        return
    vox = cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float)
    shape = np.asarray(shape_vox, dtype=float)
    outside = ~np.all((vox > -1.0) & (vox < shape), axis=1)
    if outside.mean() > _MAX_OUTSIDE_SHARE:
        raise InputError(
            f"{int(outside.sum())} of {len(vox)} cells lie outside the registered image "
            f"(shape {tuple(int(s) for s in shape_vox)} voxels): the cells and the "
            "registration come from different images."
        )
    if all(c in cells for c in ("z_um", "y_um", "x_um")):
        um = cells[["z_um", "y_um", "x_um"]].to_numpy(float)
        want = np.asarray(voxel_size_um, dtype=float)
        for a, axis in enumerate("zyx"):
            ok = np.abs(vox[:, a]) > 0.5
            if not ok.any():
                continue
            got = float(np.median(um[ok, a] / vox[ok, a]))
            if not np.isclose(got, want[a], rtol=_VOXEL_SIZE_RTOL):
                raise InputError(
                    f"The cells were detected at a voxel size of {got:.4g} µm along {axis}, "
                    f"the registered image has {want[a]:.4g} µm: the cells and the "
                    "registration come from different images (or voxel sizes)."
                )


def assign_regions(atlas_points_vox: np.ndarray, atlas) -> pd.DataFrame:
    """Region and hemisphere of points given in atlas voxel coordinates.

    Parameters
    ----------
    atlas_points_vox : ndarray, shape (N, 3)
        Points in atlas voxel indices (atlas axis order), sub-voxel floats.
    atlas : Atlas

    Returns
    -------
    DataFrame
        ``region_id`` (int64, 0 = unlabelled or outside), ``hemisphere``
        (int8: 1 left, 2 right, 0 outside), ``inside_volume`` (bool).
    """
    pts = np.asarray(atlas_points_vox, dtype=float).reshape(-1, 3)
    labels, hemi = atlas.labels_at(pts)
    shape = np.asarray(atlas.shape)
    inside = np.all((pts > -0.5) & (pts < shape - 0.5), axis=1) & np.isfinite(pts).all(axis=1)
    return pd.DataFrame(
        {
            "region_id": np.asarray(labels, dtype=np.int64),
            "hemisphere": np.asarray(hemi, dtype=np.int8),
            "inside_volume": inside,
        }
    )


def label_volumes_mm3(labels: np.ndarray, hemispheres: np.ndarray, voxel_size_um) -> pd.DataFrame:
    """Volume of every (label, hemisphere) pair in a label image.

    Parameters
    ----------
    labels : ndarray of int
        Region ids (0 = outside), any shape.
    hemispheres : ndarray of int, same shape
        1 left, 2 right.
    voxel_size_um : sequence of 3 floats
        The label image's voxel size.

    Returns
    -------
    DataFrame
        ``region_id`` (int64), ``hemisphere`` (int8), ``volume_mm3`` (float64),
        for labels other than 0.
    """
    lab = np.asarray(labels).ravel().astype(np.int64)
    hem = np.asarray(hemispheres).ravel().astype(np.int64)
    if lab.shape != hem.shape:
        from ketamap.errors import InputError

        raise InputError(
            f"labels {np.shape(labels)} and hemispheres {np.shape(hemispheres)} differ."
        )
    keys, n = np.unique(lab * 4 + hem, return_counts=True)
    voxel_mm3 = float(np.prod(voxel_size_um)) * 1e-9
    df = pd.DataFrame(
        {
            "region_id": keys // 4,
            "hemisphere": (keys % 4).astype(np.int8),
            "volume_mm3": n * voxel_mm3,
        }
    )
    return df[df["region_id"] != 0].reset_index(drop=True)


def count_regions(cells: pd.DataFrame, volumes: pd.DataFrame, ontology) -> pd.DataFrame:
    """Count cells and measure volume and density for every region at every level.

    Parameters
    ----------
    cells : DataFrame
        One row per cell with ``region_id`` (leaf label, 0 = none) and
        ``hemisphere`` (1 left, 2 right).
    volumes : DataFrame
        ``region_id, hemisphere, volume_mm3`` per leaf label (from
        :func:`label_volumes_mm3`).
    ontology : Ontology
        Provides the ancestors used for the roll-up.

    Returns
    -------
    DataFrame
        One row per region that has volume or cells: ``region_id, acronym,
        name, level`` (depth, root = 0), ``parent_id``, ``count_left,
        count_right, count``, ``volume_left_mm3, volume_right_mm3,
        volume_mm3``, ``density_left_per_mm3, density_right_per_mm3,
        density_per_mm3`` (NaN where the volume is 0). Sorted by level and
        region id. Counts are int64.

    Raises
    ------
    AtlasError
        If a label is not in the ontology.
    """
    c = cells.loc[cells["region_id"] != 0, ["region_id", "hemisphere"]]
    leaf_counts = (
        c.groupby(["region_id", "hemisphere"]).size().rename("count").reset_index()
        if len(c)
        else pd.DataFrame({"region_id": [], "hemisphere": [], "count": []})
    )
    leaf = pd.merge(
        volumes[["region_id", "hemisphere", "volume_mm3"]].astype(
            {"region_id": np.int64, "hemisphere": np.int64}
        ),
        leaf_counts.astype({"region_id": np.int64, "hemisphere": np.int64, "count": np.int64}),
        on=["region_id", "hemisphere"],
        how="outer",
    ).fillna({"volume_mm3": 0.0, "count": 0})
    unknown = set(leaf["region_id"].unique()) - set(ontology.ids.tolist())
    if unknown:
        from ketamap.errors import AtlasError

        raise AtlasError(f"Labels not in the atlas ontology: {sorted(unknown)[:10]}.")
    pairs = ontology.ancestor_pairs().rename(columns={"id": "region_id"})
    rolled = (
        leaf.merge(pairs, on="region_id")
        .groupby(["ancestor_id", "hemisphere"])[["count", "volume_mm3"]]
        .sum()
    )
    wide = rolled.unstack("hemisphere", fill_value=0)
    out = pd.DataFrame(index=wide.index.rename("region_id"))
    for h, side in _HEMI.items():
        out[f"count_{side}"] = wide["count"][h] if h in wide["count"] else 0
        out[f"volume_{side}_mm3"] = wide["volume_mm3"][h] if h in wide["volume_mm3"] else 0.0
    out["count"] = wide["count"].sum(axis=1)
    out["volume_mm3"] = wide["volume_mm3"].sum(axis=1)
    out = out.reset_index()
    for col in ("count_left", "count_right", "count"):
        out[col] = out[col].astype(np.int64)
    for side in ("left", "right", None):
        suffix = f"_{side}" if side else ""
        vol = out[f"volume{suffix}_mm3"].to_numpy(float)
        cnt = out[f"count{suffix}"].to_numpy(float)
        out[f"density{suffix}_per_mm3"] = np.divide(
            cnt, vol, out=np.full(len(vol), np.nan), where=vol > 0
        )
    table = ontology.table.set_index("id")
    ids = out["region_id"].to_numpy()
    out.insert(1, "acronym", table.loc[ids, "acronym"].to_numpy())
    out.insert(2, "name", table.loc[ids, "name"].to_numpy())
    out.insert(3, "level", table.loc[ids, "depth"].to_numpy().astype(np.int64))
    out.insert(4, "parent_id", table.loc[ids, "parent_id"].to_numpy())
    return out.sort_values(["level", "region_id"], kind="stable").reset_index(drop=True)


def cell_summary(assigned: pd.DataFrame) -> dict:
    """Totals of a cell assignment: cells, outside the atlas volume, unlabelled, per side.

    Parameters
    ----------
    assigned : DataFrame
        Output of :func:`assign_regions`.

    Returns
    -------
    dict
        ``n_cells, n_outside_volume, n_unlabelled, n_in_regions, n_left, n_right``.
    """
    inside = assigned["inside_volume"].to_numpy()
    labelled = assigned["region_id"].to_numpy() != 0
    return {
        "n_cells": int(len(assigned)),
        "n_outside_volume": int((~inside).sum()),
        "n_unlabelled": int((inside & ~labelled).sum()),
        "n_in_regions": int(labelled.sum()),
        "n_left": int(((assigned["hemisphere"] == 1) & labelled).sum()),
        "n_right": int(((assigned["hemisphere"] == 2) & labelled).sum()),
    }


def quantify_cells(cells: pd.DataFrame, reg, atlas, volumes: pd.DataFrame):
    """Map detected cells to the atlas and count them per region at every level.

    Parameters
    ----------
    cells : DataFrame
        Detected cells with ``z_vox, y_vox, x_vox`` in the raw sample grid.
    reg : Registration
    atlas : Atlas
    volumes : DataFrame
        ``region_id, hemisphere, volume_mm3`` in the animal's space.

    Returns
    -------
    cells_atlas : DataFrame
        ``cells`` plus ``atlas_z_vox, atlas_y_vox, atlas_x_vox, region_id,
        hemisphere, inside_volume, acronym``.
    regions : DataFrame
        See :func:`count_regions`.
    summary : dict
        See :func:`cell_summary`.

    Raises
    ------
    InputError
        If the cells were not detected in the registered image (see
        :func:`check_cells_match_image`).
    """
    check_cells_match_image(cells, reg.sample_shape_vox, reg.sample_voxel_size_um)
    pts = cells_to_atlas(reg, cells[["z_vox", "y_vox", "x_vox"]].to_numpy(float))
    assigned = assign_regions(pts, atlas)
    cells_atlas = (
        cells.reset_index(drop=True)
        .assign(atlas_z_vox=pts[:, 0], atlas_y_vox=pts[:, 1], atlas_x_vox=pts[:, 2])
        .join(assigned)
    )
    cells_atlas["acronym"] = [
        atlas.ontology.acronym(int(r)) if r else "" for r in cells_atlas["region_id"]
    ]
    return cells_atlas, count_regions(assigned, volumes, atlas.ontology), cell_summary(assigned)
