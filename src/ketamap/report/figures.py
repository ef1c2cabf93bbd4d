"""Figures of a region-level comparison: volcano, dot and dose-response plots.

Every figure is a :class:`matplotlib.figure.Figure` built without pyplot, so
nothing touches global state or needs a display; the same objects are
embedded in the HTML report and saved as PNG and SVG by :func:`save_figures`.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path

__all__ = [
    "volcano_figure",
    "dot_figure",
    "dose_response_figure",
    "make_figures",
    "figure_bytes",
    "save_figures",
    "top_hits",
    "densities",
]

logger = logging.getLogger(__name__)

_CALLED = "#c0392b"
_OTHER = "#9aa5b1"
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure  # imported here: `import ketamap.report` stays cheap

    return Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")


def figure_bytes(fig, fmt: str = "png") -> bytes:
    """Render a figure to PNG or SVG bytes.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    fmt : {"png", "svg"}

    Returns
    -------
    bytes
    """
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def densities(counts: pd.DataFrame, subjects: pd.DataFrame) -> pd.DataFrame:
    """Per-mouse densities joined to group and dose.

    Parameters
    ----------
    counts : DataFrame
        Long counts table; ``density_per_mm3`` is computed from ``count`` and
        ``volume_mm3`` when absent.
    subjects : DataFrame
        ``subject``, ``group``, ``dose_mg_per_kg``.

    Returns
    -------
    DataFrame
        ``subject, acronym, density_per_mm3, group, dose_mg_per_kg``.
    """
    c = counts.assign(subject=counts["subject"].astype(str))
    if "density_per_mm3" not in c.columns:
        c["density_per_mm3"] = c["count"] / c["volume_mm3"]
    s = subjects.assign(subject=subjects["subject"].astype(str),
                        group=subjects["group"].astype(str))  # fmt: skip
    cols = ["subject", "acronym", "density_per_mm3"]
    return c[cols].merge(s[["subject", "group", "dose_mg_per_kg"]], on="subject", how="inner")


def _group_order(subjects: pd.DataFrame) -> list[str]:
    dose = subjects.assign(group=subjects["group"].astype(str)).groupby("group")["dose_mg_per_kg"]
    return sorted(dose.mean().index, key=lambda g: (dose.mean()[g], g))


def top_hits(regions: pd.DataFrame, n: int = 6, *, alpha: float = 0.05) -> list[str]:
    """Acronyms of the strongest group-contrast results (q < alpha first, then by p)."""
    r = regions[(regions["contrast"] != "dose_trend") & regions["p"].notna()]
    r = r.assign(called=r["q"] < alpha).sort_values(["called", "p"], ascending=[False, True])
    return list(dict.fromkeys(r["acronym"].astype(str)))[:n]


def volcano_figure(regions: pd.DataFrame, *, alpha: float = 0.05, truth=None, n_labels: int = 8):
    """Log2 fold change against -log10 p, one panel per contrast.

    Parameters
    ----------
    regions : DataFrame
        Output of :func:`ketamap.stats.compare_regions`.
    alpha : float
        Rows with ``q < alpha`` are highlighted.
    truth : DataFrame, optional
        ``acronym, contrast, true_fold_change``; planted regions are ringed.
    n_labels : int
        The smallest-p rows of each panel that are labelled.

    Returns
    -------
    matplotlib.figure.Figure
    """
    contrasts = sorted(regions["contrast"].unique()) or ["(none)"]
    fig = _figure(4.2 * len(contrasts), 3.8)
    axes = fig.subplots(1, len(contrasts), squeeze=False)[0]
    planted = set()
    if truth is not None and len(truth):
        planted = set(zip(truth["acronym"].astype(str), truth["contrast"].astype(str)))
    for ax, contrast in zip(axes, contrasts):
        r = regions[(regions["contrast"] == contrast) & regions["p"].notna()]
        x = r["log2_fold_change"].to_numpy(float)
        y = -np.log10(np.clip(r["p"].to_numpy(float), 1e-300, 1))
        called = (r["q"] < alpha).to_numpy()
        ax.scatter(x[~called], y[~called], s=10, c=_OTHER, lw=0, label="not called")
        ax.scatter(x[called], y[called], s=14, c=_CALLED, lw=0, label=f"q < {alpha:g}")
        if planted:
            mark = np.array([(a, contrast) in planted for a in r["acronym"].astype(str)], bool)
            ax.scatter(x[mark], y[mark], s=46, facecolors="none", edgecolors="black", lw=0.9,
                       label="planted")  # fmt: skip
        for i in np.argsort(-y)[:n_labels]:
            ax.annotate(str(r["acronym"].iloc[i]), (x[i], y[i]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")  # fmt: skip
        ax.axvline(0, color="0.8", lw=0.8)
        ax.set_title(contrast, fontsize=10)
        unit = r["dose_unit_mg_per_kg"].dropna()
        per = f" per {unit.iloc[0]:g} mg/kg" if contrast == "dose_trend" and len(unit) else ""
        ax.set_xlabel(f"log2 fold change{per}")
        ax.set_ylabel("-log10 p")
        ax.legend(fontsize=7, frameon=False, loc="best")
    return fig


def _small_multiples(n: int, ncol: int = 4):
    ncol = max(1, min(ncol, n))
    nrow = int(np.ceil(n / ncol)) if n else 1
    fig = _figure(2.6 * ncol, 2.4 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _stars(q: float, alpha: float) -> str:
    if not np.isfinite(q) or q >= alpha:
        return ""
    return "***" if q < alpha / 50 else "**" if q < alpha / 5 else "*"


def dot_figure(
    counts: pd.DataFrame,
    subjects: pd.DataFrame,
    acronyms,
    *,
    title: str = "",
    regions: pd.DataFrame | None = None,
    alpha: float = 0.05,
):
    """Density of every mouse per group, one panel per region, with mean and 95 % CI.

    Parameters
    ----------
    counts, subjects : DataFrame
        As for :func:`densities`.
    acronyms : sequence of str
        Regions to show; those absent from ``counts`` are skipped.
    title : str
        Figure title.
    regions : DataFrame, optional
        The region statistics: each group's contrast against the reference
        (``<group>_vs_<reference>``) puts stars over the group by its q (* < alpha,
        ** < alpha / 5, *** < alpha / 50).
    alpha : float

    Returns
    -------
    matplotlib.figure.Figure
    """
    from scipy import stats as sstats

    ref = None  # the reference group, from the contrasts "<group>_vs_<reference>"
    if regions is not None and "contrast" in regions:
        refs = {str(c).split("_vs_")[-1] for c in regions["contrast"] if "_vs_" in str(c)}
        ref = refs.pop() if len(refs) == 1 else None

    d = densities(counts, subjects)
    present = [a for a in acronyms if a in set(d["acronym"].astype(str))]
    order = _group_order(subjects)
    fig, axes = _small_multiples(len(present))
    rng = np.random.default_rng(0)  # fixed jitter: figures are reproducible
    for ax, acr in zip(axes, present):
        part = d[d["acronym"].astype(str) == acr]
        for i, g in enumerate(order):
            y = part.loc[part["group"] == g, "density_per_mm3"].to_numpy(float)
            colour = _PALETTE[i % len(_PALETTE)]
            ax.scatter(i + rng.uniform(-0.12, 0.12, y.size), y, s=16, color=colour, lw=0)
            if y.size:
                ax.hlines(y.mean(), i - 0.25, i + 0.25, color="black", lw=1.2)
            if y.size >= 2:  # the mean's 95 % t interval over mice
                half = sstats.t.ppf(0.975, y.size - 1) * y.std(ddof=1) / np.sqrt(y.size)
                ax.vlines(i + 0.3, max(y.mean() - half, 0), y.mean() + half, color="black", lw=1)
            if ref is not None and g != ref and y.size:
                row = regions[(regions["acronym"].astype(str) == acr)
                              & (regions["contrast"] == f"{g}_vs_{ref}")]  # fmt: skip
                mark = _stars(float(row["q"].iloc[0]), alpha) if len(row) else ""
                if mark:
                    ax.annotate(mark, (i, y.max()), xytext=(0, 3), textcoords="offset points",
                                ha="center", fontsize=9)  # fmt: skip
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=7)
        ax.set_title(acr, fontsize=9)
        ax.set_ylabel("cells / mm³", fontsize=8)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the stars
    if not present:
        axes[0].text(0.5, 0.5, "no regions to show", ha="center", va="center")
        axes[0].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def dose_response_figure(counts: pd.DataFrame, subjects: pd.DataFrame, acronyms):
    """Density against dose per region: each mouse, and the mean per dose.

    Parameters
    ----------
    counts, subjects : DataFrame
        As for :func:`densities`.
    acronyms : sequence of str
        Regions to show; those absent from ``counts`` are skipped.

    Returns
    -------
    matplotlib.figure.Figure
    """
    d = densities(counts, subjects)
    present = [a for a in acronyms if a in set(d["acronym"].astype(str))]
    fig, axes = _small_multiples(len(present))
    for ax, acr in zip(axes, present):
        part = d[d["acronym"].astype(str) == acr]
        ax.scatter(part["dose_mg_per_kg"], part["density_per_mm3"], s=14, color=_PALETTE[0], lw=0)
        mean = part.groupby("dose_mg_per_kg")["density_per_mm3"].mean()
        ax.plot(mean.index, mean.to_numpy(), color="black", lw=1.2, marker="_", ms=12)
        ax.set_title(acr, fontsize=9)
        ax.set_xlabel("dose (mg/kg)", fontsize=8)
        ax.set_ylabel("cells / mm³", fontsize=8)
        ax.set_ylim(bottom=0)
    if not present:
        axes[0].text(0.5, 0.5, "no regions to show", ha="center", va="center")
        axes[0].set_axis_off()
    return fig


def make_figures(regions, counts, subjects, *, key_regions=(), truth=None, alpha=0.05) -> dict:
    """Build every report figure.

    Parameters
    ----------
    regions : DataFrame
        Output of :func:`ketamap.stats.compare_regions`.
    counts, subjects : DataFrame
        The long counts table and the subjects table.
    key_regions : sequence of str
        Acronyms for the dot and dose-response plots.
    truth : DataFrame, optional
        Planted effects, ringed in the volcano plot.
    alpha : float
        FDR level used to highlight calls.

    Returns
    -------
    dict of str to Figure
        Keys ``volcano``, ``dots_top_hits``, ``dots_key_regions`` and
        ``dose_response`` (the last two only when ``key_regions`` is given).
    """
    figs = {"volcano": volcano_figure(regions, alpha=alpha, truth=truth)}
    hits = top_hits(regions, alpha=alpha)
    figs["dots_top_hits"] = dot_figure(
        counts, subjects, hits, title="Top hits", regions=regions, alpha=alpha
    )
    if key_regions:
        figs["dots_key_regions"] = dot_figure(
            counts, subjects, key_regions, title="Key regions", regions=regions, alpha=alpha
        )
        figs["dose_response"] = dose_response_figure(counts, subjects, key_regions)
    return figs


def save_figures(regions, counts, subjects, out_dir, *, key_regions=()) -> list[Path]:
    """Write every report figure as PNG and SVG files.

    Parameters
    ----------
    regions, counts, subjects : DataFrame
        As for :func:`make_figures`.
    out_dir : path-like
        Folder to write into (created if needed).
    key_regions : sequence of str
        Acronyms for the dot and dose-response plots.

    Returns
    -------
    list of Path
        The files written, ``<name>.png`` then ``<name>.svg`` per figure.
    """
    out_dir = Path(os.fspath(out_dir))
    written = []
    for name, fig in make_figures(regions, counts, subjects, key_regions=key_regions).items():
        for fmt in ("png", "svg"):
            path = out_dir / f"{name}.{fmt}"
            with atomic_path(path) as tmp:
                tmp.write_bytes(figure_bytes(fig, fmt))
            written.append(path)
    logger.info("Wrote %d figure files to %s.", len(written), out_dir)
    return written
