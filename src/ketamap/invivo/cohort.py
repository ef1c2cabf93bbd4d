"""The ensembles stage over several mice: one sessions file per field of view.

``run_ensembles_mice([a.toml, b.toml, ...], out_dir)`` writes::

    OUT/fields/<field>/           the ensembles stage of each field (run_ensembles)
    OUT/cells.csv / .parquet      every field's cells: mouse, field_of_view, session, cell,
                                  global_cell, event_rate_hz, mean_coactivity
    OUT/mice.csv / .parquet       per mouse and session: cells and the mean of each measure
    OUT/statistics.csv / .parquet every session against the first, across mice
                                  (ketamap.invivo.mice.compare_mice)
    OUT/report.html               key results, the comparison, links to every field's page
    OUT/summary.json              inputs, parameters and the comparison

Sessions are matched across fields by label and ordered by time (their mean
``time_h`` over the fields). The folder is written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.errors import InputError
from ketamap.invivo.mice import compare_mice
from ketamap.invivo.run import EnsembleParams, run_ensembles
from ketamap.invivo.sessions import load_sessions
from ketamap.io.atomic import atomic_dir, atomic_path, write_json, write_table
from ketamap.params import to_dict

__all__ = ["run_ensembles_mice"]

log = logging.getLogger(__name__)

MEASURES = ("mean_coactivity", "event_rate_hz")


def _key_lines(stats: pd.DataFrame) -> list[str]:
    """One sentence per measure and session: the change, its 95 % CI, p and the test."""
    lines = []
    for r in stats.itertuples():
        if not np.isfinite(r.estimate):
            lines.append(f"{r.measure}, {r.session} vs {r.reference}: not estimable.")
            continue
        ci = f"95% CI {r.ci_low:.3g} to {r.ci_high:.3g}, " if np.isfinite(r.ci_low) else ""
        test = "mixed model" if r.converged else "sign-flip test over mice (model not converged)"
        p = f"p = {r.p_value:.2g}" if np.isfinite(r.p_value) else "p not available"
        lines.append(
            f"{r.measure.replace('_', ' ')}, {r.session} vs {r.reference}: "
            f"{r.estimate:+.3g} ({ci}{p}; {test}; {r.n_mice} mice)."
        )
    return lines


def render_mice_report(
    stats: pd.DataFrame, per_mouse: pd.DataFrame, fields: list[tuple[str, str]], *, unit: str
) -> str:
    """Render the across-mice page: key results, the comparison table, links to the fields.

    Parameters
    ----------
    stats : DataFrame
        From :func:`~ketamap.invivo.mice.compare_mice` (several measures stacked).
    per_mouse : DataFrame
        Mean of each measure per mouse and session.
    fields : list of (str, str)
        Field name and mouse of every field, in input order; each field's own page is
        linked as ``fields/<name>/report.html``.
    unit : str
        The unit of the model (``field`` or ``cell``).

    Returns
    -------
    str
        A self-contained HTML page (no script, no external resource).
    """
    from ketamap.report.html import heading, items, render_page, table, text

    n_mice = len({m for _, m in fields})
    methods = (
        "Every field of view was analysed on its own (events, coactivity, ensembles; see "
        "each field's page). Sessions were then compared across mice by a linear mixed "
        "model, measure ~ session, with a random intercept per mouse "
        + (
            "on the mean of each field and session"
            if unit == "field"
            else "and a variance component for session within mouse, on every cell"
        )
        + " (statsmodels MixedLM, REML). Each session is compared with the first; the Wald "
        "statistic is referred to a t distribution with containment degrees of freedom. "
        "Where the model does not converge, no p-value is taken from it: the session is "
        "tested by the exact sign-flip test of the per-mouse mean differences, and the "
        "method column says so."
    )
    blocks = [
        heading("Sessions compared across mice"),
        table(stats),
        heading("Per mouse and session"),
        table(per_mouse),
        heading("Fields of view"),
        items((f"{n} (mouse {m})", f"fields/{n}/report.html") for n, m in fields),
        heading("Methods"),
        text(methods),
    ]
    return render_page(
        "Ensembles across mice",
        blocks,
        heading_text=f"Ensembles across {n_mice} mice ({len(fields)} fields of view)",
        key_lines=_key_lines(stats),
        key_note="each session against the first, across mice",
    )


def run_ensembles_mice(
    sessions_files: list,
    out_dir: str | Path,
    *,
    params: EnsembleParams | None = None,
    unit: str = "field",
    measures: tuple[str, ...] = MEASURES,
) -> dict:
    """Run the ensembles stage on every field of view and compare sessions across mice.

    Parameters
    ----------
    sessions_files : list of path-like
        One sessions file per field of view (at least two); ``mouse`` in each file's
        ``[field_of_view]`` says which mouse it is (default: the field's name).
    out_dir : path-like
        Output folder (replaced atomically).
    params : EnsembleParams, optional
        Overrides every file's ``[params]`` table when given.
    unit : {"field", "cell"}
        The unit of the mixed model (see :func:`~ketamap.invivo.mice.compare_mice`).
    measures : tuple of str
        Per-cell measures compared.

    Returns
    -------
    dict
        ``out_dir``, ``statistics`` (rows of the comparison), ``sessions`` (in time
        order), ``n_mice`` and ``files``.

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
    with atomic_dir(out_dir) as tmp:
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
    written = sorted(str(p) for p in out_dir.rglob("*") if p.is_file())
    log.info("ensembles across %d mice: %d files in %s", cells["mouse"].nunique(), len(written),
             out_dir)  # fmt: skip
    return {
        "out_dir": str(out_dir),
        "statistics": stats.to_dict(orient="records"),
        "sessions": shared,
        "n_mice": int(cells["mouse"].nunique()),
        "files": written,
    }
