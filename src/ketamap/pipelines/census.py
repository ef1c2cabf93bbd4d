"""Run a census study: per-subject stages, then study-level statistics and report.

Layout of a study folder after ``run_study``::

    study.toml
    subjects/<id>/detect/      cells.parquet, cells.csv, cells.xml, tissue_mask.ome.zarr,
                               detection_qc.json, provenance.json
    subjects/<id>/register/    transform, registration.json, volumes.csv, qc.png, provenance.json
    subjects/<id>/quantify/    cells_atlas.parquet/.csv, regions.parquet/.csv, summary.json
                               (with tissue_atlas_dice), provenance.json
    stats/                     regions.parquet/.csv, counts.parquet/.csv, provenance.json,
                               voxel_maps/ (*.ome.zarr, *.nii.gz), voxel_clusters.parquet/.csv,
                               network_edges/_groups/_summary.parquet/.csv; with [fibres]
                               fibres, fibre_densities (.parquet/.csv), fibre_voxel_maps/,
                               fibre_voxel_clusters.parquet/.csv
    subjects/<id>/fibres/      (with [fibres]) fibre_mask.ome.zarr, skeleton.ome.zarr,
                               fibre_regions.parquet/.csv, fibre_density_atlas.ome.zarr,
                               fibre_qc.json, provenance.json
    report/                    figures/ (PNG, SVG), provenance.json
    report.html                the report (the only copy; figures embedded)
    logs/ketamap.log           the log of every `ketamap run`

Every stage writes into a temporary folder that replaces its output folder
only when complete, with a ``provenance.json`` recording the stage's
parameters, package versions and a fingerprint of its inputs. A stage whose
provenance matches is skipped, so ``run_study`` after an interruption resumes
and ends with the same outputs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.engine.stage import (
    fingerprint,
    remove_stale_temporaries,
    run_stage,
    stage_key,
    versions,
)
from ketamap.errors import InputNotFoundError, ParameterError, QCError
from ketamap.io.atomic import atomic_path, write_table
from ketamap.manifest import Study, Subject, load_study
from ketamap.params import did_you_mean, from_mapping, to_dict

__all__ = ["SUBJECT_STAGES", "STUDY_STAGES", "run_study", "run_subject"]

log = logging.getLogger(__name__)

SUBJECT_STAGES = ("detect", "register", "quantify", "fibres")
STUDY_STAGES = ("stats", "report")


# --------------------------------------------------------------------------- parameters


def stage_params(study: Study):
    """Return the validated parameters of every stage from the manifest's tables."""
    from ketamap.stats.regions import StatsParams
    from ketamap.wholebrain.detect import DetectionParams
    from ketamap.wholebrain.register import RegistrationParams

    stats_table = dict(study.params.get("stats", {}))
    stats_table.pop("covariates", None)
    stats_table.pop("voxels", None)
    stats_table.pop("network", None)
    map_params(study)  # validate [stats.voxels] and [stats.network] with the rest
    return (
        from_mapping(DetectionParams, study.params.get("detection"), where="[detection]"),
        from_mapping(RegistrationParams, study.params.get("registration"), where="[registration]"),
        from_mapping(StatsParams, stats_table, where="[stats]"),
    )


def fibre_params(study: Study):
    """Return the ``[fibres]`` parameters, or None when the manifest has no ``[fibres]``."""
    from ketamap.wholebrain.fibres import FibreParams

    table = study.params.get("fibres")
    return None if table is None else from_mapping(FibreParams, table, where="[fibres]")


