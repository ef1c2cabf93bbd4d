"""The one HTML renderer of every ketamap report (jinja2, shared templates and style).

:func:`render_report` renders the census report (``templates/report.html``), and
:func:`render_page` the pages of the other analyses (ensembles, spines): a heading,
the key-results box and a list of blocks (:func:`heading`, :func:`text`,
:func:`table`, :func:`figure`, :func:`items`) in ``templates/page.html``. Both
extend ``templates/base.html`` and its style sheet ``templates/style.css``.

Figures are embedded as base64 PNG, the region table carries its own CSV as a
``data:`` URI, and the sorting/filtering script is inline: the file opens
offline, needs no server, and needs nothing outside itself. Every figure and QC
image of the census report opens full size on click (an inline lightbox); with
``figure_folder`` the captions also link to the same figures as PNG and SVG files
beside the page.
"""

from __future__ import annotations

import base64
import html as html_lib
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path
from ketamap.report.figures import figure_bytes, make_figures

__all__ = [
    "render_report",
    "write_report",
    "render_page",
    "heading",
    "text",
    "table",
    "figure",
    "items",
    "key_results_html",
]

logger = logging.getLogger(__name__)

_REGION_COLUMNS = (
    "acronym", "region_id", "level", "contrast", "fold_change", "log2_fold_change",
    "ci_low_log2", "ci_high_log2", "p", "q", "mean_density_ref_per_mm3",
    "mean_density_group_per_mm3", "n_ref", "n_group", "welch_p", "mannwhitney_p",
    "spearman_p", "method", "converged", "reason",
)  # fmt: skip
_ALPHA = 0.05
# a 95 % CI wider than a factor 2^10 (e.g. a region with no cells in one group) says
# nothing; it is shown blank ("not estimable") instead of as numbers
_MAX_CI_WIDTH_LOG2 = 10.0
# readable headers of the per-mouse QC table; the column name is kept as the tooltip
_QC_HEADERS = {
    "subject": "mouse",
    "group": "group",
    "n_cells": "cells detected",
    "n_outside_tissue": "cells dropped outside tissue",
    "n_below_tissue_floor": "cells dropped below tissue noise floor",
    "tissue_fraction": "tissue fraction of volume",
    "n_in_regions": "cells in atlas regions",
    "n_outside_volume": "cells outside atlas",
    "n_unlabelled": "cells in unlabelled voxels",
    "registration_correlation": "registration correlation",
    "registration_dice": "registration brain Dice",
    "tissue_atlas_dice": "tissue vs atlas brain Dice",
    "n_proofread": "candidates proofread",
    "proofread_precision": "proofread share that are cells",
    "detection_flagged": "detection flagged",
    "detection_reasons": "detection flag reasons",
    "registration_flagged": "registration flagged",
    "registration_reasons": "flag reasons",
}
_MISSING = "\u2014"  # an em dash marks a QC value the run did not record (older folders)


