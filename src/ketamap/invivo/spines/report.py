"""Figures and a self-contained HTML section for spine turnover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ketamap.io.atomic import atomic_path
from ketamap.report.figures import figure_bytes

__all__ = [
    "dendrite_crop",
    "dendrite_figure",
    "example_dendrites",
    "turnover_figure",
    "survival_figure",
    "presence_figure",
    "write_figures",
    "render_report",
]

_FORM, _ELIM, _GREY = "#55a868", "#c44e52", "#9aa5b1"
_STABLE = "#4c9be8"


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


def dendrite_crop(
    planes: dict, centreline_px: np.ndarray, *, pixel_size_um: float, margin_um: float = 5.0
) -> tuple[dict, tuple[int, int]]:
    """Crop registered session images to the box around a traced dendrite.

    Parameters
    ----------
    planes : dict
        Session label -> 2-D image, all registered onto the reference frame and of one
        shape.
    centreline_px : ndarray, shape (n, 2)
        The traced centreline, (y, x) pixels of the reference frame.
    pixel_size_um : float
        Pixel size.
    margin_um : float
        Margin kept around the centreline (at least the farthest spine head).

    Returns
    -------
    crops : dict
        Session label -> float32 crop (views copied, so the full images can go).
    origin : tuple of int
        (y, x) of the crop's first pixel in the reference frame.
    """
    first = next(iter(planes.values()))
    pad = int(np.ceil(margin_um / pixel_size_um))
    pts = np.asarray(centreline_px, dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        return {k: np.asarray(v, np.float32).copy() for k, v in planes.items()}, (0, 0)
    y0, x0 = np.maximum(np.floor(pts.min(axis=0)).astype(int) - pad, 0)
    y1, x1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + pad + 1, first.shape)
    crops = {k: np.asarray(v[y0:y1, x0:x1], dtype=np.float32).copy() for k, v in planes.items()}
    return crops, (int(y0), int(x0))


def _fates(spines: pd.DataFrame, labels: list[str]) -> list[dict]:
    """Per session: the stable, gained and lost spines, as reference-frame (y, x) arrays."""
    seen = {k: g.groupby("spine_id")[["ref_y_px", "ref_x_px"]].mean()
            for k, g in spines.groupby("session", sort=False)}  # fmt: skip
    empty = pd.DataFrame(columns=["ref_y_px", "ref_x_px"], dtype=float)
    out = []
    for j, k in enumerate(labels):
        now = seen.get(k, empty)
        before = seen.get(labels[j - 1], empty) if j else now
        stable = now[now.index.isin(before.index)]
        gained = now[~now.index.isin(before.index)]
        lost = before[~before.index.isin(now.index)]
        fate = {"stable": stable, "gained": gained, "lost": lost}
        out.append({name: t.to_numpy(float).reshape(-1, 2) for name, t in fate.items()})
    return out


def dendrite_figure(
    crops: dict,
    spines: pd.DataFrame,
    *,
    origin: tuple[int, int] = (0, 0),
    pixel_size_um: float,
    times_h: dict | None = None,
    title: str = "",
):
    """Plot one dendrite across sessions with its spines coloured by fate.

    One panel per session: the registered image (maximum projection) cropped around
    the dendrite, all panels on one grey scale. Each spine seen in the session is
    marked blue when it was also there in the previous session (stable) and green
    when it was not (gained); a red cross marks where a spine of the previous
    session is gone (lost). The first session's spines are all blue. A 5 µm scale
    bar sits in the first panel.

    Parameters
    ----------
    crops : dict
        Session label -> 2-D image crop, in time order (:func:`dendrite_crop`).
    spines : DataFrame
        The dendrite's detections: ``session, spine_id, ref_y_px, ref_x_px``
        (reference-frame pixels, as :func:`~ketamap.invivo.spines.analyse_dendrite`
        gives them after tracking).
    origin : tuple of int
        (y, x) of the crops' first pixel in the reference frame.
    pixel_size_um : float
        Pixel size.
    times_h : dict, optional
        Session label -> hours, shown in the panel titles.
    title : str
        Figure title (e.g. the dendrite's name).

    Returns
    -------
    matplotlib.figure.Figure
        Panel ``j`` holds three scatter collections in the order stable, gained, lost.

    Raises
    ------
    ValueError
        If ``crops`` is empty, the crops differ in shape, or ``spines`` lacks a column.
    """
    labels = list(crops)
    if not labels:
        raise ValueError("dendrite_figure needs at least one session image.")
    shapes = {np.shape(c) for c in crops.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"the session crops must be 2-D and of one shape, got {sorted(shapes)}.")
    missing = {"session", "spine_id", "ref_y_px", "ref_x_px"} - set(spines.columns)
    if missing:
        raise ValueError(f"spines lacks column(s) {', '.join(sorted(missing))}.")
    h, w = next(iter(shapes))
    stack = np.stack([np.asarray(crops[k], dtype=np.float32) for k in labels])
    lo, hi = np.percentile(stack, [1, 99.7]) if stack.size else (0.0, 1.0)
    # one row of panels, each about 4.2 in along the crop's longer side
    n = len(labels)
    scale = 4.2 / max(h, w, 1)
    fig = _figure(max(4.0, n * w * scale + 0.4), h * scale + 0.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    sessions = spines.assign(session=spines["session"].astype(str))
    fates = _fates(sessions[sessions["session"].isin(labels)], labels)
    oy, ox = origin
    for ax, k, fate in zip(axes, labels, fates, strict=True):
        ax.imshow(crops[k], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")  # fmt: skip
        for name, colour, marker in (("stable", _STABLE, "o"), ("gained", _FORM, "o"),
                                     ("lost", _ELIM, "x")):  # fmt: skip
            yx = fate[name]
            kw = ({"facecolors": "none", "edgecolors": colour, "linewidths": 1.2}
                  if marker == "o" else {"c": colour, "linewidths": 1.5})  # fmt: skip
            ax.scatter(yx[:, 1] - ox, yx[:, 0] - oy, s=60, marker=marker, label=name, **kw)
        when = f" ({times_h[k]:g} h)" if times_h and k in times_h else ""
        ax.set_title(
            f"{k}{when}\n{len(fate['stable'])} stable, {len(fate['gained'])} gained, "
            f"{len(fate['lost'])} lost",
            fontsize=8,
        )
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = 5.0 / pixel_size_um
    if bar < 0.8 * w:
        axes[0].plot([0.05 * w, 0.05 * w + bar], [0.92 * h, 0.92 * h], color="w", lw=3)
        axes[0].text(0.05 * w + bar / 2, 0.88 * h, "5 µm", color="w", ha="center",
                     va="bottom", fontsize=7)  # fmt: skip
    axes[-1].legend(loc="upper right", fontsize=7, framealpha=0.7, markerscale=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def example_dendrites(presence: pd.DataFrame, labels: list[str], *, n: int = 3) -> list[str]:
    """Pick the ``n`` dendrites with the most spines gained or lost between sessions.

    Parameters
    ----------
    presence : DataFrame
        From :func:`~ketamap.invivo.spines.presence_matrix`.
    labels : list of str
        Sessions in time order.
    n : int
        How many dendrites.

    Returns
    -------
    list of str
        Dendrite names, most changes first (ties in table order).
    """
    if presence.empty or n < 1:
        return []
    p = presence[labels].to_numpy(bool)
    changes = np.abs(np.diff(p.astype(int), axis=1)).sum(axis=1) if len(labels) > 1 else 0
    score = pd.Series(changes, index=presence.index).groupby(presence["dendrite"],
                                                             sort=False).sum()  # fmt: skip
    order = sorted(range(len(score)), key=lambda i: -score.iloc[i])
    return [str(score.index[i]) for i in order[:n]]


def write_figures(
    folder: Path, rates, pooled, presence, labels, times_h, *, examples: dict | None = None
) -> dict:
    """Write every figure as PNG and SVG under ``folder``; return name -> PNG bytes.

    ``examples`` (name -> Figure, e.g. from :func:`dendrite_figure`) are written
    after the summary figures, as ``dendrite_<name>``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    figs = {"turnover": turnover_figure(rates, pooled), "survival": survival_figure(rates, times_h)}
    for dend in presence["dendrite"].unique():
        figs[f"presence_{dend}"] = presence_figure(presence, labels, dend)
    for name, fig in (examples or {}).items():
        figs[f"dendrite_{name}"] = fig
    pngs = {}
    for name, fig in figs.items():
        for fmt in ("png", "svg"):
            data = figure_bytes(fig, fmt)
            with atomic_path(folder / f"{name}.{fmt}") as tmp:
                tmp.write_bytes(data)
            if fmt == "png":
                pngs[name] = data
    return pngs


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

    Figures whose name starts with ``dendrite_`` (:func:`dendrite_figure`) are shown
    in their own section, "Example dendrites", with the key to their colours. With
    ``params`` the page ends with the methods, the parameters and the versions of the
    packages that shape the results.
    """
    from ketamap.report.html import figure, heading, items, render_page, table, text

    blocks = [
        items(notes),
        heading("Rates per interval (pooled over dendrites)"),
        table(pooled),
        heading("Return to lost sites"),
        table(returns),
        heading("Intervals compared (mixed model)"),
        table(stats),
        heading("Figures"),
        *(figure(v, k, k) for k, v in pngs.items() if not k.startswith("dendrite_")),
    ]
    examples = [figure(v, k, k) for k, v in pngs.items() if k.startswith("dendrite_")]
    if examples:
        blocks += [
            heading("Example dendrites", id="example-dendrites"),
            text(
                "The dendrites with the most spines gained or lost: each session's registered "
                "image (maximum projection) around the dendrite, on one grey scale. Blue "
                "circle: spine also present in the previous session (stable); green circle: "
                "gained since the previous session; red cross: where a spine of the previous "
                "session was lost. Scale bar 5 µm."
            ),
            *examples,
        ]
    blocks += _methods_blocks(params)
    return render_page(
        title,
        blocks,
        heading_text=f"Spine turnover: {title}",
        key_lines=_key_lines(pooled, returns, stats),
        key_note="pooled over dendrites",
    )


def _methods_blocks(params: dict | None) -> list[dict]:
    """Methods text, parameters and package versions (nothing without params)."""
    if params is None:
        return []
    from importlib import metadata

    from ketamap.report.html import heading, table, text

    versions = {}
    for name in ("ketamap", "numpy", "scipy", "pandas", "scikit-image", "statsmodels"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    rows = pd.DataFrame(
        {"parameter": list(params) + [f"version of {k}" for k in versions],
         "value": [str(v) for v in params.values()] + list(versions.values())}
    )  # fmt: skip
    return [heading("Methods"), text(_METHODS), table(rows)]
