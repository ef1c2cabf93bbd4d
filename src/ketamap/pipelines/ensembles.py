"""The ensembles stage: sessions file in, ensembles and coordination tables and figures out.

``run_ensembles(sessions_toml, out_dir)`` writes::

    OUT/ensembles.csv / .parquet    session, ensemble, cell, global_cell, weight, jaccard_first
    OUT/sessions.csv / .parquet     one row per session with coordination and matching measures
    OUT/cells.csv / .parquet        session, cell, global_cell, event_rate_hz, mean_coactivity
    OUT/cell_map.csv / .parquet     session, cell, global_cell (cells matched across sessions)
    OUT/statistics.csv / .parquet   every session compared with the first and the previous
    OUT/activations.parquet         session, ensemble, time_s, strength
    OUT/figures/raster.png / .svg   events sorted by ensemble (reference: first session)
    OUT/figures/coordination.png / .svg  coactivity measures over sessions
    OUT/figures/stability.png / .svg     ensemble stability and matched cells over sessions
    OUT/report.html                 one self-contained page with tables and figures
    OUT/summary.json                parameters, inputs and the returned summary

``cell`` is always a cell's index in that session's input (suite2p ROI number,
array row); ``global_cell`` is the identity of the cell across sessions.

``run_ensembles_mice([a.toml, b.toml, ...], out_dir)`` runs the stage on every
field of view (one sessions file each) into ``OUT/fields/<field>/`` and compares
sessions across mice::

    OUT/cells.csv / .parquet      every field's cells: mouse, field_of_view, session, cell,
                                  global_cell, event_rate_hz, mean_coactivity
    OUT/mice.csv / .parquet       per mouse and session: cells and the mean of each measure
    OUT/statistics.csv / .parquet every session against the first, across mice
                                  (ketamap.invivo.ensembles.mice.compare_mice)
    OUT/report.html               key results, the comparison, links to every field's page
    OUT/summary.json              inputs, parameters and the comparison

Sessions are matched across fields by label and ordered by time (their mean
``time_h`` over the fields). Both are stages of the engine
(:mod:`ketamap.engine.stage`): the folder is written atomically, with its
provenance, and skipped when it is up to date.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.engine.stage import fingerprint, run_stage
from ketamap.errors import InputError
from ketamap.invivo.ensembles.assemblies import match_assemblies
from ketamap.invivo.ensembles.cellmap import apply_cell_map, read_cell_map
from ketamap.invivo.ensembles.matching import track_cells
from ketamap.invivo.ensembles.mice import compare_mice
from ketamap.invivo.ensembles.report import (
    ensemble_figures,
    render_mice_report,
    save_figures,
    write_report,
)
from ketamap.invivo.ensembles.session import (
    EnsembleParams,
    SessionResult,
    analyse_session,
    compare_sessions,
)
from ketamap.io.atomic import atomic_path, write_json, write_table
from ketamap.io.traces.suite2p import read_recording
from ketamap.manifest import SessionsFile, load_sessions
from ketamap.params import from_mapping, to_dict

__all__ = ["run_ensembles", "run_ensembles_mice"]

log = logging.getLogger(__name__)

MEASURES = ("mean_coactivity", "event_rate_hz")


@dataclass(frozen=True)
class _Analysed:
    """One session analysed: the result, its ensembles' members and the cell ids."""

    result: SessionResult
    members: list  # per ensemble, the input cell indices of its members
    cell_index: np.ndarray  # input cell index of every analysed row
    frame_rate_hz: float
    global_ids: np.ndarray  # global cell id of every analysed row
    global_members: list  # per ensemble, the members' global cell ids


def _global_ids(sf: SessionsFile, recs: list, params: EnsembleParams) -> tuple:
    """Global cell id of every kept cell of every session, and how they were found."""
    if sf.cell_map is not None:
        gids = apply_cell_map(
            read_cell_map(sf.cell_map, [s.label for s in sf.sessions]),
            [s.label for s in sf.sessions],
            [r.cell_index for r in recs],
        )
        return gids, "cell_map", None
    have = all(r.footprints is not None and len(r.footprints) == len(r.cell_index) for r in recs)
    mode = params.cell_matching
    if mode == "footprints" and not have:
        missing = next(
            s.label for s, r in zip(sf.sessions, recs, strict=True) if r.footprints is None
        )
        raise InputError(
            f'session "{missing}" has no ROI footprints, so cells cannot be matched by '
            'footprints; set cell_matching = "index" or give a cell_map.'
        )
    if mode == "index" or (mode == "auto" and (not have or len(recs) == 1)):
        return [np.asarray(r.cell_index, dtype=np.int64) for r in recs], "index", None
    ids, registration = track_cells(
        [r.mean_image for r in recs],
        [r.footprints for r in recs],
        min_jaccard=params.match_min_overlap,
        max_rotation_deg=params.match_max_rotation_deg,
        rotation_step_deg=params.match_rotation_step_deg,
    )
    return ids, "footprints", registration