def _fmt(value) -> str:
    """Short text for a table cell: 3 significant digits, blanks for missing."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return str(value)


def _rows(df: pd.DataFrame, columns) -> list[list[str]]:
    return [[_fmt(v) for v in rec] for rec in df[list(columns)].itertuples(index=False)]


def _fmt_qc(value) -> str:
    """Like :func:`_fmt`, but a missing number (None, NaN, NA) shows as an em dash."""
    try:
        missing = value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        missing = False
    return _MISSING if missing else _fmt(value)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _flatten(obj, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        return [(prefix, ", ".join(_fmt(v) for v in obj))]
    return [(prefix, _fmt(obj))]


def _find(methods: dict, key: str):
    """Return the first value stored under ``key`` at any depth of ``methods``."""
    for k, v in methods.items():
        if k == key:
            return v
        if isinstance(v, dict):
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _methods_text(methods: dict, study: dict) -> str:
    alpha = _find(methods, "alpha") or _ALPHA
    family = _find(methods, "fdr_family") or "contrast_level"
    prior_df = _find(methods, "dispersion_prior_df")
    estimated_df = _find(methods, "dispersion_prior_df_estimated")
    test = _find(methods, "test") or "ql-f"
    unit = _find(methods, "dose_trend_unit_mg_per_kg")
    fam = {"contrast_level": "each contrast and hierarchy level", "contrast": "each contrast",
           "all": "all tests together"}.get(family, str(family))  # fmt: skip
    marker = study.get("marker", "marker")
    atlas = study.get("atlas", "the atlas")
    return (
        f"{marker}+ cells were counted in every region of {atlas} in each mouse. For each "
        "region, counts were modelled with a negative-binomial generalised linear model "
        "with the log of the region's volume in that mouse as offset and group as a "
        f"categorical factor with {study.get('reference_group', 'the reference group')} as "
        "reference (plus covariates, if any); a second model with dose as a number gave a "
        "log-linear dose trend"
        + (f" reported per {unit:g} mg/kg" if isinstance(unit, (int, float)) else
           " reported over the full dose range")
        + ". Each region's dispersion was estimated by Cox-Reid adjusted profile likelihood "
        "and shrunk toward an abundance trend across regions"
        + (f" with {prior_df:g} prior degrees of freedom" if prior_df is not None else
           f" with {estimated_df:.3g} prior degrees of freedom estimated from the regions by "
           "empirical Bayes" if isinstance(estimated_df, (int, float)) else "")
        + ". P-values come from "
        + ("quasi-likelihood F tests (the likelihood-ratio statistic divided by each "
           "region's shrunk quasi-likelihood dispersion)" if test == "ql-f" else
           "likelihood-ratio tests (F-referred, accounting for the uncertainty of the "
           "dispersion)" if test == "lr-f" else f"{test} tests")
        + " and 95% intervals from Wald standard errors; "
        f"q-values are Benjamini-Hochberg adjusted within {fam}, and regions with "
        f"q < {alpha:g} are called. Welch t and Mann-Whitney tests on densities are shown "
        "as simple checks."
    )  # fmt: skip


def _maps_methods_text(methods: dict) -> str:
    """Sentences on the voxel maps and networks, from their parameters (empty if absent)."""
    text = ""
    vox = methods.get("voxels")
    if isinstance(vox, dict) and vox.get("enabled", True):
        stat = ("threshold-free cluster enhancement (TFCE, E = 0.5, H = 2, "
                f"{vox.get('tfce_steps')} steps)" if vox.get("method") == "tfce" else
                "cluster mass (sum of |t| over clusters of voxels with two-sided "
                f"p < {vox.get('cluster_forming_p')})")  # fmt: skip
        text += (
            f" For voxel maps, each mouse's cells in atlas space were turned into a density "
            f"map on a {vox.get('resolution_um'):g} µm grid with a {vox.get('kernel')} kernel "
            f"of radius {vox.get('radius_um'):g} µm; groups were compared voxel by voxel with "
            f"a pooled-variance t test on log(density + {vox.get('log_offset_per_mm3'):g} "
            f"cells/mm³) inside the brain mask, and the family-wise error was controlled with "
            f"the permutation distribution of the maximum {stat} over the brain "
            f"({vox.get('n_permutations')} label permutations, or all distinct relabellings "
            f"when fewer; {vox.get('connectivity')}-connected clusters; "
            f"FWE < {vox.get('alpha'):g})."
        )
    net = methods.get("network")
    if isinstance(net, dict) and net.get("enabled", True):
        text += (
            f" Inter-regional covariance: per group, the {net.get('method')} correlation of "
            f"regional densities across mice (regions with a mean count of at least "
            f"{net.get('min_mean_count'):g} in every group, at most {net.get('max_regions')}); "
            f"differences from the reference group were tested by permuting mice between the "
            f"two groups ({net.get('n_permutations')} permutations or all relabellings), per "
            "edge (|Δr|; FWE from the maximum over edges, and Benjamini-Hochberg q) and "
            "globally (mean |Δr|)."
        )
    return text


def _truth_table(truth: pd.DataFrame, regions: pd.DataFrame, alpha: float):
    """Planted effects against the calls, and the calls on regions with no effect.

    A truth row is a planted effect where its ``planted`` column says so (the
    simulator's ``effects.csv`` lists every region, most with no effect), or, without
    that column, where its true fold change is not 1. Regions whose true fold change is
    exactly 1 are the no-effect tests; the rest (parents of planted regions, which
    change too) are neither.
    """
    t = truth.assign(acronym=truth["acronym"].astype(str), contrast=truth["contrast"].astype(str))
    r = regions.assign(acronym=regions["acronym"].astype(str))
    fold = t["true_fold_change"].astype(float)
    is_planted = t["planted"].astype(bool) if "planted" in t else ~np.isclose(fold, 1.0)
    is_null = np.isclose(fold, 1.0, rtol=0, atol=1e-9) & ~is_planted
    m = t[is_planted].merge(r, on=["acronym", "contrast"], how="left")
    m["called"] = m["q"] < alpha
    m["direction_correct"] = np.sign(np.log(m["true_fold_change"])) == np.sign(
        m["log2_fold_change"]
    )
    m["ci_fold_change"] = [
        ""
        if np.isnan(lo)
        else "not estimable"
        if hi - lo > _MAX_CI_WIDTH_LOG2
        else f"{2**lo:.3g} to {2**hi:.3g}"
        for lo, hi in zip(m["ci_low_log2"].astype(float), m["ci_high_log2"].astype(float))
    ]
    cols = ["acronym", "contrast", "true_fold_change", "fold_change", "ci_fold_change", "q",
            "called", "direction_correct"]  # fmt: skip
    null = t[is_null].merge(r, on=["acronym", "contrast"], how="inner")
    n_null_called = int((null["q"] < alpha).sum())
    summary = (
        f"{int((m['called'] & m['direction_correct']).sum())} of {len(m)} planted effects "
        f"were called at q < {alpha:g} in the right direction "
        f"({int(m['called'].sum())} called in all); of {len(null)} tests of regions with "
        f"no effect (true fold change 1), {n_null_called} were called "
        f"({100 * (1 - n_null_called / len(null)) if len(null) else float('nan'):.1f} % "
        "not called). Parents of planted regions change too and are counted in neither."
    )
    return ["planted region", "contrast", "true fold change", "estimated fold change",
            "95% CI", "q", "called", "direction correct"], _rows(m, cols), summary  # fmt: skip


def key_results_html(lines: list[str], note: str = "") -> str:
    """Return the key-results box of a report: what changed, where and how sure (escaped)."""
    if not lines:
        return ""
    items = "".join(f"<li>{html_lib.escape(line)}</li>" for line in lines)
    head = "<strong>Key results</strong>" + (f" ({html_lib.escape(note)})" if note else "")
    return f"<div class='key' id='key-results'>{head}<ul>{items}</ul></div>"


def _key_results(regions: pd.DataFrame, alpha: float, n_top: int = 5) -> list[str]:
    """One sentence per contrast: how many regions changed at q < alpha, the surest first."""
    lines = []
    if "contrast" not in regions or "q" not in regions:
        return lines
    for contrast, grp in regions.groupby("contrast", sort=False):
        called = grp[grp["q"] < alpha].sort_values(["q", "p"], kind="mergesort")
        if called.empty:
            lines.append(f"{contrast}: no region changed at q < {alpha:g}.")
            continue
        top = [
            f"{r.acronym} ×{r.fold_change:.2g} (q {r.q:.1g})"
            if np.isfinite(r.fold_change)
            else f"{r.acronym} (q {r.q:.1g})"
            for r in called.head(n_top).itertuples()
        ]
        more = f", and {len(called) - n_top} more" if len(called) > n_top else ""
        lines.append(
            f"{contrast}: {len(called)} region{'s' if len(called) != 1 else ''} changed at "
            f"q < {alpha:g}: " + ", ".join(top) + more + "."
        )
    return lines


def render_report(
    *,
    study: dict,
    subjects: pd.DataFrame,
    qc: pd.DataFrame,
    regions: pd.DataFrame,
    counts: pd.DataFrame,
    truth: pd.DataFrame | None = None,
    key_regions: tuple[str, ...] = (),
    images: dict[str, bytes] | None = None,
    methods: dict | None = None,
    extra_figures: list[tuple[str, object, str]] | None = None,
    extra_tables: list[dict] | None = None,
    figure_folder: str | None = None,
    qc_boundary_level: int | None = None,
) -> str:
    """Render the study report as one self-contained HTML document.

    Parameters
    ----------
    study : dict
        ``name``, ``marker``, ``atlas``, ``reference_group`` and ``groups`` (a
        list of ``{"name", "dose_mg_per_kg", "schedule"}``).
    subjects : DataFrame
        ``subject``, ``group``, ``dose_mg_per_kg`` and any covariates.
    qc : DataFrame
        One row per subject (``subject``, ``n_cells``, ``registration_correlation``,
        ``registration_flagged``, ``registration_reasons`` ...); every column is shown
        under a readable header (known columns, e.g. ``n_outside_tissue`` as "cells
        dropped outside tissue"), missing values as "—", and flagged rows are
        highlighted.
    regions : DataFrame
        Output of :func:`ketamap.stats.compare_regions`; every row is listed.
    counts : DataFrame
        The long counts table, with ``density_per_mm3``.
    truth : DataFrame, optional
        ``acronym, contrast, true_fold_change`` of a simulation: adds a
        planted-versus-recovered table and rings planted regions in the volcano.
    key_regions : tuple of str
        Acronyms shown in the dot and dose-response plots.
    images : dict of str to bytes, optional
        PNG images (e.g. ``"registration/<subject>"``) for the per-mouse QC section.
    methods : dict, optional
        Parameters and package versions, rendered as a paragraph and a table.
        ``methods["voxels"]`` and ``methods["network"]`` (parameters of the
        voxel maps and networks) add their paragraphs.
    extra_figures : list of (name, Figure, caption), optional
        Figures shown after the region figures (atlas maps, voxel maps, networks).
    extra_tables : list of dict, optional
        Tables of the "Maps and networks" section: ``title``, ``columns``
        (names), ``frame`` (DataFrame) and optional ``text``.
    figure_folder : str, optional
        Folder, relative to the page, that holds every figure as ``<name>.png`` and
        ``<name>.svg`` (as :func:`~ketamap.report.figures.save_figures` writes them);
        each caption then links to both files. Without it the page links to nothing.
    qc_boundary_level : int, optional
        Hierarchy depth at which the QC images draw atlas boundaries, stated above
        them (see :func:`ketamap.report.qc.registration_overlay_png`).

    Returns
    -------
    str
        The HTML document.
    """
    methods = dict(methods or {})
    alpha = float(_find(methods, "alpha") or _ALPHA)
    figs = make_figures(regions, counts, subjects, key_regions=tuple(key_regions), truth=truth,
                        alpha=alpha)  # fmt: skip
    captions = {
        "volcano": "Volcano plots: log2 fold change against -log10 p per contrast; red: "
                   f"q < {alpha:g}" + ("; rings: planted effects" if truth is not None else ""),
        "dots_top_hits": "Density in every mouse for the top hits (bar: group mean; line: "
        f"its 95% CI over mice; stars: q of the contrast with the reference, * < {alpha:g}, "
        f"** < {alpha / 5:g}, *** < {alpha / 50:g}).",
        "dots_key_regions": "Density in every mouse for the key regions (bar: group mean; "
        "line: its 95% CI over mice; stars as above).",
        "dose_response": "Density against dose for the key regions (line: mean per dose).",
    }  # fmt: skip
    figures = [{"name": k, "caption": captions.get(k, k), "src": _png_uri(figure_bytes(f))}
               for k, f in figs.items()]  # fmt: skip
    map_figures = [{"name": k, "caption": c, "src": _png_uri(figure_bytes(f))}
                   for k, f, c in (extra_figures or [])]  # fmt: skip
    map_tables = [{"title": t["title"], "text": t.get("text", ""),
                   "columns": list(t["columns"]), "rows": _rows(t["frame"], t["columns"])}
                  for t in (extra_tables or [])]  # fmt: skip
    n_by_group = subjects["group"].astype(str).value_counts()
    design = [[_fmt(g.get("name")), _fmt(g.get("dose_mg_per_kg")), _fmt(g.get("schedule", "")),
               str(int(n_by_group.get(str(g.get("name")), 0)))]
              for g in study.get("groups", [])]  # fmt: skip
    flagged = [False] * len(qc)  # a subject counted although its QC flagged it
    for col in ("detection_flagged", "registration_flagged"):
        if col in qc:
            flagged = [a or bool(b) for a, b in zip(flagged, qc[col])]
    region_cols = [c for c in _REGION_COLUMNS if c in regions.columns]
    csv = regions.to_csv(index=False).encode("utf-8")  # the download keeps every number
    shown = regions
    if {"ci_low_log2", "ci_high_log2"} <= set(regions.columns):
        wide = (regions["ci_high_log2"] - regions["ci_low_log2"]) > _MAX_CI_WIDTH_LOG2
        shown = regions.assign(
            ci_low_log2=regions["ci_low_log2"].mask(wide),
            ci_high_log2=regions["ci_high_log2"].mask(wide),
        )
    truth_table = _truth_table(truth, regions, alpha) if truth is not None else None
    context = {
        "study": study,
        "n_subjects": len(subjects),
        "design": design,
        "subject_columns": list(subjects.columns),
        "subject_rows": _rows(subjects, subjects.columns),
        "qc_columns": [(str(c), _QC_HEADERS.get(str(c), str(c))) for c in qc.columns],
        "qc_rows": list(
            zip([[_fmt_qc(v) for v in rec] for rec in qc.itertuples(index=False)], flagged)
        ),
        "n_flagged": int(sum(flagged)),
        "region_columns": region_cols,
        "region_rows": _rows(shown, region_cols),
        "n_called": int((regions["q"] < alpha).sum()),
        "alpha": alpha,
        "csv_uri": "data:text/csv;base64," + base64.b64encode(csv).decode("ascii"),
        "csv_name": f"{study.get('name', 'study')}_regions.csv".replace(" ", "_"),
        "figures": figures,
        "map_figures": map_figures,
        "map_tables": map_tables,
        "images": [{"name": k, "src": _png_uri(v)} for k, v in sorted((images or {}).items())],
        "truth": truth_table,
        "key_box": key_results_html(
            _key_results(regions, alpha)
            + [f"{int(sum(flagged))} of {len(qc)} mice counted although their QC flagged them."]
            * bool(sum(flagged))
            + ([truth_table[2]] if truth_table is not None else []),
            "fold change and Benjamini-Hochberg q of the surest regions per contrast; every "
            "region in the table below",
        ),
        "figure_folder": figure_folder.rstrip("/") if figure_folder else None,
        "qc_level": qc_boundary_level,
        "methods_text": _methods_text(methods, study) + _maps_methods_text(methods),
        "methods_rows": _flatten(methods),
        "missing_key_regions": [
            a for a in key_regions if a not in set(counts["acronym"].astype(str))
        ],
    }
    html = _environment().get_template("report.html").render(**context)
    logger.info("Rendered report: %d region rows, %d figures.", len(regions), len(figures))
    return html


def write_report(html: str, path: str | os.PathLike) -> Path:
    """Write the report atomically; return its path.

    Parameters
    ----------
    html : str
        The document from :func:`render_report`.
    path : path-like
        Destination ``.html`` file; its folder is created if needed.

    Returns
    -------
    Path
    """
    path = Path(os.fspath(path))
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def _environment():
    from jinja2 import Environment, PackageLoader, select_autoescape

    return Environment(
        loader=PackageLoader("ketamap.report", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )


# --------------------------------------------------------------------------- pages


def heading(title: str, level: int = 2, id: str | None = None) -> dict:  # noqa: A002
    """Return a section heading for :func:`render_page` (``id``: an anchor for links)."""
    return {"kind": "heading", "text": title, "level": level, "id": id}


def text(paragraph: str) -> dict:
    """Return a paragraph for :func:`render_page` (escaped)."""
    return {"kind": "text", "text": paragraph}


def table(df: pd.DataFrame, columns=None) -> dict:
    """Return a table for :func:`render_page`: the ``columns`` of ``df`` it has (default all).

    Numbers show 3 significant digits, missing values blank, booleans yes / no.
    """
    cols = [c for c in (df.columns if columns is None else columns) if c in df.columns]
    head = "".join(f"<th>{html_lib.escape(str(c).replace('_', ' '))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(_fmt(v))}</td>" for v in rec) + "</tr>"
        for rec in df[cols].itertuples(index=False)
    )
    return {
        "kind": "table",
        "html": f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
    }


def figure(png: bytes, alt: str, caption: str | None = None) -> dict:
    """Return a figure for :func:`render_page`, embedded as a PNG ``data:`` URI."""
    return {"kind": "figure", "uri": _png_uri(png), "alt": alt, "caption": caption}


def items(entries) -> dict:
    """Return a bulleted list for :func:`render_page`: texts, or (text, link) pairs."""
    pairs = [(e, None) if isinstance(e, str) else tuple(e) for e in entries]
    return {"kind": "list", "entries": pairs}


def render_page(
    title: str, blocks: list[dict], *, heading_text: str | None = None, key_lines=(), key_note=""
) -> str:
    """Render one self-contained report page (no script, no external resource).

    Parameters
    ----------
    title : str
        The page's title (and its heading, unless ``heading_text`` is given).
    blocks : list of dict
        Made by :func:`heading`, :func:`text`, :func:`table`, :func:`figure` and
        :func:`items`, shown in order.
    heading_text : str, optional
        The first-level heading.
    key_lines, key_note
        The key-results box (see :func:`key_results_html`).

    Returns
    -------
    str
    """
    return (
        _environment()
        .get_template("page.html")
        .render(
            title=title,
            heading=heading_text or title,
            key_box=key_results_html(list(key_lines), key_note),
            blocks=blocks,
        )
    )
