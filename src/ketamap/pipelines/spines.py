"""The spines stage: a sessions file in, turnover tables, figures and a report out.

``run_spines(sessions_toml, out_dir)`` writes::

    OUT/rates.csv / .parquet          per dendrite and interval: counts, formation,
                                      elimination, turnover, survival, densities
    OUT/rates_pooled.csv / .parquet   per interval, counts summed over dendrites
    OUT/spines.csv / .parquet         presence table: dendrite, spine_id, s_um, side,
                                      one True/False column per session
    OUT/detections.csv / .parquet     every spine seen in every session, with pixels
    OUT/return_sites.csv / .parquet   return-to-lost-sites test per dendrite and pooled
    OUT/statistics.csv / .parquet     intervals compared by a mixed model
    OUT/registration.csv              rotation, offset and score per session
    OUT/centrelines.parquet           traced dendrites (reference frame)
    OUT/annotations.csv, napari/      the detections, ready to correct
    OUT/figures/*.png, *.svg          turnover, survival, presence map per dendrite, and
                                      dendrite_<name>: up to three example dendrites across
                                      sessions, spines coloured by fate
    OUT/report.html                   a self-contained page
    OUT/summary.json                  parameters, inputs, headline numbers

The folder is written atomically.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.engine.stage import fingerprint, run_stage
from ketamap.errors import InputError, ParameterError
from ketamap.invivo.spines.annotations import export_annotations, export_napari, import_annotations
from ketamap.invivo.spines.core import DendriteResult, analyse_dendrite, locate_annotations
from ketamap.invivo.spines.image import project
from ketamap.invivo.spines.metrics import (
    interval_rates,
    mixed_model,
    pooled_rates,
    presence_matrix,
    return_to_lost_sites,
)
from ketamap.invivo.spines.params import SpineParams
from ketamap.invivo.spines.report import (
    dendrite_crop,
    dendrite_figure,
    example_dendrites,
    render_report,
    write_figures,
)
from ketamap.invivo.spines.track import track_spines
from ketamap.io.atomic import atomic_path, write_json, write_table
from ketamap.manifest import SpineSessions, load_spine_sessions
from ketamap.params import from_mapping, to_dict

__all__ = ["run_spines", "read_image"]

log = logging.getLogger(__name__)


def read_image(path: Path) -> np.ndarray:
    """Read a 2D or 3D TIFF, with one sentence if it cannot be read."""
    import tifffile

    try:
        return tifffile.imread(path)
    except (OSError, ValueError, tifffile.TiffFileError) as e:
        raise InputError(f'image "{path}" is not a readable TIFF ({e}).') from e


def _annotated(points: pd.DataFrame, results: dict, labels: list[str]) -> pd.DataFrame:
    unknown = set(points["dendrite"]) - set(results)
    if unknown:
        raise InputError(f"annotations name unknown dendrite(s): {', '.join(sorted(unknown))}.")
    bad = set(points["session"]) - set(labels)
    if bad:
        raise InputError(f"annotations name unknown session(s): {', '.join(sorted(bad))}.")
    frames = []
    for dend, g in points.groupby("dendrite", sort=False):
        frames.append(locate_annotations(g, results[dend]).assign(dendrite=dend))
    return pd.concat(frames, ignore_index=True)


def run_spines(
    sessions_toml: str | Path,
    out_dir: str | Path,
    *,
    params: SpineParams | None = None,
    annotations: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Run the spine-turnover analysis of every dendrite of a sessions file.

    Parameters
    ----------
    sessions_toml : path-like
        A spine sessions file (see :mod:`ketamap.manifest`).
    out_dir : path-like
        Output folder (replaced atomically). When it already holds the results
        for the same inputs, parameters and annotations, nothing is recomputed.
    params : SpineParams, optional
        Overrides the file's ``[params]`` table entirely when given.
    annotations : path-like, optional
        Corrected spine positions (see :func:`import_annotations`): they
        replace the automatic detections; where ``spine_id`` is given for every
        point of a dendrite it is kept as the identity, otherwise spines are
        tracked automatically.
    force : bool
        Recompute even when ``out_dir`` is up to date.

    Returns
    -------
    dict
        ``out_dir``, ``pooled`` (rows of the pooled rates), ``return_sites``
        (the pooled row), ``files`` and ``ran`` (False when the outputs were up
        to date and the stage was skipped).

    Raises
    ------
    ManifestError, ParameterError, InputError, InputNotFoundError
        One sentence each.
    """
    sf = load_spine_sessions(sessions_toml)
    if params is None:
        params = from_mapping(SpineParams, sf.params, where=f"[params] in {sessions_toml}")
    labels = sf.labels
    new_session = params.new_spines_session or labels[-1]
    if new_session not in labels[1:]:
        raise ParameterError(
            f'new_spines_session "{new_session}" is not a session after the first '
            f"({', '.join(labels[1:])})."
        )
    out_dir = Path(out_dir)
    material = {
        "sessions_file": fingerprint([sessions_toml]),
        "images": fingerprint([d.images[k] for d in sf.dendrites for k in labels]),
        "annotations": fingerprint([annotations]),
        "params": to_dict(params),
        "new_spines_session": new_session,
    }
    stage = run_stage(
        out_dir,
        "spines",
        material,
        functools.partial(_spines_stage, sf, params, new_session, Path(sessions_toml), annotations),
        force=force,
    )
    files = sorted(str(p) for p in out_dir.rglob("*") if p.is_file())
    log.info("spines stage: %d files in %s", len(files), out_dir)
    return stage.result | {"out_dir": str(out_dir), "files": files, "ran": stage.ran}