def run_ensembles(
    sessions_toml: str | Path,
    out_dir: str | Path,
    *,
    params: EnsembleParams | None = None,
    force: bool = False,
) -> dict:
    """Run the ensembles stage on every session of a sessions file.

    Cells are matched across sessions first (``params.cell_matching``, or the
    sessions file's ``cell_map``); every session is then analysed on all its
    own cells, and sessions are compared on the cells they share.

    Parameters
    ----------
    sessions_toml : path-like
        A sessions file (see :mod:`ketamap.manifest`).
    out_dir : path-like
        Output folder (replaced atomically). When it already holds the results
        for the same inputs and parameters, nothing is recomputed.
    params : EnsembleParams, optional
        Overrides the file's ``[params]`` table entirely when given.
    force : bool
        Recompute even when ``out_dir`` is up to date.

    Returns
    -------
    dict
        ``out_dir``, ``sessions`` (list of per-session summary dicts),
        ``n_ensembles`` (per session), ``cell_matching`` (method used) and
        ``files`` (paths written) and ``ran`` (False when the outputs were up to
        date and the stage was skipped).

    Raises
    ------
    ManifestError, ParameterError, InputError, InputNotFoundError
        One sentence each.
    """
    sf: SessionsFile = load_sessions(sessions_toml)
    if params is None:
        params = from_mapping(EnsembleParams, sf.params, where=f"[params] in {sessions_toml}")
    out_dir = Path(out_dir)
    inputs = [p for s in sf.sessions for p in (s.data, s.neuropil) if p is not None]
    material = {
        "sessions_file": fingerprint([sessions_toml]),
        "inputs": fingerprint([*inputs, sf.cell_map]),
        "params": to_dict(params),
    }
    stage = run_stage(
        out_dir,
        "ensembles",
        material,
        functools.partial(_ensembles_stage, sf, params, Path(sessions_toml)),
        force=force,
    )
    files = sorted(str(p) for p in out_dir.rglob("*") if p.is_file())
    log.info("ensembles stage: %d files in %s", len(files), out_dir)
    return stage.result | {"out_dir": str(out_dir), "files": files, "ran": stage.ran}


