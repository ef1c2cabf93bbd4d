"""Score a census run on a simulated study against its ground truth.

Three yardsticks, each computed from the study folder alone:

* **detection**: detected cells matched one-to-one to true cells within a
  distance (µm) in the raw sample grid → recall and precision per subject;
* **registration**: the true cells' raw positions pushed through the fitted
  registration, compared with their true atlas positions → distance in atlas
  voxels and the share assigned to their true region;
* **statistics**: each region's call (q below alpha) against the planted
  fold changes → planted effects found with the right sign, and the share of
  regions with no effect that were not called.

And :func:`score_fibres`: a fibre segmentation against the fibre simulator's truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

__all__ = ["match_points", "evaluate_census", "score_fibres"]


def match_points(true_um: np.ndarray, found_um: np.ndarray, max_distance_um: float) -> dict:
    """Match two point sets one-to-one, closest pairs first, within a distance.

    Parameters
    ----------
    true_um, found_um : ndarray, shape (N, 3) and (M, 3)
        Point coordinates in µm.
    max_distance_um : float
        Pairs farther apart are never matched.

    Returns
    -------
    dict
        ``n_true, n_found, n_matched, recall, precision, median_distance_um``.

    Examples
    --------
    >>> match_points(np.zeros((1, 3)), np.ones((1, 3)), 2.0)["recall"]
    1.0
    """
    true_um = np.asarray(true_um, float).reshape(-1, 3)
    found_um = np.asarray(found_um, float).reshape(-1, 3)
    n_true, n_found = len(true_um), len(found_um)
    matched = []
    if n_true and n_found:
        pairs = cKDTree(true_um).sparse_distance_matrix(
            cKDTree(found_um), max_distance_um, output_type="ndarray"
        )
        order = np.argsort(pairs["v"], kind="stable")
        used_t, used_f = set(), set()
        for k in order:
            i, j = int(pairs["i"][k]), int(pairs["j"][k])
            if i not in used_t and j not in used_f:
                used_t.add(i)
                used_f.add(j)
                matched.append(pairs["v"][k])
    n = len(matched)
    return {
        "n_true": n_true,
        "n_found": n_found,
        "n_matched": n,
        "recall": n / n_true if n_true else float("nan"),
        "precision": n / n_found if n_found else float("nan"),
        "median_distance_um": float(np.median(matched)) if n else float("nan"),
    }


def evaluate_census(study_dir: str | Path, *, alpha: float = 0.05) -> dict:
    """Score detection, registration and statistics of a simulated study run.

    Parameters
    ----------
    study_dir : path-like
        A folder written by :func:`ketamap.simulate.simulate_census` and run
        through :func:`ketamap.pipelines.census.run_study`.
    alpha : float
        Significance level of a call (q < alpha).

    Returns
    -------
    dict
        ``detection`` (per subject and mean recall/precision), ``registration``
        (per subject and pooled median error in atlas voxels, share of cells in
        their true region), ``statistics`` (planted effects, how many called in
        the right direction, share of no-effect regions not called) and a
        ``planted`` table as records.
    """
    from ketamap.atlas import load_atlas
    from ketamap.manifest import load_study
    from ketamap.wholebrain.register import cells_to_atlas, load_registration

    root = Path(study_dir)
    study = load_study(root / "study.toml")
    atlas = load_atlas(study.atlas_spec)
    det_rows, reg_rows, errors, correct = [], [], [], []
    for s in study.subjects:
        truth = pd.read_parquet(root / "ground_truth" / "cells" / f"{s.id}.parquet")
        found = pd.read_parquet(root / "subjects" / s.id / "detect" / "cells.parquet")
        vox = np.asarray(s.voxel_size_um)
        tol = max(10.0, 1.5 * float(vox.max()))
        m = match_points(
            truth[["z_um", "y_um", "x_um"]].to_numpy(),
            found[["z_um", "y_um", "x_um"]].to_numpy(),
            tol,
        )
        det_rows.append({"subject": s.id, **m, "tolerance_um": tol})
        reg = load_registration(root / "subjects" / s.id / "register")
        pts = cells_to_atlas(reg, truth[["z_vox", "y_vox", "x_vox"]].to_numpy(float))
        true_pts = truth[["atlas_z_vox", "atlas_y_vox", "atlas_x_vox"]].to_numpy(float)
        err = np.linalg.norm(pts - true_pts, axis=1)
        labels, _ = atlas.labels_at(pts)
        ok = labels.astype(np.int64) == truth["region_id"].to_numpy(np.int64)
        reg_rows.append(
            {
                "subject": s.id,
                "median_error_atlas_vox": float(np.median(err)),
                "p90_error_atlas_vox": float(np.percentile(err, 90)),
                "fraction_true_region": float(ok.mean()),
            }
        )
        errors.append(err)
        correct.append(ok)
    det = pd.DataFrame(det_rows)
    regs = pd.DataFrame(reg_rows)

    effects = pd.read_csv(root / "ground_truth" / "effects.csv")
    stats = pd.read_csv(root / "stats" / "regions.csv")
    merged = stats.merge(
        effects[["region_id", "contrast", "true_fold_change", "planted"]],
        on=["region_id", "contrast"],
        how="left",
    )
    merged["called"] = merged["q"] < alpha
    planted = merged[merged["planted"].eq(True)].copy()
    planted["right_direction"] = np.sign(planted["log2_fold_change"]) == np.sign(
        np.log2(planted["true_fold_change"])
    )
    planted["found"] = planted["called"] & planted["right_direction"]
    null = merged[
        merged["true_fold_change"].notna()
        & np.isclose(merged["true_fold_change"], 1.0, rtol=0, atol=1e-9)
    ]
    result = {
        "detection": {
            "recall_mean": float(det["recall"].mean()),
            "precision_mean": float(det["precision"].mean()),
            "recall_min": float(det["recall"].min()),
            "precision_min": float(det["precision"].min()),
            "per_subject": det.to_dict("records"),
        },
        "registration": {
            "median_error_atlas_vox": float(np.median(np.concatenate(errors))),
            "fraction_true_region": float(np.concatenate(correct).mean()),
            "per_subject": regs.to_dict("records"),
        },
        "statistics": {
            "n_planted": int(len(planted)),
            "n_planted_found": int(planted["found"].sum()),
            "n_null": int(len(null)),
            "fraction_null_not_called": float(1 - null["called"].mean())
            if len(null)
            else float("nan"),
            "null_called": null.loc[null["called"], ["acronym", "contrast", "q"]].to_dict(
                "records"
            ),
        },
        "planted": planted[
            [
                "acronym",
                "contrast",
                "true_fold_change",
                "fold_change",
                "q",
                "called",
                "right_direction",
            ]
        ].to_dict("records"),
    }
    return json.loads(json.dumps(result, default=_jsonable))


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return str(v)


def score_fibres(mask, skeleton, truth, *, region=None, reference=None) -> dict:
    """Score a fibre segmentation against the simulator's truth.

    Parameters
    ----------
    mask, skeleton : array_like, shape (z, y, x)
        From :func:`~ketamap.wholebrain.fibres.segment_fibres` (non-zero = fibre).
    truth : SimulatedFibres
        From :func:`~ketamap.simulate.fibres.simulate_fibres` or
        :func:`~ketamap.simulate.fibres.plant_fibres`.
    region : array_like of bool, optional
        The voxels scored (e.g. the interior and the tissue); all by default.
    reference : tuple of (mask, skeleton), optional
        The segmentation of the volume without the fibres (the tissue alone, for
        :func:`~ketamap.simulate.fibres.plant_fibres`): its voxels and length are what
        the tissue holds and are left out of the precision and the length.

    Returns
    -------
    dict
        ``recall`` (true footprint voxels found), ``precision`` (found voxels not found
        in the reference, in the footprint), ``length_ratio`` (skeleton length less the
        reference's over the true centreline length, µm along the curve as
        :func:`~ketamap.wholebrain.fibres.skeleton_lengths` measures it), ``true_length_um``.

    Raises
    ------
    InputError
        If a volume is not on the truth's grid.
    """
    from ketamap.errors import InputError
    from ketamap.simulate.fibres import true_length_table
    from ketamap.wholebrain.fibres import skeleton_lengths

    vs = truth.voxel_size_um
    shape = truth.true_mask.shape
    given = {"mask": mask, "skeleton": skeleton, "region": region}
    if reference is not None:
        given.update({"reference mask": reference[0], "reference skeleton": reference[1]})
    for name, volume in given.items():
        if volume is not None and np.shape(volume) != shape:
            raise InputError(
                f"The {name} has shape {np.shape(volume)} but the truth has shape {shape}."
            )
    region = np.ones(shape, bool) if region is None else np.asarray(region, bool)
    planted = (truth.true_mask > 0) & region
    found = (np.asarray(mask) > 0) & region
    new = found
    measured = float(skeleton_lengths(np.asarray(skeleton), vs)[region].sum())
    if reference is not None:
        new = found & ~(np.asarray(reference[0]) > 0)
        measured -= float(skeleton_lengths(np.asarray(reference[1]), vs)[region].sum())
    true_um = true_length_table(truth.points, region.astype(np.int64), None, vs)
    true_um = float(true_um.loc[true_um["region_id"] == 1, "length_um"].sum())
    return {
        "recall": int((planted & found).sum()) / max(int(planted.sum()), 1),
        "precision": int((planted & new).sum()) / max(int(new.sum()), 1),
        "length_ratio": measured / true_um if true_um > 0 else float("nan"),
        "true_length_um": true_um,
    }
