"""Figures and a self-contained HTML section for spine turnover."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path
from ketamap.report.figures import figure_bytes

__all__ = [
    "turnover_figure",
    "survival_figure",
    "presence_figure",
    "write_figures",
    "render_report",
]

_FORM, _ELIM, _GREY = "#55a868", "#c44e52", "#9aa5b1"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def turnover_figure(rates: pd.DataFrame, pooled: pd.DataFrame):
    """Plot formation and elimination per interval: pooled bars, one dot per dendrite."""
    fig = _figure(1.6 + 1.3 * len(pooled), 3.2)
    ax = fig.subplots()
    x = np.arange(len(pooled))
    for off, col, colour, name in (
        (-0.2, "formation_rate", _FORM, "formation"),
        (0.2, "elimination_rate", _ELIM, "elimination"),
    ):
        ax.bar(x + off, 100 * pooled[col], width=0.38, color=colour, alpha=0.6, label=name)
        for i, iv in enumerate(pooled["interval"]):
            v = 100 * rates.loc[rates["interval"] == iv, col].to_numpy()
            ax.plot(np.full(len(v), i + off), v, "o", color=colour, ms=3)
    ax.set_xticks(x, [s.replace("->", "→\n") for s in pooled["interval"]], fontsize=8)
    ax.set_ylabel("% of spines in the earlier session")
    ax.set_title("spine turnover per interval", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return fig


def survival_figure(rates: pd.DataFrame, times_h: dict):
    """Plot the fraction of the first session's spines still present, per dendrite and mean."""
    fig = _figure(4.2, 3.2)
    ax = fig.subplots()
    first = rates["session_a"].iloc[0] if len(rates) else ""
    for _, g in rates.groupby("dendrite"):
        t = [times_h[first]] + [times_h[s] for s in g["session_b"]]
        ax.plot(t, [1.0] + list(g["survival_fraction"]), "-", color=_GREY, lw=0.8)
    mean = rates.groupby("session_b", sort=False)["survival_fraction"].mean()
    ax.plot(
        [times_h[first]] + [times_h[s] for s in mean.index],
        [1.0] + list(mean),
        "o-",
        color="k",
        label="mean",
    )
    ax.set_xlabel("time (h)")
    ax.set_ylabel(f"surviving fraction of {first} spines")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, frameon=False)
    return fig


def presence_figure(presence: pd.DataFrame, labels: list[str], dendrite: str):
    """Plot a kymograph-like presence map of one dendrite: position along it × session."""
    g = presence[presence["dendrite"] == dendrite]
    fig = _figure(1.8 + 1.0 * len(labels), 4.0)
    ax = fig.subplots()
    for j, lab in enumerate(labels):
        pres = g[lab].to_numpy(bool)
        prev = g[labels[j - 1]].to_numpy(bool) if j else pres
        nxt = g[labels[j + 1]].to_numpy(bool) if j + 1 < len(labels) else pres
        colour = np.where(pres & ~prev, _FORM, np.where(pres & ~nxt, _ELIM, "#4c72b0"))
        y = g["s_um"].to_numpy()
        x = j + 0.18 * g["side"].to_numpy()
        ax.scatter(x[pres], y[pres], c=colour[pres], s=18, marker="s")
    ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    ax.set_ylabel("position along the dendrite (µm)")
    ax.set_title(f"{dendrite}: blue stable, green new, red lost next", fontsize=9)
    return fig