def _ensembles_stage(
    sf: SessionsFile, params: EnsembleParams, sessions_toml: Path, tmp: Path
) -> dict:
    """Analyse every session of ``sf`` and write the stage's files into ``tmp``."""
    recs, rates = [], []
    for s in sf.sessions:
        rec = read_recording(s.data, neuropil=s.neuropil, series=s.series)
        rate = s.frame_rate_hz or rec.frame_rate_hz
        if rate is None:
            raise InputError(
                f'session "{s.label}": {rec.source} records no frame rate; give frame_rate_hz.'
            )
        recs.append(rec)
        rates.append(rate)
    gids, method, registration = _global_ids(sf, recs, params)
    results, rows, cell_rows, map_rows = {}, [], [], []
    first_gids = set(gids[0].tolist())
    for k, (s, rec, rate, gid) in enumerate(zip(sf.sessions, recs, rates, gids, strict=True)):
        log.info("session %s: %d cells × %d frames at %.2f Hz", s.label, *rec.F.shape, rate)
        res = analyse_session(
            rec.F, rec.Fneu, frame_rate_hz=rate, params=params, cell_index=rec.cell_index
        )
        # member rows -> input cell indices and global ids
        members = [rec.cell_index[m] for m in res.assemblies.members]
        gmembers = [gid[m] for m in res.assemblies.members]
        results[s.label] = _Analysed(res, members, rec.cell_index, rate, gid, gmembers)
        n_bins = res.binned.shape[1]
        prev = set(gids[k - 1].tolist()) if k else first_gids
        match_row = {
            "cell_matching": method,
            "n_matched_first": int(len(first_gids.intersection(gid.tolist()))),
            "n_matched_previous": int(len(prev.intersection(gid.tolist()))),
        }
        if registration is not None:
            reg = registration.iloc[k]
            match_row |= {
                "shift_y_px": float(reg.shift_y_px),
                "shift_x_px": float(reg.shift_x_px),
                "rotation_deg": float(reg.rotation_deg),
                "registration_correlation": float(reg.correlation),
                "median_match_overlap": float(reg.median_overlap),
            }
        rows.append(
            {
                "session": s.label,
                "time_h": s.time_h,
                "frame_rate_hz": rate,
                "n_bins": n_bins,
                **res.summary,
                **match_row,
            }
        )
        cell_rows.append(res.per_cell.assign(session=s.label, global_cell=gid))
        map_rows.append(
            pd.DataFrame(
                {
                    "session": s.label,
                    "cell": rec.cell_index.astype(int),
                    "global_cell": gid.astype(int),
                }
            )
        )
    first = sf.sessions[0].label
    ens_rows, act_frames = [], []
    prev_members = None
    for row, (lab, a) in zip(rows, results.items(), strict=True):
        res, members, cidx, rate = a.result, a.members, a.cell_index, a.frame_rate_hz
        gmembers = a.global_members
        jf = match_assemblies(gmembers, results[first].global_members)
        row["stability_vs_first"] = float(jf.mean()) if len(jf) else float("nan")
        jp = match_assemblies(gmembers, prev_members) if prev_members is not None else np.array([])
        row["stability_vs_previous"] = float(jp.mean()) if len(jp) else float("nan")
        prev_members = gmembers
        for e, (m, gm) in enumerate(zip(members, gmembers, strict=True)):
            w = res.assemblies.patterns[e]
            pos = np.searchsorted(cidx, m)
            ens_rows += [
                {
                    "session": lab,
                    "ensemble": e,
                    "cell": int(c),
                    "global_cell": int(g),
                    "weight": float(w[p]),
                    "jaccard_first": float(jf[e]),
                }
                for c, g, p in zip(m, gm, pos, strict=True)
            ]
        if res.activation.size:
            nb = res.activation.shape[1]
            bin_s = max(1, int(round(params.bin_s * rate))) / rate
            act_frames.append(
                pd.DataFrame(
                    {
                        "session": lab,
                        "ensemble": np.repeat(np.arange(res.activation.shape[0]), nb),
                        "time_s": np.tile(np.arange(nb) * bin_s, res.activation.shape[0]),
                        "strength": res.activation.ravel(),
                    }
                )
            )
    sessions_table = pd.DataFrame(rows)
    cells = pd.concat(cell_rows, ignore_index=True)[
        ["session", "cell", "global_cell", "event_rate_hz", "mean_coactivity"]
    ]
    ensembles = pd.DataFrame(
        ens_rows, columns=["session", "ensemble", "cell", "global_cell", "weight", "jaccard_first"]
    )
    activations = (
        pd.concat(act_frames, ignore_index=True)
        if act_frames
        else pd.DataFrame(
            {
                "session": pd.Series(dtype=str),
                "ensemble": pd.Series(dtype=int),
                "time_s": pd.Series(dtype=float),
                "strength": pd.Series(dtype=np.float32),
            }
        )
    )
    cell_map = pd.concat(map_rows, ignore_index=True)
    coactive = {
        lab: (a.result.binned > 0).sum(axis=0) >= a.result.summary["coactive_threshold_cells"]
        for lab, a in results.items()
    }
    statistics = compare_sessions(sessions_table, cells, coactive)
    write_table(ensembles, tmp / "ensembles.parquet")
    write_table(sessions_table, tmp / "sessions.parquet")
    write_table(cells, tmp / "cells.parquet")
    write_table(cell_map, tmp / "cell_map.parquet")
    write_table(statistics, tmp / "statistics.parquet")
    write_table(activations, tmp / "activations.parquet", csv=False)
    figures = ensemble_figures(
        {k: (a.result, a.global_ids) for k, a in results.items()}, sessions_table, statistics
    )
    save_figures(figures, tmp / "figures")
    write_report(
        tmp / "report.html",
        field_of_view=sf.name,
        sessions=sessions_table,
        statistics=statistics,
        ensembles=ensembles,
        figures=figures,
        cell_matching=method,
        params=to_dict(params),
    )
    summary = {
        "sessions_file": str(Path(sessions_toml).resolve()),
        "field_of_view": sf.name,
        "cell_matching": method,
        "params": to_dict(params),
        "sessions": rows,
    }
    write_json(summary, tmp / "summary.json")
    return {
        "sessions": rows,
        "cell_matching": method,
        "n_ensembles": {r["session"]: r["n_ensembles"] for r in rows},
    }


