"""Figures in atlas space: region values on annotation slices, voxel maps, networks.

Like :mod:`ketamap.report.figures`, every function builds a matplotlib
``Figure`` without pyplot. Slices are coronal: taken along the atlas axis
that runs anterior-posterior (the first axis of the Allen/BrainGlobe ``asr``
orientation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ketamap.errors import AtlasError
from ketamap.report.figures import _figure

__all__ = [
    "coronal_axis",
    "slice_positions",
    "region_slice_positions",
    "region_value_volume",
    "region_slices_figure",
    "voxel_slices_figure",
    "network_figure",
]


def coronal_axis(orientation: str) -> int:
    """Axis of an orientation code (e.g. ``"asr"``) that runs anterior-posterior."""
    for i, letter in enumerate(str(orientation).lower()):
        if letter in "ap":
            return i
    return 0


def slice_positions(mask: np.ndarray, axis: int, n: int = 5) -> list[int]:
    """``n`` slice indices spread over the extent of ``mask`` along ``axis`` (15 %-85 %)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    present = np.flatnonzero(mask.any(axis=other))
    if not present.size:
        return [mask.shape[axis] // 2]
    lo, hi = present[0], present[-1]
    return sorted({int(round(lo + f * (hi - lo))) for f in np.linspace(0.15, 0.85, n)})


def region_slice_positions(
    annotation: np.ndarray, ontology, acronyms, *, axis: int, n: int = 5
) -> list[tuple[int, str]]:
    """Coronal slices through the centres of regions of interest, then evenly spread.

    Parameters
    ----------
    annotation : ndarray of int
        Atlas labels.
    ontology : Ontology
    acronyms : sequence of str
        Regions in order of interest; those not in the atlas are skipped.
    axis : int
        The coronal axis.
    n : int
        Number of slices.

    Returns
    -------
    list of (int, str)
        Sorted slice indices with the regions they pass through (or ``""``).
    """
    brain = annotation > 0
    other = tuple(a for a in range(annotation.ndim) if a != axis)
    extent = max(1, int(brain.any(axis=other).sum()))
    chosen: dict[int, str] = {}
    for acr in acronyms:
        if len(chosen) >= n:
            break
        try:
            rid = ontology.lookup(acr)
        except AtlasError:  # a key region absent from this atlas is skipped
            continue
        inside = np.isin(annotation, ontology.descendants(rid, include_self=True))
        profile = inside.sum(axis=other)
        if not profile.any():
            continue
        pos = int(np.argmax(profile))
        near = [p for p in chosen if abs(p - pos) < 0.04 * extent]
        if near:
            chosen[near[0]] += f", {acr}"
        else:
            chosen[pos] = acr
    for pos in slice_positions(brain, axis, n):
        if len(chosen) >= n:
            break
        if all(abs(p - pos) >= 0.08 * extent for p in chosen):
            chosen[pos] = ""
    return sorted(chosen.items())


def region_value_volume(annotation: np.ndarray, ontology, values: dict[int, float]) -> np.ndarray:
    """Paint each voxel with the value of its most specific region that has one.

    Parameters
    ----------
    annotation : ndarray of int
        Atlas labels (any shape); 0 is outside.
    ontology : Ontology
        The atlas' region tree.
    values : dict of int to float
        Value per region id (e.g. log2 fold change); NaN counts as missing.

    Returns
    -------
    ndarray of float32
        Same shape; NaN outside the brain and where no ancestor has a value.
    """
    labels, inverse = np.unique(annotation, return_inverse=True)
    painted = np.full(labels.shape, np.nan, np.float32)
    for i, lab in enumerate(labels):
        if lab == 0:
            continue
        for rid in reversed(ontology.ancestors(int(lab), include_self=True)):
            v = values.get(rid)
            if v is not None and np.isfinite(v):
                painted[i] = v
                break
    return painted[inverse].reshape(annotation.shape)


def _outline(ax, labels2d: np.ndarray) -> None:
    edge = np.zeros(labels2d.shape, bool)
    edge[:-1] |= labels2d[:-1] != labels2d[1:]
    edge[:, :-1] |= labels2d[:, :-1] != labels2d[:, 1:]
    ax.imshow(np.ma.masked_where(~edge, edge), cmap="Greys", vmin=0, vmax=1.5, alpha=0.6,
              interpolation="nearest")  # fmt: skip


#: Bregma's distance from the anterior face of the Allen CCFv3 volume (µm)
BREGMA_AP_UM = 5400.0


def _scale_and_sides(ax, shape, resolution_um: float, orientation: str, axis: int) -> None:
    """Draw a 1 mm scale bar and the left and right sides on a coronal panel."""
    rows, cols = shape
    length = 1000.0 / resolution_um  # voxels per mm
    ax.plot([cols * 0.05, cols * 0.05 + length], [rows * 0.95] * 2, color="black", lw=2)
    ax.text(cols * 0.05 + length / 2, rows * 0.92, "1 mm", ha="center", va="bottom", fontsize=6)
    rest = [c for i, c in enumerate(str(orientation).lower()) if i != axis]
    if len(rest) == 2 and rest[1] in "lr":  # the columns run left-right
        first = "L" if rest[1] == "l" else "R"  # the letter is where the axis starts
        second = "R" if first == "L" else "L"
        ax.text(0, -0.5, first, ha="left", va="bottom", fontsize=7, fontweight="bold")
        ax.text(cols - 1, -0.5, second, ha="right", va="bottom", fontsize=7, fontweight="bold")


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def region_slices_figure(
    regions: pd.DataFrame,
    annotation: np.ndarray,
    ontology,
    *,
    value: str = "log2_fold_change",
    orientation: str = "asr",
    n_slices: int = 5,
    alpha: float = 0.05,
    focus: tuple[str, ...] = (),
    resolution_um: float | None = None,
    bregma_ap_um: float = BREGMA_AP_UM,
):
    """Coronal atlas slices coloured by a per-region value, one row per contrast.

    Only regions called at ``q < alpha`` are coloured (the rest stay grey): fold
    changes of untested or uncalled regions, often small cortical layers with a few
    cells, would otherwise dominate the picture.

    Parameters
    ----------
    regions : DataFrame
        Output of :func:`ketamap.stats.compare_regions`.
    annotation : ndarray
        Atlas labels.
    ontology : Ontology
    value : {"log2_fold_change", "q"}
        ``"q"`` is shown as ``-log10 q`` signed by the direction of change.
    orientation : str
        Atlas orientation code, to find the coronal axis.
    n_slices : int
        Slices per row.
    alpha : float
        ``q`` threshold drawn on the colour bar of the q map.
    focus : tuple of str
        Regions the slices should pass through first (e.g. key regions and
        top hits); remaining slices are spread evenly.
    resolution_um : float, optional
        The atlas' voxel size along the anterior-posterior axis. With it each slice
        is titled by its position in mm from bregma (anterior positive) and the first
        panel gets a 1 mm scale bar and its left and right sides.
    bregma_ap_um : float
        Bregma's distance from the anterior face of the atlas volume (µm), 5400 for
        the Allen CCFv3 and atlases in its space (the phantom).

    Returns
    -------
    matplotlib.figure.Figure
    """
    axis = coronal_axis(orientation)
    anterior_first = str(orientation).lower()[axis] == "a"
    chosen = region_slice_positions(annotation, ontology, focus, axis=axis, n=n_slices)
    positions = [p for p, _ in chosen]
    names = dict(chosen)
    contrasts = sorted(regions["contrast"].unique()) or ["(none)"]
    fig = _figure(2.3 * len(positions) + 0.8, 2.0 * len(contrasts) + 0.4)
    axes = fig.subplots(len(contrasts), len(positions), squeeze=False)
    slabs = [_take(annotation, axis, p) for p in positions]
    slabs_n = annotation.shape[axis]
    if value == "q":
        cmap, label = "RdBu_r", "signed -log10 q (red: increase)"
    else:
        cmap, label = "RdBu_r", "log2 fold change"
    image = None
    for row_i, (row, contrast) in enumerate(zip(axes, contrasts, strict=True)):
        r = regions[(regions["contrast"] == contrast) & (regions["q"] < alpha)]
        if value == "q":
            v = -np.log10(np.clip(r["q"].to_numpy(float), 1e-12, 1)) * np.sign(
                r["log2_fold_change"].to_numpy(float)
            )
            lim = max(2.0, float(np.nanmax(np.abs(v), initial=0.0)))
        else:
            v = r["log2_fold_change"].to_numpy(float)
            lim = max(0.5, float(np.nanpercentile(np.abs(v), 98)) if v.size else 0.5)
        values = dict(zip(r["region_id"].astype(int), v, strict=True))
        for ax, slab, pos in zip(row, slabs, positions, strict=True):
            painted = region_value_volume(slab, ontology, values)
            ax.imshow(np.where(slab > 0, 0.92, 1.0), cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")  # fmt: skip
            image = ax.imshow(np.ma.masked_invalid(painted), cmap=cmap, vmin=-lim, vmax=lim,
                              interpolation="nearest")  # fmt: skip
            _outline(ax, slab)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(contrast, fontsize=8)
            if row_i == 0:
                where = f"slice {pos}"
                if resolution_um:
                    from_front = (pos if anterior_first else slabs_n - 1 - pos) * resolution_um
                    where = f"AP {(bregma_ap_um - from_front) / 1000:+.1f} mm"
                ax.set_title(where + (f" ({names[pos]})" if names[pos] else ""), fontsize=7)
            if resolution_um and row_i == 0 and ax is row[0]:
                _scale_and_sides(ax, slab.shape, resolution_um, orientation, axis)
        if image is not None:
            cb = fig.colorbar(image, ax=list(row), shrink=0.8, pad=0.01)
            cb.set_label(label, fontsize=7)
            if value == "q":
                t = -np.log10(alpha)
                cb.ax.axhline(t, color="black", lw=0.8)
                cb.ax.axhline(-t, color="black", lw=0.8)
    return fig


def voxel_slices_figure(
    t_maps: dict[str, np.ndarray],
    p_maps: dict[str, np.ndarray] | None,
    mask: np.ndarray,
    *,
    orientation: str = "asr",
    n_slices: int = 5,
    alpha: float = 0.05,
    label: str = "t (group − reference)",
    centred: bool = True,
):
    """Coronal slices of voxel maps (t by default), with FWE-significant voxels outlined.

    Parameters
    ----------
    t_maps : dict of str to ndarray
        One map per row (per contrast, the t map; or per group, a mean density).
    p_maps : dict of str to ndarray, optional
        Per row, the family-wise corrected p map (same grid); None: no outlines.
    mask : ndarray of bool
        Brain mask of the grid.
    orientation : str
        Atlas orientation code.
    n_slices : int
        Slices per row.
    alpha : float
        Voxels with ``p_fwe < alpha`` are outlined in black.
    label : str
        Label of the colour bars.
    centred : bool
        True: a diverging scale centred on 0 per row (t maps); False: a sequential scale
        from 0 to the 99.5th percentile over all rows, shared so that rows compare
        (densities).

    Returns
    -------
    matplotlib.figure.Figure
    """
    axis = coronal_axis(orientation)
    positions = slice_positions(mask, axis, n_slices)
    names = list(t_maps) or ["(none)"]
    fig = _figure(2.3 * len(positions) + 0.8, 2.0 * len(names) + 0.4)
    axes = fig.subplots(len(names), len(positions), squeeze=False)
    top = 1.0
    if not centred and mask.any() and t_maps:
        top = float(np.nanpercentile(np.concatenate([m[mask] for m in t_maps.values()]), 99.5))
        top = top if top > 0 else 1.0
    for row_i, (row, name) in enumerate(zip(axes, names, strict=True)):
        t = t_maps.get(name)
        if t is None:
            row[0].text(0.5, 0.5, "no voxel maps", ha="center", va="center")
            for ax in row:
                ax.set_axis_off()
            continue
        if centred:
            lim = max(3.0, float(np.nanpercentile(np.abs(t[mask]), 99.5)) if mask.any() else 3.0)
            cmap, vmin, vmax = "RdBu_r", -lim, lim
        else:
            cmap, vmin, vmax = "magma", 0.0, top
        image = None
        for ax, pos in zip(row, positions, strict=True):
            m2 = _take(mask, axis, pos)
            ax.imshow(np.where(m2, 0.92, 1.0), cmap="gray", vmin=0, vmax=1)
            image = ax.imshow(np.ma.masked_where(~m2, _take(t, axis, pos)), cmap=cmap,
                              vmin=vmin, vmax=vmax, interpolation="nearest")  # fmt: skip
            if p_maps is not None and name in p_maps:
                sig = _take(p_maps[name], axis, pos) < alpha
                if sig.any():
                    ax.contour(sig.astype(float), levels=[0.5], colors="black", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(name, fontsize=8)
            if row_i == 0:
                ax.set_title(f"slice {pos}", fontsize=8)
        cb = fig.colorbar(image, ax=list(row), shrink=0.8, pad=0.01)
        cb.set_label(label, fontsize=7)
    return fig


def network_figure(networks: pd.DataFrame, edges: pd.DataFrame, *, alpha: float = 0.05):
    """Heatmaps of the regional correlation network per group and of each difference.

    Parameters
    ----------
    networks : DataFrame
        ``group, region_a, region_b, r`` (see :func:`ketamap.stats.network.compare_networks`).
    edges : DataFrame
        ``contrast, region_a, region_b, delta_r, p_fwe, q``; edges with
        ``q < alpha`` are marked with a dot, ``p_fwe < alpha`` with a ring.
    alpha : float
        Level of the marks.

    Returns
    -------
    matplotlib.figure.Figure
    """
    regions = list(dict.fromkeys(list(networks["region_a"]) + list(networks["region_b"])))
    index = {r: i for i, r in enumerate(regions)}
    groups = list(dict.fromkeys(networks["group"]))
    contrasts = list(dict.fromkeys(edges["contrast"])) if len(edges) else []
    panels = [("group", g) for g in groups] + [("contrast", c) for c in contrasts]
    n = max(1, len(panels))
    size = max(2.6, min(4.2, 0.09 * len(regions) + 1.8))
    fig = _figure(size * n + 0.6, size + 0.4)
    axes = fig.subplots(1, n, squeeze=False)[0]

    def matrix(df, column):
        m = np.full((len(regions), len(regions)), np.nan)
        i = df["region_a"].map(index).to_numpy()
        j = df["region_b"].map(index).to_numpy()
        m[i, j] = m[j, i] = df[column].to_numpy(float)
        np.fill_diagonal(m, 1.0 if column == "r" else 0.0)
        return m

    im_r = im_d = None
    for ax, (kind, name) in zip(axes, panels, strict=False):
        if kind == "group":
            im_r = ax.imshow(matrix(networks[networks["group"] == name], "r"), cmap="RdBu_r",
                             vmin=-1, vmax=1, interpolation="nearest")  # fmt: skip
            ax.set_title(f"r in {name}", fontsize=9)
        else:
            e = edges[edges["contrast"] == name]
            im_d = ax.imshow(matrix(e, "delta_r"), cmap="PuOr_r", vmin=-2, vmax=2,
                             interpolation="nearest")  # fmt: skip
            for col, style in (
                ("q", dict(s=6, c="black")),
                ("p_fwe", dict(s=40, facecolors="none", edgecolors="black")),
            ):
                hit = e[e[col] < alpha]
                if len(hit):
                    i, j = hit["region_a"].map(index), hit["region_b"].map(index)
                    ax.scatter(np.r_[j, i], np.r_[i, j], lw=0.8, **style)  # fmt: skip
            ax.set_title(f"Δr {name}", fontsize=9)
        ticks = range(len(regions))
        small = len(regions) <= 40
        ax.set_xticks(ticks if small else [], regions if small else [], rotation=90, fontsize=5)
        ax.set_yticks(ticks if small else [], regions if small else [], fontsize=5)
    if not panels:
        axes[0].text(0.5, 0.5, "no network", ha="center", va="center")
        axes[0].set_axis_off()
    if im_r is not None:
        fig.colorbar(im_r, ax=list(axes[: len(groups)]), shrink=0.7).set_label("r", fontsize=7)
    if im_d is not None:
        fig.colorbar(im_d, ax=list(axes[len(groups) :]), shrink=0.7).set_label("Δr", fontsize=7)
    return fig
