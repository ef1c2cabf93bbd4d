"""Figures and the self-contained HTML report of the ensembles stage.

:func:`ensemble_figures` builds matplotlib figures (no pyplot, no display):
``raster`` (events of every session, cells in the order of the first
session's ensembles, by global cell id, so a cell keeps its row across
sessions), ``coordination`` (coactivity measures over time, with the
session-vs-previous tests marked) and ``stability`` (ensemble stability and
matched cells over time). :func:`save_figures` writes them as PNG and SVG;
:func:`write_report` writes one HTML page that embeds the PNGs and every table
and references nothing outside itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path

__all__ = [
    "ensemble_figures",
    "save_figures",
    "render_report",
    "write_report",
    "render_mice_report",
]

log = logging.getLogger(__name__)

_SESSION_COLUMNS = (
    "session", "time_h", "n_cells", "event_rate_hz", "mean_pairwise_correlation",
    "fraction_coactive_bins", "expected_fraction_coactive_bins", "n_ensembles",
    "mean_ensemble_size", "stability_vs_first", "stability_vs_previous",
)  # fmt: skip
_MATCH_COLUMNS = (
    "session", "cell_matching", "n_cells", "n_matched_first", "n_matched_previous",
    "shift_y_px", "shift_x_px", "rotation_deg", "registration_correlation",
    "median_match_overlap",
)  # fmt: skip
_STAT_COLUMNS = (
    "measure", "session_a", "session_b", "comparison", "value_a", "value_b", "difference",
    "test", "statistic", "n", "p_value", "p_holm",
)  # fmt: skip


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


_RASTER_COLUMNS = 600


def _greys():
    from matplotlib import colormaps

    # cells not imaged (or not matched) in that session are shown pale blue
    return colormaps["Greys"].with_extremes(bad="#dbe4ee")


def _raster(results: dict):
    from matplotlib.figure import Figure

    labels = list(results)
    ref, ref_gid = results[labels[0]]
    order: list[int] = []
    bounds_ = []
    for m in ref.assemblies.members:
        order += [int(g) for g in ref_gid[m] if int(g) not in set(order)]
        bounds_.append(len(order))
    seen = set(order)
    for _, gid in results.values():
        for g in gid:
            if int(g) not in seen:
                order.append(int(g))
                seen.add(int(g))
    pos = {g: i for i, g in enumerate(order)}
    fig = Figure(figsize=(2.8 * len(labels) + 0.8, 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False, sharey=True)[0]
    for ax, lab in zip(axes, labels, strict=True):
        res, gid = results[lab]
        ev = res.events
        n_cols = max(1, min(ev.shape[1], _RASTER_COLUMNS))
        # events per time column; rows of cells absent from this session stay NaN (pale)
        img = np.full((len(order), n_cols), np.nan, dtype=np.float32)
        if ev.size:
            col = (np.arange(ev.shape[1]) * n_cols) // ev.shape[1]
            counts = np.zeros((ev.shape[0], n_cols), dtype=np.float32)
            rows, frames = np.nonzero(ev)
            np.add.at(counts, (rows, col[frames]), 1.0)
            img[[pos[int(g)] for g in gid]] = counts
        cmap = _greys()
        ax.imshow(
            np.minimum(img, 1.0),
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=0,
            vmax=1,
            extent=(0, 1, len(order) - 0.5, -0.5),
        )
        for b in bounds_:
            ax.axhline(b - 0.5, color="tab:red", lw=0.5)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("time (fraction of session)", fontsize=8)
    axes[0].set_ylabel(f"cell (global id, sorted by {labels[0]} ensembles)", fontsize=8)
    return fig


def _coordination(sessions: pd.DataFrame, statistics: pd.DataFrame | None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    t = sessions["time_h"].to_numpy(dtype=float)
    x = np.arange(len(t))
    tests = {
        "fraction_coactive_bins": "fraction_coactive_bins",
        "mean_pairwise_correlation": "cell_mean_coactivity",
    }
    for ax, col in zip(
        axes, ["fraction_coactive_bins", "mean_pairwise_correlation", "n_ensembles"], strict=True
    ):
        y = sessions[col].to_numpy(dtype=float)
        ax.plot(x, y, "o-", color="#4c72b0")
        ax.set_xticks(
            x, [f"{s}\n{h:g} h" for s, h in zip(sessions["session"], t, strict=True)], fontsize=7
        )
        ax.set_title(col.replace("_", " "), fontsize=9)
        if col in tests and statistics is not None and len(statistics):
            st = statistics[(statistics.measure == tests[col])]
            for i in range(1, len(x)):
                a, b = sessions["session"].iloc[i - 1], sessions["session"].iloc[i]
                hit = st[(st.session_a == a) & (st.session_b == b)]
                pair = y[i - 1 : i + 1]
                if len(hit) and np.isfinite(pair).any() and np.isfinite(hit["p_holm"].iloc[0]):
                    p = float(hit["p_holm"].iloc[0])
                    ax.annotate(
                        _stars(p),
                        ((x[i - 1] + x[i]) / 2, np.nanmax(pair)),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                        color="#c0392b",
                    )
        if col == "fraction_coactive_bins" and "expected_fraction_coactive_bins" in sessions:
            ax.plot(
                x,
                sessions["expected_fraction_coactive_bins"],
                "--",
                color="#9aa5b1",
                label="circular-shift null",
            )
            ax.legend(fontsize=7, frameon=False)
    return fig


def _stability(sessions: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(sessions))
    names = list(sessions["session"])
    for col, style in (("stability_vs_first", "o-"), ("stability_vs_previous", "s--")):
        if col in sessions:
            ax1.plot(x, sessions[col], style, label=col.replace("_", " "))
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_title("ensemble stability (best-match Jaccard)", fontsize=9)
    ax1.legend(fontsize=7, frameon=False)
    n = sessions["n_cells"].to_numpy(dtype=float)
    for col, style in (("n_matched_first", "o-"), ("n_matched_previous", "s--")):
        if col in sessions:
            frac = sessions[col].to_numpy(dtype=float) / np.where(n > 0, n, np.nan)
            ax2.plot(x, frac, style, label=col.replace("n_", "").replace("_", " "))
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_title("fraction of cells matched", fontsize=9)
    ax2.legend(fontsize=7, frameon=False)
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, fontsize=7)
    return fig


def ensemble_figures(
    results: dict, sessions: pd.DataFrame, statistics: pd.DataFrame | None = None
) -> dict:
    """Build the figures of the ensembles stage.

    Parameters
    ----------
    results : dict
        ``label -> (SessionResult, global ids of its cells)``, in session order.
    sessions : DataFrame
        The per-session table of :func:`~ketamap.pipelines.ensembles.run_ensembles`.
    statistics : DataFrame, optional
        Its comparison table; tests of each session against the previous one
        are marked on the coordination figure.

    Returns
    -------
    dict
        ``{"raster", "coordination", "stability"}`` -> matplotlib Figure.
    """
    return {
        "raster": _raster(results),
        "coordination": _coordination(sessions, statistics),
        "stability": _stability(sessions),
    }


def save_figures(figures: dict, out_dir: str | Path) -> list[Path]:
    """Write every figure as ``NAME.png`` and ``NAME.svg`` in ``out_dir``."""
    from ketamap.report.figures import figure_bytes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        for fmt in ("png", "svg"):
            with atomic_path(out_dir / f"{name}.{fmt}") as p:
                p.write_bytes(figure_bytes(fig, fmt))
            paths.append(out_dir / f"{name}.{fmt}")
    return paths


_MEASURE_NAMES = {
    "fraction_coactive_bins": "coactive bins",
    "cell_mean_coactivity": "cell mean coactivity",
}


def _key_lines(sessions: pd.DataFrame, statistics: pd.DataFrame) -> list[str]:
    """Per later session: ensembles, and the coordination measures against the first."""
    lines = []
    first = statistics[statistics["comparison"] == "vs first"] if len(statistics) else statistics
    n_ens = dict(zip(sessions["session"], sessions.get("n_ensembles", [])))
    for b, grp in first.groupby("session_b", sort=False):
        parts = []
        for r in grp.itertuples():
            what = _MEASURE_NAMES.get(r.measure, r.measure)
            p = "not tested" if not np.isfinite(r.p_holm) else f"p {r.p_holm:.2g}"
            parts.append(f"{what} {r.value_a:.3g} → {r.value_b:.3g} ({p})")
        lead = f"{b} vs {grp['session_a'].iloc[0]}: "
        if b in n_ens:
            lead += f"{int(n_ens[b])} ensembles; "
        lines.append(lead + "; ".join(parts) + ".")
    return lines


def render_report(
    *,
    field_of_view: str,
    sessions: pd.DataFrame,
    statistics: pd.DataFrame,
    ensembles: pd.DataFrame,
    figures: dict,
    cell_matching: str,
    params: dict,
) -> str:
    """Render the HTML text of the ensembles report (pure; figures embedded as PNG).

    Returns
    -------
    str
        A complete HTML document with no external reference.
    """
    from ketamap.report.figures import figure_bytes
    from ketamap.report.html import figure, heading, render_page, table, text

    def fig(name: str, alt: str) -> list[dict]:
        return [figure(figure_bytes(figures[name]), alt)] if name in figures else []

    method_text = {
        "footprints": "ROI footprints matched after registering each session's mean image "
        "to the first session's (rotation grid + phase cross-correlation, "
        "affine refinement, Hungarian assignment on weighted footprint Jaccard)",
        "index": "the cell's index in the input (the same ROI set in every session)",
        "cell_map": "the cell map given in the sessions file",
    }.get(cell_matching, cell_matching)
    sizes = (
        ensembles.groupby(["session", "ensemble"]).size().rename("n_members").reset_index()
        if len(ensembles)
        else pd.DataFrame(columns=["session", "ensemble", "n_members"])
    )
    if len(ensembles):
        sizes = sizes.merge(
            ensembles.groupby(["session", "ensemble"])["jaccard_first"].first().reset_index(),
            on=["session", "ensemble"],
        )
    params_table = pd.DataFrame(
        {"parameter": list(params), "value": [str(v) for v in params.values()]}
    )
    blocks = [
        text(
            f"{len(sessions)} sessions. Cells matched across sessions by {method_text}. "
            "Coactive bins are tested against a circular-shift null; ensembles are found by "
            "PCA/ICA with a Marchenko–Pastur bound (Lopes-dos-Santos et al. 2013)."
        ),
        heading("Sessions"),
        table(sessions, _SESSION_COLUMNS),
        heading("Coordination over sessions"),
        *fig("coordination", "coactivity measures over sessions"),
        text(
            "Stars: Holm-adjusted p of each session against the previous one "
            "(* < 0.05, ** < 0.01, *** < 0.001)."
        ),
        heading("Statistics", level=3),
        table(statistics, _STAT_COLUMNS),
        heading("Rasters sorted by ensemble"),
        *fig("raster", "event raster of every session sorted by ensemble"),
        text(
            "Rows are cells by global id, in the order of the first session's ensembles (red "
            "lines separate them); a cell keeps its row in every session."
        ),
        heading("Cells matched across sessions"),
        table(sessions, _MATCH_COLUMNS),
        heading("Ensemble stability"),
        *fig("stability", "ensemble stability over sessions"),
        table(sizes, ("session", "ensemble", "n_members", "jaccard_first")),
        heading("Parameters"),
        table(params_table, ("parameter", "value")),
    ]
    return render_page(
        f"Ensembles — {field_of_view}",
        blocks,
        heading_text=f"Calcium-imaging ensembles — {field_of_view}",
        key_lines=_key_lines(sessions, statistics),
        key_note="each session against the first; Holm-adjusted p",
    )


def write_report(path: str | Path, **kwargs) -> Path:
    """Render the report (see :func:`render_report`) and write it atomically."""
    text = render_report(**kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    log.info("wrote report %s", path)
    return path


def _mice_key_lines(stats: pd.DataFrame) -> list[str]:
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
        From :func:`~ketamap.invivo.ensembles.mice.compare_mice` (several measures stacked).
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
        key_lines=_mice_key_lines(stats),
        key_note="each session against the first, across mice",
    )
