"""Run a census study: per-subject stages, then study-level statistics and report.

Layout of a study folder after ``run_study``::

    study.toml
    subjects/<id>/detect/      cells.parquet, cells.csv, cells.xml, provenance.json
    subjects/<id>/register/    transform, registration.json, volumes.csv, qc.png, provenance.json
    subjects/<id>/quantify/    cells_atlas.parquet/.csv, regions.parquet/.csv, summary.json, provenance.json
    stats/                     regions.parquet/.csv, counts.parquet/.csv, provenance.json
    report/                    figures (PNG, SVG), provenance.json
    report.html

Every stage writes into a temporary folder that replaces its output folder
only when complete, with a ``provenance.json`` recording the stage's
parameters, package versions and a fingerprint of its inputs. A stage whose
provenance matches is skipped, so ``run_study`` after an interruption resumes
and ends with the same outputs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputNotFoundError, ParameterError
from ketamap.io.atomic import atomic_dir, atomic_path, write_json, write_table
from ketamap.params import did_you_mean, from_mapping, to_dict
from ketamap.study import Study, Subject, load_study

__all__ = ["SUBJECT_STAGES", "STUDY_STAGES", "run_study", "run_subject", "fingerprint", "versions"]

log = logging.getLogger(__name__)

SUBJECT_STAGES = ("detect", "register", "quantify")
STUDY_STAGES = ("stats", "report")
KEY_REGIONS = ("VTA", "SNc", "SNr", "ZI", "DR", "DMH", "MPN", "PVH", "ARH", "VMH", "LHA")
_PACKAGES = (
    "ketamap",
    "numpy",
    "scipy",
    "scikit-image",
    "dask",
    "pandas",
    "SimpleITK",
    "statsmodels",
    "brainglobe-space",
    "brainglobe-atlasapi",
)


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of ketamap and the packages whose behaviour shapes its results."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint(paths: Iterable[Path | None]) -> str:
    """Hash the names, sizes and modification times of files (folders walked)."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            h.update(b"<none>")
            continue
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _key(material: dict) -> str:
    blob = json.dumps(material | {"versions": versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _stage_key(out: Path) -> str | None:
    try:
        return json.loads((out / "provenance.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def _remove_stale_temporaries(out: Path) -> None:
    """Delete what a killed run left of its temporary outputs (``.name.*.part``)."""
    import shutil

    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{out.name}.*.part"):
        log.info("removing %s left by an interrupted run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _run_stage(
    out: Path, name: str, material: dict, compute: Callable[[Path], dict], *, force: bool
) -> tuple[bool, str]:
    """Run ``compute(tmp_dir)`` unless ``out`` holds the result for the same inputs."""
    key = _key(material)
    _remove_stale_temporaries(out)
    if not force and _stage_key(out) == key:
        log.info("%s: up to date, skipped (%s)", name, out)
        return False, key
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        result = compute(tmp) or {}
        write_json(
            {
                "stage": name,
                "key": key,
                "inputs": material,
                "versions": versions(),
                "seconds": round(time.perf_counter() - t0, 3),
                "result": result,
            },
            tmp / "provenance.json",
        )
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)
    return True, key


# --------------------------------------------------------------------------- parameters


def stage_params(study: Study):
    """Validated parameters of every stage from the manifest's tables."""
    from ketamap.stats.regions import StatsParams
    from ketamap.wholebrain.detect import DetectionParams
    from ketamap.wholebrain.register import RegistrationParams

    stats_table = dict(study.params.get("stats", {}))
    stats_table.pop("covariates", None)
    return (
        from_mapping(DetectionParams, study.params.get("detection"), where="[detection]"),
        from_mapping(RegistrationParams, study.params.get("registration"), where="[registration]"),
        from_mapping(StatsParams, stats_table, where="[stats]"),
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
def _atlas(spec: str, root: str):
    from ketamap.atlas import load_atlas

    path = Path(spec)
    if not path.is_absolute() and (Path(root) / path).exists():
        spec = str(Path(root) / path)
    return load_atlas(spec)


def _atlas_fingerprint(study: Study) -> str:
    path = Path(study.atlas)
    path = path if path.is_absolute() else study.root / path
    return fingerprint([path]) if path.exists() else study.atlas


def subject_dir(study: Study, subject: Subject, stage: str) -> Path:
    """Output folder of one subject's stage."""
    return study.root / "subjects" / subject.id / stage


def write_registration(
    folder: Path, reg, atlas, image, *, voxel_size_um, orientation: str, title: str
) -> None:
    """Write a registration with its region volumes in sample space and its QC images.

    Writes the transform and ``registration.json`` (QC numbers),
    ``volumes_by_label.parquet`` (leaf label, hemisphere, volume in mm³ in the
    animal's own space), ``volumes.csv`` (acronym, left and right volume),
    ``qc.png`` (atlas boundaries over the sample in three planes) and, when the
    atlas has a reference, ``qc_checkerboard.png`` (sample vs warped reference).
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
        png.write_bytes(registration_overlay_png(prepared, labels, title=title))
    if atlas.reference is not None:
        warped = warp_image_to_sample(reg, atlas.reference)
        with atomic_path(folder / "qc_checkerboard.png") as png:
            png.write_bytes(registration_checkerboard_png(prepared, warped, title=title))


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
        See :func:`ketamap.wholebrain.quantify.count_regions`.
    summary : dict
        See :func:`ketamap.wholebrain.quantify.cell_summary`.
    """
    from ketamap.wholebrain.quantify import assign_regions, cell_summary, count_regions
    from ketamap.wholebrain.register import cells_to_atlas

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


def run_subject(
    study: Study, subject: Subject, *, stages=SUBJECT_STAGES, force: bool = False
) -> dict:
    """Run the per-subject stages (detect, register, quantify) for one subject.

    Returns
    -------
    dict
        ``subject``, and for each stage whether it ran (True) or was skipped.
    """
    from ketamap.io.points import write_cells
    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.detect import detect_cells
    from ketamap.wholebrain.register import load_registration, register_to_atlas

    det_params, reg_params, _ = stage_params(study)
    atlas = _atlas(study.atlas, str(study.root))
    done = {"subject": subject.id}
    imaging = {"voxel_size_um": subject.voxel_size_um, "orientation": subject.orientation}

    det_out = subject_dir(study, subject, "detect")
    if "detect" in stages:

        def detect(tmp: Path) -> dict:
            signal = open_volume(subject.signal)
            background = open_volume(subject.background) if subject.background else None
            cells = detect_cells(
                signal,
                voxel_size_um=subject.voxel_size_um,
                params=det_params,
                background=background,
            )
            write_cells(cells, tmp)
            return {"n_cells": len(cells), "shape": list(signal.shape)}

        done["detect"], _ = _run_stage(
            det_out,
            "detect",
            {
                "inputs": fingerprint([subject.signal, subject.background]),
                "params": to_dict(det_params),
                "imaging": imaging,
            },
            detect,
            force=force,
        )

    reg_out = subject_dir(study, subject, "register")
    if "register" in stages:

        def register(tmp: Path) -> dict:
            image = open_volume(subject.background or subject.signal)
            reg = register_to_atlas(
                image,
                atlas.reference,
                voxel_size_um=subject.voxel_size_um,
                orientation=subject.orientation,
                atlas_resolution_um=atlas.resolution_um,
                atlas_orientation=atlas.orientation,
                atlas_mask=atlas.annotation > 0,
                params=reg_params,
            )
            write_registration(
                tmp,
                reg,
                atlas,
                image,
                voxel_size_um=subject.voxel_size_um,
                orientation=subject.orientation,
                title=subject.id,
            )
            return {k: v for k, v in reg.qc.items() if not isinstance(v, (list, dict))}

        done["register"], _ = _run_stage(
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
        )

    if "quantify" in stages:

        def quantify(tmp: Path) -> dict:
            cells = pd.read_parquet(det_out / "cells.parquet")
            volumes = pd.read_parquet(reg_out / "volumes_by_label.parquet")
            cells_atlas, table, summary = quantify_cells(
                cells, load_registration(reg_out), atlas, volumes
            )
            write_table(cells_atlas, tmp / "cells_atlas.parquet")
            write_table(table, tmp / "regions.parquet")
            write_json(summary, tmp / "summary.json")
            return summary

        done["quantify"], _ = _run_stage(
            subject_dir(study, subject, "quantify"),
            "quantify",
            {
                "detect": _stage_key(det_out),
                "register": _stage_key(reg_out),
                "atlas": _atlas_fingerprint(study),
            },
            quantify,
            force=force,
        )
    return done


def _run_subject_job(manifest: str, subject_id: str, stages, force: bool, threads: int) -> dict:
    import dask
    import SimpleITK as sitk

    study = load_study(manifest)
    subject = next(s for s in study.subjects if s.id == subject_id)
    # each job gets its share of the cores, for dask and for ITK alike
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    with dask.config.set(scheduler="threads", num_workers=threads):
        return run_subject(study, subject, stages=stages, force=force)


# --------------------------------------------------------------------------- study stages


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
    """Compare groups per region; writes ``stats/regions`` and ``stats/counts``."""
    from ketamap.stats.regions import compare_regions

    _, _, stats_params = stage_params(study)
    subjects = study.subjects_table()
    covariates = _covariates(study, subjects)

    def stats(tmp: Path) -> dict:
        counts = _long_counts(study)
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
        return {"n_rows": len(regions), "n_called": int((regions["q"] < stats_params.alpha).sum())}

    ran, _ = _run_stage(
        study.root / "stats",
        "stats",
        {
            "quantify": [_stage_key(subject_dir(study, s, "quantify")) for s in study.subjects],
            "subjects": subjects.to_dict("records"),
            "covariates": covariates,
            "params": to_dict(stats_params),
            "reference_group": study.reference_group,
        },
        stats,
        force=force,
    )
    return ran


def _qc_table(study: Study) -> pd.DataFrame:
    rows = []
    for s in study.subjects:
        det = json.loads((subject_dir(study, s, "detect") / "provenance.json").read_text())
        reg = json.loads((subject_dir(study, s, "register") / "registration.json").read_text())
        summ = json.loads((subject_dir(study, s, "quantify") / "summary.json").read_text())
        qc = reg.get("qc", {})
        rows.append(
            {
                "subject": s.id,
                "group": s.group,
                "n_cells": det["result"]["n_cells"],
                "n_in_regions": summ["n_in_regions"],
                "n_outside_volume": summ["n_outside_volume"],
                "n_unlabelled": summ["n_unlabelled"],
                "registration_correlation": qc.get("correlation_after"),
                "registration_dice": qc.get("dice_brain_mask"),
                "registration_flagged": bool(qc.get("flagged", False)),
                "registration_reasons": "; ".join(qc.get("reasons", [])),
            }
        )
    return pd.DataFrame(rows)


def run_report(study: Study, *, force: bool = False) -> bool:
    """Build ``report.html`` (and figures under ``report/``) from the stage outputs."""
    from ketamap.report import render_report, save_figures

    det_params, reg_params, stats_params = stage_params(study)
    truth_file = study.root / "ground_truth" / "effects.csv"

    def report(tmp: Path) -> dict:
        regions = pd.read_parquet(study.root / "stats" / "regions.parquet")
        counts = pd.read_parquet(study.root / "stats" / "counts.parquet")
        subjects = pd.read_parquet(study.root / "stats" / "subjects.parquet")
        truth = pd.read_csv(truth_file) if truth_file.exists() else None
        present = set(counts["acronym"])
        key = tuple(a for a in KEY_REGIONS if a in present)
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
        )
        save_figures(regions, counts, subjects, tmp / "figures", key_regions=key)
        (tmp / "report.html").write_text(html, encoding="utf-8")
        return {"bytes": len(html)}

    ran, _ = _run_stage(
        study.root / "report",
        "report",
        {
            "stats": _stage_key(study.root / "stats"),
            "truth": fingerprint([truth_file]) if truth_file.exists() else None,
        },
        report,
        force=force,
    )
    final = study.root / "report.html"
    _remove_stale_temporaries(final)
    if ran or not final.exists():
        with atomic_path(final) as tmp:
            tmp.write_bytes((study.root / "report" / "report.html").read_bytes())
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
    progress: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run every stage of a study, skipping what is up to date.

    Parameters
    ----------
    manifest : path-like
        The study manifest (TOML).
    stages : iterable of str, optional
        Subset of ``detect, register, quantify, stats, report`` (all by default).
    n_jobs : int
        Subjects processed in parallel (processes); each uses
        ``max(1, cpu_count // n_jobs)`` threads.
    force : bool
        Recompute even when outputs are up to date.
    progress : callable, optional
        Called with a subject id when its stages are done, and with
        ``"stats"`` / ``"report"``.

    Returns
    -------
    RunSummary

    Raises
    ------
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
    stage_params(study)  # validate every table before any work
    sub_stages = tuple(s for s in stages if s in SUBJECT_STAGES)
    results = []
    if sub_stages:
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        jobs = [
            (str(Path(manifest).resolve()), s.id, sub_stages, force, threads)
            for s in study.subjects
        ]
        if n_jobs > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=n_jobs) as pool:
                for res in pool.map(_run_subject_job, *zip(*jobs)):
                    results.append(res)
                    if progress:
                        progress(res["subject"])
        else:
            for job in jobs:
                res = _run_subject_job(*job)
                results.append(res)
                if progress:
                    progress(res["subject"])
    stats_ran = report_ran = False
    if "stats" in stages:
        stats_ran = run_stats(study, force=force)
        if progress:
            progress("stats")
    if "report" in stages:
        report_ran = run_report(study, force=force)
        if progress:
            progress("report")
    return RunSummary(tuple(results), stats_ran, report_ran, time.perf_counter() - t0)


def check_outputs_exist(study: Study, stage: str) -> None:
    """Raise a one-sentence error if a stage's inputs from earlier stages are missing."""
    for s in study.subjects:
        if not (subject_dir(study, s, "quantify") / "provenance.json").exists():
            raise InputNotFoundError(
                f'Subject "{s.id}" has no quantification yet; run "ketamap run" before "{stage}".'
            )