def write_figures(folder: Path, rates, pooled, presence, labels, times_h) -> dict:
    """Write every figure as PNG and SVG under ``folder``; return name -> PNG bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    figs = {"turnover": turnover_figure(rates, pooled), "survival": survival_figure(rates, times_h)}
    for dend in presence["dendrite"].unique():
        figs[f"presence_{dend}"] = presence_figure(presence, labels, dend)
    pngs = {}
    for name, fig in figs.items():
        for fmt in ("png", "svg"):
            data = figure_bytes(fig, fmt)
            with atomic_path(folder / f"{name}.{fmt}") as tmp:
                tmp.write_bytes(data)
            if fmt == "png":
                pngs[name] = data
    return pngs


def _table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.3g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_lines(pooled: pd.DataFrame, returns: pd.DataFrame, stats: pd.DataFrame) -> list[str]:
    """Per interval the pooled rates and the test against the first; the return result."""
    lines = []
    tests = {}
    for r in stats.itertuples() if len(stats) else []:
        if isinstance(r.interval, str) and np.isfinite(r.p_value):
            tests.setdefault(r.interval, []).append(
                f"{r.measure.replace('_', ' ')} {r.estimate:+.3f} vs {r.reference} "
                f"(p {r.p_value:.2g}{', sign-flip test' if 'sign-flip' in r.model else ''})"
            )
    for r in pooled.itertuples():
        text = (f"{r.interval}: formation {100 * r.formation_rate:.1f} %, elimination "
                f"{100 * r.elimination_rate:.1f} %")  # fmt: skip
        lines.append(text + ("; " + "; ".join(tests[r.interval]) if r.interval in tests else ""))
    for r in returns.itertuples() if len(returns) else []:
        if getattr(r, "n_new", 0):
            lines.append(
                f"new spines near lost sites: {r.n_near} of {r.n_new} (chance "
                f"{r.null_share_mean:.2f}, p {r.p_value:.2g})"
            )
    return lines


_METHODS = (
    "Each session is registered rigidly to the first; the dendrite is traced as a "
    "centreline, spine heads are the maxima of the residual of a shaft model beside it, "
    "and heads are tracked between consecutive sessions by arc position and side "
    "(one-to-one, Hungarian assignment). Formation and elimination rates "
    "are the fractions of spines gained and lost per interval, per dendrite and pooled. "
    "New spines near lost sites are tested against a null of random positions on the same "
    "dendrite (one-sided permutation p). Intervals are compared with the first by a "
    "linear mixed model (random intercept per mouse, dendrite within mouse; statsmodels "
    "MixedLM, REML); where it does not converge, by an exact sign-flip test of the "
    "per-mouse mean paired differences, and the statistics table says which."
)


def render_report(
    title: str,
    pooled: pd.DataFrame,
    returns: pd.DataFrame,
    stats: pd.DataFrame,
    pngs: dict,
    notes: list[str],
    params: dict | None = None,
) -> str:
    """Render a self-contained HTML page (figures embedded) of the spine-turnover results.

    With ``params`` the page ends with the methods, the parameters and the versions of
    the packages that shape the results.
    """
    imgs = "".join(
        f'<figure><img alt="{html.escape(k)}" src="data:image/png;base64,'
        f'{base64.b64encode(v).decode("ascii")}"><figcaption>{html.escape(k)}</figcaption>'
        "</figure>"
        for k, v in pngs.items()
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "figure{display:inline-block;margin:0.5em}img{max-width:34em}"
    )
    from ketamap.report.html import KEY_CSS, key_results_html

    key = key_results_html(_key_lines(pooled, returns, stats), "pooled over dendrites")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{style}{KEY_CSS}</style></head><body>"
        f"<section id='spine-turnover'><h1>Spine turnover: {html.escape(title)}</h1>{key}"
        f"<ul>{notes_html}</ul><h2>Rates per interval (pooled over dendrites)</h2>"
        f"{_table(pooled)}<h2>Return to lost sites</h2>{_table(returns)}"
        f"<h2>Intervals compared (mixed model)</h2>{_table(stats)}"
        f"<h2>Figures</h2>{imgs}{_methods_html(params)}</section></body></html>"
    )


def _methods_html(params: dict | None) -> str:
    """Methods text, parameters and package versions, as HTML (empty without params)."""
    if params is None:
        return ""
    from importlib import metadata

    versions = {}
    for name in ("ketamap", "numpy", "scipy", "pandas", "scikit-image", "statsmodels"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    table = pd.DataFrame(
        {"parameter": list(params) + [f"version of {k}" for k in versions],
         "value": [str(v) for v in params.values()] + list(versions.values())}
    )  # fmt: skip
    return f"<h2>Methods</h2><p>{html.escape(_METHODS)}</p>{_table(table)}"