def _spines_stage(
    sf: SpineSessions,
    params: SpineParams,
    new_session: str,
    sessions_toml: Path,
    annotations: Path | None,
    tmp: Path,
) -> dict:
    """Analyse every dendrite of ``sf`` and write the stage's files into ``tmp``."""
    labels = sf.labels
    points = import_annotations(annotations) if annotations is not None else None
    results: dict[str, DendriteResult] = {}
    crops: dict[str, tuple] = {}
    frames, reg_rows, line_rows = [], [], []
    for d in sf.dendrites:
        images = {k: read_image(d.images[k]) for k in labels}
        res = analyse_dendrite(images, pixel_size_um=d.pixel_size_um, params=params)
        results[d.name] = res
        # registered projections around the dendrite, for the example images
        crops[d.name] = dendrite_crop(
            {k: res.transforms[k].warp(project(images[k])) for k in labels},
            res.centreline.points,
            pixel_size_um=d.pixel_size_um,
            margin_um=params.max_distance_um + 1.5,
        )
        frames.append(res.detections.assign(dendrite=d.name))
        for k, tf in res.transforms.items():
            reg_rows.append(
                {
                    "dendrite": d.name,
                    "session": k,
                    "rotation_deg": tf.rotation_deg,
                    "offset_y_px": float(tf.offset[0]),
                    "offset_x_px": float(tf.offset[1]),
                    "score": tf.score,
                }
            )
        line_rows.append(
            pd.DataFrame(
                {
                    "dendrite": d.name,
                    "s_um": res.centreline.s_um,
                    "y_px": res.centreline.points[:, 0],
                    "x_px": res.centreline.points[:, 1],
                }
            )
        )
        log.info(
            "dendrite %s: traced %.1f µm, %d detections",
            d.name,
            res.centreline.length_um,
            len(res.detections),
        )
    detections = pd.concat(frames, ignore_index=True)
    source = "automatic detection"
    if points is not None:
        detections = _annotated(points, results, labels)
        source = f"annotations {Path(annotations).name}"
    tracked = []
    for _, g in detections.groupby("dendrite", sort=False):
        if "spine_id" in g and g["spine_id"].notna().all():
            tracked.append(g.assign(spine_id=g["spine_id"].astype(int)))
        else:
            tracked.append(
                track_spines(
                    g.drop(columns="spine_id", errors="ignore"),
                    labels,
                    tolerance_um=params.match_tolerance_um,
                )
            )
    detections = pd.concat(tracked, ignore_index=True)
    detections["spine_id"] = detections["spine_id"].astype(int)
    lead = ["dendrite", "session", "spine_id", "s_um", "side", "y_px", "x_px"]
    detections = detections[lead + [c for c in detections if c not in lead]]
    presence = presence_matrix(
        detections[["dendrite", "session", "spine_id", "s_um", "side"]], labels
    )
    stretch = {
        n: (params.end_margin_um, r.centreline.length_um - params.end_margin_um)
        for n, r in results.items()
    }
    lengths = {n: b - a for n, (a, b) in stretch.items()}
    rates = interval_rates(presence, labels, lengths_um=lengths)
    pooled = pooled_rates(rates)
    returns = return_to_lost_sites(
        presence,
        labels,
        new_session=new_session,
        stretch_um=stretch,
        distance_um=params.return_distance_um,
        exclusion_um=params.return_exclusion_um,
        same_side=params.return_same_side,
        n_permutations=params.n_permutations,
        seed=params.seed,
    )
    mice = {d.name: d.mouse for d in sf.dendrites}
    stats = mixed_model(rates, mice)
    pooled_return = returns.iloc[-1].to_dict()
    notes = [
        f"{len(sf.dendrites)} dendrites from {len(set(mice.values()))} mice, "
        f"{len(labels)} sessions; spines from {source}.",
        f"Return to lost sites ({new_session}, within {params.return_distance_um} µm): "
        f"{pooled_return['n_near']} of {pooled_return['n_new']} new spines, chance "
        f"{pooled_return['null_share_mean']:.2f}, p = {pooled_return['p_value']:.3g}.",
    ]
    if len(set(mice.values())) < 2:
        notes.append("Single mouse: the mixed model has a random intercept per dendrite only.")
    write_table(rates, tmp / "rates.parquet")
    write_table(pooled, tmp / "rates_pooled.parquet")
    write_table(presence, tmp / "spines.parquet")
    write_table(detections, tmp / "detections.parquet")
    write_table(returns, tmp / "return_sites.parquet")
    write_table(stats, tmp / "statistics.parquet")
    pd.DataFrame(reg_rows).to_csv(tmp / "registration.csv", index=False)
    write_table(pd.concat(line_rows, ignore_index=True), tmp / "centrelines.parquet", csv=False)
    export_annotations(detections, tmp / "annotations.csv")
    export_napari(detections, tmp / "napari")
    times = dict(zip(labels, sf.times_h, strict=True))
    pixel = {d.name: d.pixel_size_um for d in sf.dendrites}
    examples = {
        name: dendrite_figure(
            crops[name][0],
            detections[detections["dendrite"] == name],
            origin=crops[name][1],
            pixel_size_um=pixel[name],
            times_h=times,
            title=f"{name} (mouse {mice[name]}): spines by fate",
        )
        for name in example_dendrites(presence, labels, n=3)
    }
    pngs = write_figures(tmp / "figures", rates, pooled, presence, labels, times, examples=examples)
    with atomic_path(tmp / "report.html") as p:
        p.write_text(
            render_report(sf.name, pooled, returns, stats, pngs, notes, to_dict(params)),
            encoding="utf-8",
        )
    summary = {
        "sessions_file": str(Path(sessions_toml).resolve()),
        "name": sf.name,
        "sessions": labels,
        "times_h": sf.times_h,
        "params": to_dict(params),
        "spines_from": source,
        "new_spines_session": new_session,
        "dendrites": {
            n: {"mouse": mice[n], "traced_length_um": r.centreline.length_um}
            for n, r in results.items()
        },
        "pooled_rates": pooled.to_dict(orient="records"),
        "return_sites": pooled_return,
        "notes": notes,
    }
    write_json(summary, tmp / "summary.json")
    return {"pooled": pooled.to_dict(orient="records"), "return_sites": pooled_return}