def check_study(study: Study) -> dict:
    """Check a study before any compute: parameters, atlas and every subject's images.

    Loads the atlas named in the manifest, opens every image lazily (its header only,
    plus one small block to compare a signal with its background) and checks that the
    two channels of a subject have the same shape, that no two subjects share an image,
    and that no signal is its own background.

    Returns
    -------
    dict
        ``atlas`` (the loaded :class:`~ketamap.atlas.Atlas`) and ``shapes`` (subject id
        -> image shape).

    Raises
    ------
    KetamapError
        One sentence for the first problem found.
    """
    from ketamap.errors import InputError
    from ketamap.io.volumes import open_volume

    stage_params(study)
    fibre_params(study)
    atlas = _load_atlas(study.atlas_spec)
    shapes, owner = {}, {}
    for s in study.subjects:
        for path in (s.signal, s.background):
            if path is None:
                continue
            key = Path(path).resolve()
            if key in owner:
                raise InputError(
                    f'Subjects "{owner[key]}" and "{s.id}" share the image {path}; each mouse '
                    "needs its own."
                    if owner[key] != s.id
                    else f'Subject "{s.id}" gives {path} as both signal and background.'
                )
            owner[key] = s.id
        signal = open_volume(s.signal)
        shapes[s.id] = tuple(int(n) for n in signal.shape)
        if s.background is None:
            continue
        background = open_volume(s.background)
        if tuple(background.shape) != tuple(signal.shape):
            raise InputError(
                f'Subject "{s.id}": the background {s.background} has shape '
                f"{tuple(background.shape)} but the signal has {tuple(signal.shape)}."
            )
        mid = tuple(slice(n // 2, n // 2 + 1) if a == 0 else slice(0, min(n, 256))
                    for a, n in enumerate(signal.shape))  # fmt: skip
        if np.array_equal(np.asarray(signal[mid]), np.asarray(background[mid])):
            raise InputError(
                f'Subject "{s.id}": the signal {s.signal} and the background {s.background} '
                "hold the same image (their middle planes are identical)."
            )
    return {"atlas": atlas, "shapes": shapes}


def map_params(study: Study):
    """Return the checked ``[stats.voxels]`` and ``[stats.network]`` parameters."""
    from ketamap.stats.network import NetworkParams
    from ketamap.stats.voxels import VoxelParams

    table = study.params.get("stats", {})
    return (
        from_mapping(VoxelParams, table.get("voxels"), where="[stats.voxels]"),
        from_mapping(NetworkParams, table.get("network"), where="[stats.network]"),
    )


def _covariates(study: Study, subjects: pd.DataFrame) -> tuple[str, ...]:
    requested = study.params.get("stats", {}).get("covariates")
    if requested is None:
        return tuple(c for c in study.covariates if subjects[c].nunique() > 1)
    if not isinstance(requested, list) or not all(isinstance(c, str) for c in requested):
        raise ParameterError(f"covariates in [stats] must be a list of names, got {requested!r}.")
    for c in requested:
        if c not in study.covariates:
            raise ParameterError(
                f'Covariate "{c}" in [stats] is not given for every subject'
                f"{did_you_mean(c, study.covariates)}."
            )
    return tuple(requested)


# --------------------------------------------------------------------------- subject stages


@functools.lru_cache(maxsize=2)
def _load_atlas(spec: str):
    from ketamap.atlas import load_atlas

    return load_atlas(spec)


def _atlas_fingerprint(study: Study) -> str:
    path = Path(study.atlas_spec)
    return fingerprint([path]) if path.exists() else study.atlas


def subject_dir(study: Study, subject: Subject, stage: str) -> Path:
    """Output folder of one subject's stage."""
    return study.root / "subjects" / subject.id / stage


def run_subject(
    study: Study,
    subject: Subject,
    *,
    stages=SUBJECT_STAGES,
    force: bool = False,
    allow_flagged: bool = False,
) -> dict:
    """Run the per-subject stages (detect, register, quantify, fibres) for one subject.

    A subject whose detection or registration is flagged by its QC is not counted:
    quantify and fibres do not run for it unless ``allow_flagged``. The fibres stage
    runs only when the manifest has a ``[fibres]`` table.

    Returns
    -------
    dict
        ``subject``, for each stage whether it ran (True) or was skipped, ``flags`` (the
        QC reasons, as sentences) and, for a subject stopped before counting,
        ``stopped`` (True).
    """
    from ketamap.io.volumes import open_volume
    from ketamap.pipelines.census_stages import (
        detect_into,
        fibres_into,
        quantify_into,
        register_into,
    )
    from ketamap.wholebrain.classify import load_classifier

    det_params, reg_params, _ = stage_params(study)
    atlas = _load_atlas(study.atlas_spec)
    done = {"subject": subject.id}
    imaging = {"voxel_size_um": subject.voxel_size_um, "orientation": subject.orientation}

    det_out = subject_dir(study, subject, "detect")
    if "detect" in stages:

        def detect(tmp: Path) -> dict:
            return detect_into(
                tmp,
                open_volume(subject.signal),
                voxel_size_um=subject.voxel_size_um,
                params=det_params,
                background=open_volume(subject.background) if subject.background else None,
                classifier=load_classifier(study.classifier) if study.classifier else None,
            )

        done["detect"] = run_stage(
            det_out,
            "detect",
            {
                "inputs": fingerprint([subject.signal, subject.background]),
                "params": to_dict(det_params),
                "imaging": imaging,
                "classifier": fingerprint([study.classifier]) if study.classifier else None,
            },
            detect,
            force=force,
        ).ran

    reg_out = subject_dir(study, subject, "register")
    if "register" in stages:

        def register(tmp: Path) -> dict:
            return register_into(
                tmp,
                open_volume(subject.background or subject.signal),
                atlas,
                voxel_size_um=subject.voxel_size_um,
                orientation=subject.orientation,
                params=reg_params,
                title=subject.id,
            )

        done["register"] = run_stage(
            reg_out,
            "register",
            {
                "inputs": fingerprint([subject.background or subject.signal]),
                "atlas": _atlas_fingerprint(study),
                "params": to_dict(reg_params),
                "imaging": imaging,
            },
            register,
            force=force,
        ).ran

    if "quantify" in stages:
        done["flags"] = subject_flags(det_out, reg_out)
        if atlas.synthetic_reference and any(f.startswith("registration") for f in done["flags"]):
            done["flags"].append(
                "the atlas reference is synthetic (made from the annotation, not an image): a "
                "real brain cannot be registered to it; rebuild the atlas with --reference"
            )
        if done["flags"] and not allow_flagged:
            done["stopped"] = True
            log.warning("%s: stopped before counting: %s", subject.id, "; ".join(done["flags"]))
            return done

        def quantify(tmp: Path) -> dict:
            return quantify_into(tmp, pd.read_parquet(det_out / "cells.parquet"), reg_out, atlas,
                                 tissue_dir=det_out, proofread=subject.proofread)  # fmt: skip

        material = {
            "detect": stage_key(det_out),
            "register": stage_key(reg_out),
            "atlas": _atlas_fingerprint(study),
        }
        if subject.proofread is not None:  # (absent otherwise: earlier outputs stay valid)
            material["proofread"] = fingerprint([subject.proofread])
        done["quantify"] = run_stage(
            subject_dir(study, subject, "quantify"),
            "quantify",
            material,
            quantify,
            force=force,
        ).ran

    fib_params = fibre_params(study)
    if "fibres" in stages and fib_params is not None:

        def fibres(tmp: Path) -> dict:
            from ketamap.wholebrain.tissue import read_tissue_mask

            return fibres_into(
                tmp,
                open_volume(subject.fibre_channel),
                voxel_size_um=subject.voxel_size_um,
                params=fib_params,
                background=open_volume(subject.background) if subject.background else None,
                tissue=read_tissue_mask(det_out),
                somata=pd.read_parquet(det_out / "cells.parquet"),
                registration_dir=reg_out,
                atlas=atlas,
            )

        done["fibres"] = run_stage(
            subject_dir(study, subject, "fibres"),
            "fibres",
            {
                "inputs": fingerprint([subject.fibre_channel, subject.background]),
                "params": to_dict(fib_params),
                "imaging": imaging,
                "detect": stage_key(det_out),
                "register": stage_key(reg_out),
                "atlas": _atlas_fingerprint(study),
            },
            fibres,
            force=force,
        ).ran
    return done


def _describe(res: dict) -> str:
    """One line for a subject's progress: the stages run, skipped or stopped."""
    ran = [k for k in SUBJECT_STAGES if res.get(k) is True]
    if res.get("stopped"):
        return f"{res['subject']}: stopped before counting (QC flagged)"
    if not ran:
        return f"{res['subject']}: up to date, skipped"
    return f"{res['subject']}: {', '.join(ran)}"


def subject_flags(detect_dir: Path, register_dir: Path) -> list[str]:
    """Return the QC flags of a subject's detection and registration, one sentence each.

    Read from the stages' outputs (``provenance.json`` of detect, ``registration.json``);
    outputs written before detection had a flag carry none.
    """
    flags = []
    prov = Path(detect_dir) / "provenance.json"
    if prov.exists():
        found = json.loads(prov.read_text()).get("result", {})
        flags += [f"detection flagged: {r}" for r in found.get("reasons", [])]
    meta = Path(register_dir) / "registration.json"
    if meta.exists():
        qc = json.loads(meta.read_text()).get("qc", {})
        flags += [f"registration flagged: {r}" for r in qc.get("reasons", [])]
    return flags


def _run_subject_job(
    manifest: str, subject_id: str, stages, force: bool, threads: int, allow_flagged: bool
) -> dict:
    import dask
    import SimpleITK as sitk

    from ketamap.engine.scheduler import distributed_active

    study = load_study(manifest)
    subject = next(s for s in study.subjects if s.id == subject_id)
    run = functools.partial(
        run_subject, study, subject, stages=stages, force=force, allow_flagged=allow_flagged
    )
    if distributed_active():  # chunks go to the cluster's workers, not to local threads
        return run()
    # each job gets its share of the cores, for dask and for ITK alike
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    with dask.config.set(scheduler="threads", num_workers=threads):
        return run()


# --------------------------------------------------------------------------- study stages


def _subtrees(ontology, acronyms) -> set[int]:
    """Ids of the regions named by ``acronyms`` and everything below them (absent ones: none)."""
    ids: set[int] = set()
    for acronym in acronyms:
        if acronym in ontology:
            ids.update(ontology.descendants(ontology.lookup(acronym), include_self=True))
    return ids


def _long_counts(study: Study) -> pd.DataFrame:
    frames = []
    for s in study.subjects:
        t = pd.read_parquet(subject_dir(study, s, "quantify") / "regions.parquet")
        frames.append(
            t[["region_id", "acronym", "level", "count", "volume_mm3", "density_per_mm3"]].assign(
                subject=s.id
            )
        )
    counts = pd.concat(frames, ignore_index=True)
    return counts[counts["volume_mm3"] > 0]


def run_stats(study: Study, *, force: bool = False) -> bool:
    """Compare groups per region, map densities voxel-wise and compare correlation networks.

    Writes ``stats/regions``, ``stats/counts``, ``stats/subjects``,
    ``stats/voxel_maps/*.ome.zarr`` and ``*.nii.gz`` (brain mask, mean density
    per group, and per contrast log2 fold change, t and FWE-corrected p),
    ``stats/voxel_clusters``, ``stats/network_edges``,
    ``stats/network_groups``, ``stats/network_summary`` and, with ``[fibres]``,
    ``stats/fibres`` (fibre length density and voxel fraction compared per region by
    :func:`ketamap.stats.densities.compare_densities`) and ``stats/fibre_densities``
    (the per-mouse values) (Parquet + CSV), and ``stats/fibre_voxel_maps/`` and
    ``stats/fibre_voxel_clusters`` (the voxel maps and FWE test of the fibre length
    density, from each subject's map in atlas space, as for the cells).
    A voxel test or network that the design cannot support (e.g. fewer than
    3 mice per group for a network) is skipped with a warning and the reason
    is recorded in ``provenance.json``.
    """
    from ketamap.errors import StatsError
    from ketamap.stats.network import compare_networks
    from ketamap.stats.regions import compare_regions
    from ketamap.stats.voxel_maps import write_voxel_maps

    check_outputs_exist(study, "stats")
    _, _, stats_params = stage_params(study)
    fib_params = fibre_params(study)
    voxel_params, network_params = map_params(study)
    subjects = study.subjects_table()
    covariates = _covariates(study, subjects)

    def stats(tmp: Path) -> dict:
        counts = _long_counts(study)
        untested = _subtrees(_load_atlas(study.atlas_spec).ontology, stats_params.untested_regions)
        counts = counts[~counts["region_id"].isin(untested)]
        regions = compare_regions(
            counts,
            subjects,
            reference_group=study.reference_group,
            covariates=covariates,
            params=stats_params,
        )
        write_table(regions, tmp / "regions.parquet")
        write_table(counts, tmp / "counts.parquet")
        write_table(subjects, tmp / "subjects.parquet")
        n_called = int((regions["q"] < stats_params.alpha).sum())
        result = {"n_rows": len(regions), "n_called": n_called, "n_untested_regions": len(untested)}
        if voxel_params.enabled:
            try:
                cells = [
                    pd.read_parquet(
                        subject_dir(study, s, "quantify") / "cells_atlas.parquet",
                        columns=["atlas_z_vox", "atlas_y_vox", "atlas_x_vox", "region_id"],
                    )
                    for s in study.subjects
                ]
                result["voxels"] = write_voxel_maps(
                    cells,
                    [s.group for s in study.subjects],
                    study.reference_group,
                    _load_atlas(study.atlas_spec),
                    voxel_params,
                    tmp,
                )
            except StatsError as e:
                log.warning("voxel maps skipped: %s", e)
                result["voxels"] = {"skipped": str(e)}
        if fib_params is not None:
            result["fibres"] = _fibre_stats(study, subjects, covariates, tmp)
            if voxel_params.enabled:
                result["fibre_voxels"] = _fibre_voxel_maps(study, voxel_params, tmp)
        if network_params.enabled:
            try:
                net = compare_networks(counts, subjects, reference_group=study.reference_group,
                                       params=network_params)  # fmt: skip
                write_table(net.edges, tmp / "network_edges.parquet")
                write_table(net.networks, tmp / "network_groups.parquet")
                write_table(net.summary, tmp / "network_summary.parquet")
                result["network"] = net.summary.to_dict("records")
            except StatsError as e:
                log.warning("network comparison skipped: %s", e)
                result["network"] = {"skipped": str(e)}
        return result

    ran = run_stage(
        study.root / "stats",
        "stats",
        {
            "quantify": [stage_key(subject_dir(study, s, "quantify")) for s in study.subjects],
            **(
                {"fibres": [stage_key(subject_dir(study, s, "fibres")) for s in study.subjects]}
                if fib_params is not None
                else {}
            ),
            "subjects": subjects.to_dict("records"),
            "covariates": covariates,
            "params": to_dict(stats_params),
            "voxels": to_dict(voxel_params),
            "network": to_dict(network_params),
            "atlas": _atlas_fingerprint(study) if voxel_params.enabled else None,
            "reference_group": study.reference_group,
        },
        stats,
        force=force,
    ).ran
    return ran


#: The per-region fibre measures compared between groups (docs/fibres.md).
FIBRE_MEASURES = ("length_density_mm_per_mm3", "voxel_fraction")


def _fibre_stats(study: Study, subjects: pd.DataFrame, covariates, tmp: Path) -> dict:
    """Compare fibre density between groups per region; writes ``stats/fibres``."""
    from ketamap.stats.densities import compare_densities

    frames = []
    for s in study.subjects:
        path = subject_dir(study, s, "fibres") / "fibre_regions.parquet"
        if not path.exists():
            raise InputNotFoundError(
                f'Subject "{s.id}" has no fibre table yet; run "ketamap run" before "stats".'
            )
        frames.append(pd.read_parquet(path).assign(subject=s.id))
    table = pd.concat(frames, ignore_index=True)
    table = table[table["volume_mm3"] > 0]
    results = [
        compare_densities(
            table, subjects, reference_group=study.reference_group, value=m, covariates=covariates
        ).assign(measure=m)
        for m in FIBRE_MEASURES
    ]
    found = pd.concat(results, ignore_index=True)
    found = found[["measure", *[c for c in found.columns if c != "measure"]]]
    write_table(found, tmp / "fibres.parquet")
    keep = ["subject", "region_id", "acronym", "level", "volume_mm3", *FIBRE_MEASURES]
    write_table(table[keep], tmp / "fibre_densities.parquet")
    return {"n_rows": len(found), "n_called": int(found["called"].sum())}


def _fibre_voxel_maps(study: Study, params, tmp: Path) -> dict:
    """Voxel maps of fibre length density and their FWE test; writes ``stats/fibre_voxel_*``.

    The subjects' atlas-space maps (``fibres/fibre_density_atlas.ome.zarr``) become
    weighted points and go through the cells' :func:`write_voxel_maps` (same grid,
    kernel, log offset and test), with the outputs' names prefixed ``fibre_``.
    """
    from ketamap.errors import StatsError
    from ketamap.io.volumes import open_volume
    from ketamap.stats.voxel_maps import map_points, write_voxel_maps
    from ketamap.wholebrain.fibres import FIBRE_DENSITY_ATLAS_FILE

    atlas = _load_atlas(study.atlas_spec)
    points = []
    for s in study.subjects:
        path = subject_dir(study, s, "fibres") / FIBRE_DENSITY_ATLAS_FILE
        if not path.exists():
            reason = (
                f'subject "{s.id}" has no fibre map in atlas space (its fibres stage ran '
                'before the map was made); run "ketamap run --force" to make it'
            )
            log.warning("fibre voxel maps skipped: %s", reason)
            return {"skipped": reason}
        points.append(map_points(open_volume(path), atlas.annotation, atlas.resolution_um))
    try:
        groups = [s.group for s in study.subjects]
        return write_voxel_maps(points, groups, study.reference_group, atlas, params, tmp,
                                weight="length_mm", prefix="fibre_")  # fmt: skip
    except StatsError as e:
        log.warning("fibre voxel maps skipped: %s", e)
        return {"skipped": str(e)}


def _qc_table(study: Study) -> pd.DataFrame:
    rows = []
    for s in study.subjects:
        det = json.loads((subject_dir(study, s, "detect") / "provenance.json").read_text())
        reg = json.loads((subject_dir(study, s, "register") / "registration.json").read_text())
        summ = json.loads((subject_dir(study, s, "quantify") / "summary.json").read_text())
        qc = reg.get("qc", {})
        found = det["result"]  # folders from before the tissue mask lack its keys: None
        rows.append(
            {
                "subject": s.id,
                "group": s.group,
                "n_cells": found["n_cells"],
                "n_outside_tissue": found.get("n_outside_tissue"),
                "n_below_tissue_floor": found.get("n_below_tissue_floor"),
                "tissue_fraction": found.get("tissue_fraction"),
                "n_in_regions": summ["n_in_regions"],
                "n_outside_volume": summ["n_outside_volume"],
                "n_unlabelled": summ["n_unlabelled"],
                "registration_correlation": qc.get("correlation_after"),
                "registration_dice": qc.get("dice_brain_mask"),
                "tissue_atlas_dice": summ.get("tissue_atlas_dice"),
                "n_proofread": summ.get("n_proofread"),
                "proofread_precision": summ.get("proofread_precision"),
                "detection_flagged": bool(found.get("flagged", False)),
                "detection_reasons": "; ".join(found.get("reasons", [])),
                "registration_flagged": bool(qc.get("flagged", False)),
                "registration_reasons": "; ".join(qc.get("reasons", [])),
            }
        )
    table = pd.DataFrame(rows)
    whole = ("n_outside_tissue", "n_below_tissue_floor", "n_proofread")  # counts stay whole
    for col in whole:
        table[col] = table[col].astype("Int64")
    for col in ("tissue_fraction", "tissue_atlas_dice", "proofread_precision"):
        table[col] = table[col].astype("Float64")
    return table


def run_report(study: Study, *, force: bool = False) -> bool:
    """Build ``<root>/report.html`` (its figures and provenance under ``report/``).

    The page is written once, at the study root (the path ``ketamap run`` prints);
    ``report/`` holds the same figures as PNG and SVG files and the stage's
    provenance. The page is written before ``report/`` is replaced, so an interrupted
    run leaves a provenance that no longer matches and the next run rebuilds both; a
    missing page is rebuilt too.
    """
    from ketamap.report import render_report, save_figures
    from ketamap.report.census import fibre_sections, map_sections
    from ketamap.report.figures import figure_bytes
    from ketamap.report.qc import QC_BOUNDARY_LEVEL

    check_outputs_exist(study, "report")
    if not (study.root / "stats" / "regions.parquet").exists():
        raise InputNotFoundError('No statistics yet; run "ketamap stats" or "ketamap run" first.')
    det_params, reg_params, stats_params = stage_params(study)
    voxel_params, network_params = map_params(study)
    truth_file = study.root / "ground_truth" / "effects.csv"
    final = study.root / "report.html"

    def report(tmp: Path) -> dict:
        regions = pd.read_parquet(study.root / "stats" / "regions.parquet")
        counts = pd.read_parquet(study.root / "stats" / "counts.parquet")
        subjects = pd.read_parquet(study.root / "stats" / "subjects.parquet")
        truth = pd.read_csv(truth_file) if truth_file.exists() else None
        present = set(counts["acronym"])
        key = tuple(a for a in study.key_regions if a in present)
        images = {}
        for s in study.subjects:
            reg_dir = subject_dir(study, s, "register")
            images[f"registration/{s.id}"] = (reg_dir / "qc.png").read_bytes()
            if (reg_dir / "qc_checkerboard.png").exists():
                images[f"checkerboard/{s.id}"] = (reg_dir / "qc_checkerboard.png").read_bytes()
        methods = {
            "versions": versions(),
            "detection": to_dict(det_params),
            "registration": to_dict(reg_params),
            "stats": to_dict(stats_params),
            "atlas": study.atlas,
        }
        if stats_params.dispersion_prior_df is None and "dispersion_prior_df" in regions.attrs:
            methods["stats"]["dispersion_prior_df_estimated"] = regions.attrs["dispersion_prior_df"]
        if (study.root / "stats" / "voxel_maps").is_dir():
            methods["voxels"] = to_dict(voxel_params)
        if (study.root / "stats" / "network_edges.parquet").exists():
            methods["network"] = to_dict(network_params)
        map_figures, map_tables = map_sections(
            study.root / "stats",
            _load_atlas(study.atlas_spec),
            regions,
            key_regions=study.key_regions,
            alpha=stats_params.alpha,
            voxel_alpha=voxel_params.alpha,
            network_alpha=network_params.alpha,
        )
        fibre_figures, fibre_tables = fibre_sections(
            study.root / "stats", alpha=stats_params.alpha, voxel_alpha=voxel_params.alpha,
            orientation=_load_atlas(study.atlas_spec).orientation,
        )  # fmt: skip
        map_figures, map_tables = map_figures + fibre_figures, map_tables + fibre_tables
        html = render_report(
            study={
                "name": study.name,
                "marker": study.marker,
                "atlas": study.atlas,
                "reference_group": study.reference_group,
                "groups": [
                    {
                        "name": g.name,
                        "dose_mg_per_kg": g.dose_mg_per_kg,
                        "schedule": f"{g.schedule}, {g.duration_days} d",
                    }
                    for g in study.groups
                ],
            },
            subjects=subjects,
            qc=_qc_table(study),
            regions=regions,
            counts=counts,
            truth=truth,
            key_regions=key,
            images=images,
            methods=methods,
            extra_figures=map_figures,
            extra_tables=map_tables,
            figure_folder="report/figures",
            qc_boundary_level=QC_BOUNDARY_LEVEL,
        )
        save_figures(regions, counts, subjects, tmp / "figures", key_regions=key)
        for name, fig, _ in map_figures:
            for fmt in ("png", "svg"):
                (tmp / "figures" / f"{name}.{fmt}").write_bytes(figure_bytes(fig, fmt))
        with atomic_path(final) as page:
            page.write_text(html, encoding="utf-8")
        return {"bytes": len(html), "page": final.name}

    remove_stale_temporaries(final)
    ran = run_stage(
        study.root / "report",
        "report",
        {
            "stats": stage_key(study.root / "stats"),
            "truth": fingerprint([truth_file]) if truth_file.exists() else None,
            "atlas": _atlas_fingerprint(study),
        },
        report,
        force=force or not final.exists(),
    ).ran
    return ran


# --------------------------------------------------------------------------- whole study


@dataclass(frozen=True)
class RunSummary:
    """What a run did: per subject and stage, whether it ran or was up to date."""

    subjects: tuple[dict, ...]
    stats_ran: bool
    report_ran: bool
    seconds: float


def run_study(
    manifest: str | os.PathLike,
    *,
    stages: Iterable[str] | None = None,
    n_jobs: int = 1,
    force: bool = False,
    allow_flagged: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run every stage of a study, skipping what is up to date.

    Parameters
    ----------
    manifest : path-like
        The study manifest (TOML).
    stages : iterable of str, optional
        Subset of ``detect, register, quantify, fibres, stats, report`` (all by default).
    n_jobs : int
        Subjects processed in parallel (processes); each uses
        ``max(1, cpu_count // n_jobs)`` threads. Ignored when a
        ``dask.distributed`` client is active (see
        :func:`ketamap.engine.scheduler.use_scheduler`): subjects then run in turn,
        each spread over the cluster.
    force : bool
        Recompute even when outputs are up to date.
    allow_flagged : bool
        Count subjects whose detection or registration QC is flagged (the report marks
        them). Without it such a subject is stopped before counting, the other subjects
        are finished, and the run ends with :class:`~ketamap.errors.QCError`.
    progress : callable, optional
        Called with a subject id when its stages are done, and with
        ``"stats"`` / ``"report"``.

    Returns
    -------
    RunSummary

    Raises
    ------
    QCError
        If subjects were stopped by their QC flags (without ``allow_flagged``).
    KetamapError
        For an invalid manifest, missing inputs or a failed stage.
    """
    valid = SUBJECT_STAGES + STUDY_STAGES
    stages = tuple(stages) if stages is not None else valid
    for s in stages:
        if s not in valid:
            raise ParameterError(
                f'Unknown stage "{s}"{did_you_mean(s, valid)}; stages: {", ".join(valid)}.'
            )
    if n_jobs < 1:
        raise ParameterError(f"n_jobs must be at least 1, got {n_jobs}.")
    t0 = time.perf_counter()
    study = load_study(manifest)
    check_study(study)  # parameters, atlas and images, before any work
    sub_stages = tuple(s for s in stages if s in SUBJECT_STAGES)
    results = []
    if sub_stages:
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        jobs = [
            (str(Path(manifest).resolve()), s.id, sub_stages, force, threads, allow_flagged)
            for s in study.subjects
        ]
        from ketamap.engine.scheduler import distributed_active, map_jobs

        # under a dask.distributed client, subjects run one after the other in this
        # process and each subject's chunks are spread over the cluster's workers
        workers = 1 if distributed_active() else n_jobs
        for res in map_jobs(_run_subject_job, jobs, workers):
            results.append(res)
            if progress:
                progress(_describe(res))
        stopped = [r for r in results if r.get("stopped")]
        if stopped:
            raise QCError(
                f"{len(stopped)} of {len(results)} subjects stopped before counting: "
                + "; ".join(f'"{r["subject"]}": {" and ".join(r["flags"])}' for r in stopped)
                + ". Look at their QC images (subjects/<id>/register/qc.png), fix the manifest "
                "and run again, or pass --allow-flagged to count them anyway (the report "
                "marks them)."
            )
    stats_ran = report_ran = False
    if "stats" in stages:
        stats_ran = run_stats(study, force=force)
        if progress:
            progress("stats" if stats_ran else "stats: up to date, skipped")
    if "report" in stages:
        report_ran = run_report(study, force=force)
        if progress:
            progress("report" if report_ran else "report: up to date, skipped")
    return RunSummary(tuple(results), stats_ran, report_ran, time.perf_counter() - t0)


def check_outputs_exist(study: Study, stage: str) -> None:
    """Raise a one-sentence error if a stage's inputs from earlier stages are missing."""
    for s in study.subjects:
        if not (subject_dir(study, s, "quantify") / "provenance.json").exists():
            raise InputNotFoundError(
                f'Subject "{s.id}" has no quantification yet; run "ketamap run" before "{stage}".'
            )