def run_ensembles_mice(
    sessions_files: list,
    out_dir: str | Path,
    *,
    params: EnsembleParams | None = None,
    unit: str = "field",
    measures: tuple[str, ...] = MEASURES,
    force: bool = False,
) -> dict:
    """Run the ensembles stage on every field of view and compare sessions across mice.

    Parameters
    ----------
    sessions_files : list of path-like
        One sessions file per field of view (at least two); ``mouse`` in each file's
        ``[field_of_view]`` says which mouse it is (default: the field's name).
    out_dir : path-like
        Output folder (replaced atomically). When it already holds the results
        for the same inputs and parameters, nothing is recomputed.
    params : EnsembleParams, optional
        Overrides every file's ``[params]`` table when given.
    unit : {"field", "cell"}
        The unit of the mixed model (see :func:`~ketamap.invivo.ensembles.mice.compare_mice`).
    measures : tuple of str
        Per-cell measures compared.
    force : bool
        Recompute even when ``out_dir`` is up to date.

    Returns
    -------
    dict
        ``out_dir``, ``statistics`` (rows of the comparison), ``sessions`` (in time
        order), ``n_mice``, ``files`` and ``ran`` (False when skipped as up to date).

    Raises
    ------
    InputError
        Fewer than two files, two fields with one name, or sessions shared by fewer
        than two mice.
    ManifestError, ParameterError, InputNotFoundError
        From the sessions files, one sentence each.
    """
    files = [Path(f) for f in sessions_files]
    if len(files) < 2:
        raise InputError(
            f"comparing mice needs a sessions file per field of view, got {len(files)}."
        )
    parsed = [load_sessions(f) for f in files]
    names = [sf.name for sf in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"field of view names must differ between sessions files; {', '.join(twice)} "
            "is used twice (set name in [field_of_view])."
        )
    times: dict[str, list] = {}
    for sf in parsed:
        for s in sf.sessions:
            times.setdefault(s.label, []).append(s.time_h)
    order = sorted(times, key=lambda k: (float(np.mean(times[k])), list(times).index(k)))
    shared = [k for k in order if len(times[k]) >= 2]
    if len(shared) < 2:
        raise InputError(
            "fewer than two session labels are shared by two fields of view "
            f"({', '.join(order)}); sessions are matched across fields by label."
        )
    out_dir = Path(out_dir)
    inputs = [p for sf in parsed for s in sf.sessions for p in (s.data, s.neuropil) if p]
    material = {
        "sessions_files": fingerprint(files),
        "inputs": fingerprint([*inputs, *(sf.cell_map for sf in parsed)]),
        "params": None if params is None else to_dict(params),
        "unit": unit,
        "measures": list(measures),
    }

    def compare(tmp: Path) -> dict:
        frames = []
        for f, sf in zip(files, parsed, strict=True):
            run_ensembles(f, tmp / "fields" / sf.name, params=params)
            cells = pd.read_parquet(tmp / "fields" / sf.name / "cells.parquet")
            frames.append(cells.assign(mouse=sf.mouse, field_of_view=sf.name))
        cells = pd.concat(frames, ignore_index=True)
        lead = ["mouse", "field_of_view", "session"]
        cells = cells[lead + [c for c in cells.columns if c not in lead]]
        cells = cells[cells["session"].isin(shared)]
        stats = pd.concat(
            [compare_mice(cells, measure=m, sessions=shared, unit=unit) for m in measures],
            ignore_index=True,
        )
        per_mouse = (
            cells.assign(session=pd.Categorical(cells["session"], categories=shared))
            .groupby(["mouse", "session"], observed=True)
            .agg(n_cells=("cell", "size"), **{m: (m, "mean") for m in measures})
            .reset_index()
        )
        per_mouse["session"] = per_mouse["session"].astype(str)
        write_table(cells, tmp / "cells.parquet")
        write_table(per_mouse, tmp / "mice.parquet")
        write_table(stats, tmp / "statistics.parquet")
        fields = [(sf.name, sf.mouse) for sf in parsed]
        with atomic_path(tmp / "report.html") as page:
            page.write_text(render_mice_report(stats, per_mouse, fields, unit=unit), "utf-8")
        write_json(
            {
                "sessions_files": [str(f.resolve()) for f in files],
                "fields": [{"name": n, "mouse": m} for n, m in fields],
                "sessions": shared,
                "unit": unit,
                "params": None if params is None else to_dict(params),
                "statistics": stats.to_dict(orient="records"),
            },
            tmp / "summary.json",
        )
        return {
            "statistics": stats.to_dict(orient="records"),
            "sessions": shared,
            "n_mice": int(cells["mouse"].nunique()),
        }

    stage = run_stage(out_dir, "ensembles across mice", material, compare, force=force)
    written = sorted(str(p) for p in out_dir.rglob("*") if p.is_file())
    log.info("ensembles across %d mice: %d files in %s", stage.result["n_mice"], len(written),
             out_dir)  # fmt: skip
    return stage.result | {"out_dir": str(out_dir), "files": written, "ran": stage.ran}
