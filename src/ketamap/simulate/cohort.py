"""Simulate a whole census study: a study folder with a manifest, volumes and truth.

``simulate_census(out_dir, ...)`` writes::

    out_dir/
      study.toml                      the manifest (groups, doses, subjects)
      data/<subject>/signal.zarr      marker channel, OME-Zarr, uint16
      data/<subject>/background.zarr  autofluorescence channel
      ground_truth/cells/<subject>.parquet   every true cell (sample and atlas voxels)
      ground_truth/transforms/<subject>.npz  the true sample→atlas transform
      ground_truth/artefacts/<subject>.npz   imaging artefacts, when any are on
                                      (see SimulatedBrain.artefacts)
      ground_truth/counts.csv         true cell counts per subject and leaf region
      ground_truth/effects.csv        true fold change per region and contrast
      ground_truth/scenario.json      scenario, parameters, seeds

Each subject is written atomically and skipped when already complete with the
same parameters, so an interrupted simulation resumes where it stopped.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.engine.scheduler import map_jobs
from ketamap.engine.stage import run_stage
from ketamap.io.atomic import atomic_path, write_json
from ketamap.params import to_dict
from ketamap.simulate.brain import BrainParams, region_fold_and_density, simulate_brain
from ketamap.simulate.scenarios import Scenario, get_scenario

__all__ = ["simulate_census", "true_effects", "subject_ids"]

log = logging.getLogger(__name__)


def subject_ids(scenario: Scenario, n_per_group: int) -> list[tuple[str, str]]:
    """Return ``(subject_id, group)`` pairs, e.g. ``("ket30-02", "ket30")``."""
    return [
        (f"{g.name}-{i:02d}", g.name) for g in scenario.groups for i in range(1, n_per_group + 1)
    ]


def true_effects(atlas, scenario: Scenario) -> pd.DataFrame:
    """Return the true fold change of every region (all levels) for every contrast.

    A parent's fold change is the baseline-count-weighted mean of its leaves'
    (what a perfect count of the parent would show).

    Returns
    -------
    DataFrame
        ``acronym, region_id, level, contrast, true_fold_change, planted``
        where ``planted`` marks the acronyms listed in the scenario.
    """
    onto = atlas.ontology
    vol = atlas.region_volumes_mm3().groupby("id", as_index=False)["volume_mm3"].sum()
    leaves = vol["id"].to_numpy()
    rows = []
    pairs = onto.ancestor_pairs()
    for g in scenario.groups[1:]:
        density, fold = region_fold_and_density(
            onto,
            leaves,
            densities=scenario.densities_per_mm3,
            default_density=scenario.default_density_per_mm3,
            zero_density=scenario.zero_density,
            fold_changes=g.fold_changes,
        )
        base = density * vol["volume_mm3"].to_numpy()
        leaf = pd.DataFrame({"id": leaves, "base": base, "treated": base * fold})
        agg = leaf.merge(pairs, on="id").groupby("ancestor_id")[["base", "treated"]].sum()
        agg = agg[agg["base"] > 0]
        planted = {onto.lookup(a) for a in g.fold_changes}
        for rid, r in agg.iterrows():
            rows.append(
                {
                    "acronym": onto.acronym(int(rid)),
                    "region_id": int(rid),
                    "level": onto.depth(int(rid)),
                    "contrast": f"{g.name}_vs_{scenario.reference_group}",
                    "true_fold_change": float(r["treated"] / r["base"]),
                    "planted": int(rid) in planted,
                }
            )
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=2)
def _atlas(spec: str):
    from ketamap.atlas import load_atlas

    return load_atlas(spec)


def _simulate_one(
    out_dir: str,
    atlas_spec: str,
    subject: str,
    group: str,
    scenario_name: str,
    params: BrainParams,
    seed: int,
    material: dict,
) -> dict:
    out = Path(out_dir)
    stage = run_stage(
        out / "data" / subject,
        f"simulate {subject}",
        material,
        functools.partial(
            _simulate_brain, out, atlas_spec, subject, group, scenario_name, params, seed
        ),
    )
    return {"subject": subject} | stage.result


def _simulate_brain(
    out: Path,
    atlas_spec: str,
    subject: str,
    group: str,
    scenario_name: str,
    params: BrainParams,
    seed: int,
    tmp: Path,
) -> dict:
    """Simulate one brain: its ground truth beside the study, its images into ``tmp``."""
    from ketamap.io.volumes import write_ome_zarr

    atlas = _atlas(atlas_spec)
    scenario = get_scenario(scenario_name)
    design = next(g for g in scenario.groups if g.name == group)
    brain = simulate_brain(
        atlas,
        fold_changes=design.fold_changes,
        densities=scenario.densities_per_mm3,
        default_density=scenario.default_density_per_mm3,
        zero_density=scenario.zero_density,
        params=params,
        seed=seed,
    )
    truth = out / "ground_truth"
    cells = brain.cells.assign(subject=subject)
    with atomic_path(truth / "cells" / f"{subject}.parquet") as part:
        cells.to_parquet(part, index=False)
    tf = {k: np.asarray(v) for k, v in brain.transform.items()}
    with atomic_path(truth / "transforms" / f"{subject}.npz") as part:
        with open(part, "wb") as fh:
            np.savez(fh, **tf)
    if brain.artefacts:
        with atomic_path(truth / "artefacts" / f"{subject}.npz") as part:
            with open(part, "wb") as fh:
                np.savez_compressed(fh, **{k: np.asarray(v) for k, v in brain.artefacts.items()})
    counts = brain.expected_counts.assign(subject=subject, group=group)
    with atomic_path(truth / "counts" / f"{subject}.csv") as part:
        counts.to_csv(part, index=False)
    write_ome_zarr(brain.signal, tmp / "signal.zarr", voxel_size_um=brain.voxel_size_um)
    write_ome_zarr(brain.background, tmp / "background.zarr", voxel_size_um=brain.voxel_size_um)
    return {"seed": seed, "n_cells": len(cells), "shape": list(brain.signal.shape)}


def simulate_census(
    out_dir: str | os.PathLike,
    *,
    atlas: str = "phantom",
    scenario: str = "ketamine-10day",
    n_per_group: int = 4,
    params: BrainParams | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a simulated census study folder and return the path of its manifest.

    Parameters
    ----------
    out_dir : path-like
        The study folder (created; existing complete subjects are kept).
    atlas : str
        Atlas specification (see :func:`ketamap.atlas.load_atlas`).
    scenario : str
        Built-in scenario name (see :data:`ketamap.simulate.SCENARIOS`).
    n_per_group : int
        Mice per group (at least 2).
    params : BrainParams
        Imaging and anatomy parameters shared by every brain.
    seed : int
        Master seed; subject ``i`` uses ``seed * 1000 + i``.
    n_jobs : int
        Brains simulated in parallel (processes).
    progress : callable, optional
        Called with the subject id after each brain is written.

    Returns
    -------
    Path
        ``out_dir / "study.toml"``.
    """
    from ketamap.errors import ParameterError
    from ketamap.manifest import Group, Imaging, Study, Subject, study_to_toml

    if not isinstance(n_per_group, int) or n_per_group < 2:
        raise ParameterError(f"n_per_group must be an integer of at least 2, got {n_per_group!r}.")
    params = BrainParams() if params is None else params
    scen = get_scenario(scenario)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    atlas_obj = _atlas(atlas)
    if atlas_obj.reference is None:
        # Tissue contrast is needed to image the brains and to register them: store the
        # atlas in the study as a BrainGlobe folder, which carries a synthetic reference.
        from ketamap.atlas import write_brainglobe

        found = sorted((out / "atlas").glob("*/metadata.json"))
        folder = found[0].parent if found else write_brainglobe(atlas_obj, out / "atlas")
        atlas = str(folder)
        atlas_obj = _atlas(atlas)
    ids = subject_ids(scen, n_per_group)
    settings = {"atlas": atlas, "scenario": scenario, "params": to_dict(params), "seed": seed}
    jobs = []
    for i, (sid, group) in enumerate(ids):
        material = settings | {"subject": sid, "index": i}
        jobs.append((str(out), atlas, sid, group, scenario, params, seed * 1000 + i, material))
    for res in map_jobs(_simulate_one, jobs, n_jobs):
        if progress:
            progress(res["subject"])

    truth = out / "ground_truth"
    counts = pd.concat([pd.read_csv(truth / "counts" / f"{sid}.csv") for sid, _ in ids])
    counts["acronym"] = [atlas_obj.ontology.acronym(int(r)) for r in counts["region_id"]]
    with atomic_path(truth / "counts.csv") as tmp:
        counts.to_csv(tmp, index=False)
    effects = true_effects(atlas_obj, scen)
    with atomic_path(truth / "effects.csv") as tmp:
        effects.to_csv(tmp, index=False)
    write_json(
        settings
        | {
            "scenario_description": scen.description,
            "groups": [to_dict_group(g) for g in scen.groups],
        },
        truth / "scenario.json",
    )

    try:
        atlas_spec = Path(atlas).resolve().relative_to(out).as_posix()
    except (ValueError, OSError):
        atlas_spec = atlas
    study = Study(
        name=scen.name,
        atlas=atlas_spec,
        marker=scen.marker,
        reference_group=scen.reference_group,
        imaging=Imaging(params.voxel_size_um, params.orientation, scen.marker, "autofluorescence"),
        groups=tuple(
            Group(g.name, g.dose_mg_per_kg, g.schedule, g.duration_days, g.description)
            for g in scen.groups
        ),
        subjects=tuple(
            Subject(
                sid,
                group,
                out / "data" / sid / "signal.zarr",
                out / "data" / sid / "background.zarr",
                params.voxel_size_um,
                params.orientation,
                {"sex": "M", "batch": 1 + (k % 2)},
            )
            for k, (sid, group) in enumerate(ids)
        ),
        root=out,
        params={"detection": {"soma_diameter_um": params.soma_diameter_um}},
    )
    manifest = out / "study.toml"
    with atomic_path(manifest) as tmp:
        tmp.write_text(study_to_toml(study), encoding="utf-8")
    return manifest


def to_dict_group(g) -> dict:
    """Return a scenario group as a JSON-ready dict."""
    return {
        "name": g.name,
        "dose_mg_per_kg": g.dose_mg_per_kg,
        "schedule": g.schedule,
        "duration_days": g.duration_days,
        "fold_changes": dict(g.fold_changes),
    }
