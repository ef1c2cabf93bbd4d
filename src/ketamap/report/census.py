"""The census report's map sections: atlas slices, voxel maps and correlation networks.

:func:`map_sections` reads what the statistics stage wrote and returns the
figures (with their captions) and tables that the report shows after the
region results; tests the design could not support are said plainly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ketamap.io.volumes import open_volume
from ketamap.report.figures import top_hits
from ketamap.report.maps import (
    coronal_axis,
    network_figure,
    region_slices_figure,
    voxel_slices_figure,
)

if TYPE_CHECKING:
    from ketamap.atlas import Atlas

__all__ = ["map_sections", "fibre_sections"]


def map_sections(
    stats_dir: Path,
    atlas: Atlas,
    regions: pd.DataFrame,
    *,
    key_regions: Sequence[str],
    alpha: float,
    voxel_alpha: float,
    network_alpha: float,
) -> tuple[list, list]:
    """Atlas-slice, voxel-map and network figures and tables of the census report.

    Parameters
    ----------
    stats_dir : Path
        The study's ``stats`` folder (its ``provenance.json``, ``voxel_maps/``,
        ``voxel_clusters`` and ``network_*`` tables, whichever exist).
    atlas : Atlas
        The study's atlas.
    regions : DataFrame
        The region statistics (``stats/regions``).
    key_regions : sequence of str
        Regions the slices go through after the strongest hits.
    alpha, voxel_alpha, network_alpha : float
        The levels at which regions, voxels and network edges are called.

    Returns
    -------
    figures : list of (name, Figure, caption)
    tables : list of dict
        ``title``, ``text`` (optional), ``columns`` and ``frame`` of each table.
    """
    figures, tables = [], []
    # slices through the strongest hits first, then the key regions of the two studies
    focus = tuple(dict.fromkeys(top_hits(regions, 3, alpha=alpha) + list(key_regions)))
    for value, caption in (
        ("log2_fold_change", "Atlas slices (coronal) coloured by each region's log2 fold change "
                             f"where it is called at q < {alpha:g} (most specific called "
                             "region; the rest grey), one row per contrast; AP in mm from "
                             "bregma (5.4 mm behind the front of the CCFv3 volume)."),
        ("q", "Atlas slices coloured by -log10 q signed by the direction of change (red: "
              f"increase); the lines on the colour bar mark q = {alpha:g}."),
    ):  # fmt: skip
        fig = region_slices_figure(regions, atlas.annotation, atlas.ontology, value=value,
                                   orientation=atlas.orientation, alpha=alpha, focus=focus,
                                   resolution_um=atlas.resolution_um[coronal_axis(
                                       atlas.orientation)])  # fmt: skip
        figures.append((f"atlas_{value}", fig, caption))
    # tests the design cannot support: said plainly, not shown as empty results
    found = json.loads((stats_dir / "provenance.json").read_text()).get("result", {})
    # each entry is a dict ({"skipped": reason} or the voxel maps' record) or, for a
    # network that ran, its summary records
    parts = {k: v for k, v in found.items() if k in ("voxels", "network") and isinstance(v, dict)}
    untestable = [v.get("skipped") for v in parts.values()]
    untestable += [c.get("skipped") for c in parts.get("voxels", {}).get("contrasts", [])]
    untestable = [u for u in untestable if u]
    if untestable:
        tables.append({"title": "Tests the design cannot support",
                       "text": "Not tested: " + " ".join(f"{u}." for u in untestable),
                       "columns": [], "frame": pd.DataFrame()})  # fmt: skip
    caption = ("Voxel-wise t maps of log density (group minus reference) on coronal slices; "
               f"black outlines: FWE-corrected p < {voxel_alpha:g}. The maps open in napari or "
               "ITK-SNAP from stats/voxel_maps (OME-Zarr, NIfTI).")  # fmt: skip
    vox_figures, vox_tables = _voxel_sections(
        stats_dir, "", orientation=atlas.orientation, alpha=voxel_alpha, caption=caption,
        title="Voxel clusters (FWE-corrected)",
    )  # fmt: skip
    figures += vox_figures
    tables += vox_tables
    if (stats_dir / "network_edges.parquet").exists():
        edges = pd.read_parquet(stats_dir / "network_edges.parquet")
        groups = pd.read_parquet(stats_dir / "network_groups.parquet")
        summary = pd.read_parquet(stats_dir / "network_summary.parquet")
        net_alpha = float(network_alpha)
        figures.append(("network", network_figure(groups, edges, alpha=net_alpha),
                        "Inter-regional correlation of densities across mice per group, and "
                        f"the difference from the reference (dot: q < {net_alpha:g}; ring: "
                        f"FWE-corrected p < {net_alpha:g})."))  # fmt: skip
        tables.append({
            "title": "Correlation networks",
            "text": "Global test: mean |Δr| over edges against its permutation distribution.",
            "columns": list(summary.columns), "frame": summary,
        })  # fmt: skip
        top = edges.sort_values("p").head(25)
        tables.append({
            "title": "Strongest edge differences",
            "columns": ["contrast", "region_a", "region_b", "r_ref", "r_group", "delta_r", "p",
                        "p_fwe", "q"],
            "frame": top,
        })  # fmt: skip
    return figures, tables


def _read_map(folder: Path, name: str) -> np.ndarray:
    return np.asarray(open_volume(folder / f"{name}.ome.zarr").compute())


def _voxel_sections(
    stats_dir: Path,
    prefix: str,
    *,
    orientation: str,
    alpha: float,
    caption: str,
    title: str,
    means_caption: str | None = None,
) -> tuple[list, list]:
    """Return the t maps (FWE outlines), clusters and optionally means of ``<prefix>voxel_maps``.

    The one place that reads what :func:`~ketamap.stats.voxel_maps.write_voxel_maps`
    wrote, for the cells' maps (``prefix=""``) and the fibres' (``"fibre_"``).
    """
    figures, tables = [], []
    vox_dir = stats_dir / f"{prefix}voxel_maps"
    if not vox_dir.is_dir():
        return figures, tables
    mask = _read_map(vox_dir, "mask") > 0
    alpha = float(alpha)
    if means_caption is not None:
        groups = sorted(p.name[len("mean_density_") : -len(".ome.zarr")]
                        for p in vox_dir.glob("mean_density_*.ome.zarr"))  # fmt: skip
        if groups:
            means = {g: _read_map(vox_dir, f"mean_density_{g}") for g in groups}
            fig = voxel_slices_figure(means, None, mask, orientation=orientation,
                                      label="mm per mm³", centred=False)  # fmt: skip
            figures.append((f"{prefix}voxel_means", fig, means_caption))
    clusters_file = stats_dir / f"{prefix}voxel_clusters.parquet"
    names = sorted(p.name[len("t_") : -len(".ome.zarr")] for p in vox_dir.glob("t_*.ome.zarr"))
    if clusters_file.exists() and names:
        t_maps = {n: _read_map(vox_dir, f"t_{n}") for n in names}
        p_maps = {n: _read_map(vox_dir, f"p_fwe_{n}") for n in names}
        fig = voxel_slices_figure(t_maps, p_maps, mask, orientation=orientation, alpha=alpha)
        figures.append((f"{prefix}voxel_t_maps", fig, caption))
        clusters = pd.read_parquet(clusters_file)
        if len(clusters):
            shown = clusters[clusters["p_fwe"] < alpha]
            cols = ["contrast", "sign", "n_voxels", "volume_mm3", "statistic", "peak_t",
                    "peak_acronym", "p_fwe"]  # fmt: skip
            tables.append({
                "title": title,
                "text": f"{len(shown)} of {len(clusters)} clusters with p_fwe < {alpha:g}.",
                "columns": cols, "frame": shown.sort_values("p_fwe").head(200),
            })  # fmt: skip
    return figures, tables


def fibre_sections(
    stats_dir: Path,
    *,
    alpha: float,
    voxel_alpha: float = 0.05,
    orientation: str = "asr",
) -> tuple[list, list]:
    """Volcano plots, tables and atlas slice maps of the fibre statistics, if any.

    Parameters
    ----------
    stats_dir : Path
        The study's ``stats`` folder (``fibres``, and ``fibre_voxel_maps/`` with
        ``fibre_voxel_clusters`` when the voxel maps were made).
    alpha : float
        The level at which regions are called (``q < alpha``).
    voxel_alpha : float
        The FWE level at which voxels are outlined and clusters called.
    orientation : str
        The atlas' orientation code (for the coronal slices).

    Returns
    -------
    figures : list of (name, Figure, caption)
    tables : list of dict
        As :func:`map_sections`; both empty when the study measured no fibres.
    """
    from ketamap.report.figures import volcano_figure

    path = stats_dir / "fibres.parquet"
    if not path.exists():
        return [], []
    found = pd.read_parquet(path)
    figures, tables = [], []
    titles = {
        "length_density_mm_per_mm3": "fibre length density (mm per mm³)",
        "voxel_fraction": "fibre voxel fraction (projection density)",
    }
    for measure, part in found.groupby("measure", sort=False):
        title = titles.get(str(measure), str(measure))
        caption = (
            f"TH+ {title} per region: log2 fold change against -log10 p per contrast "
            f"(moderated t on log densities; red: q < {alpha:g})."
        )
        figures.append((f"volcano_fibres_{measure}", volcano_figure(part, alpha=alpha), caption))
        shown = part.sort_values("p").head(30)
        tables.append({
            "title": f"Fibres: {title}",
            "text": f"{int((part['q'] < alpha).sum())} of {len(part)} region and contrast "
                    f"rows with q < {alpha:g}; the 30 smallest p shown "
                    "(stats/fibres.csv has every row).",
            "columns": ["acronym", "level", "contrast", "log2_fold_change", "ci_low_log2",
                        "ci_high_log2", "p", "q", "mean_ref", "mean_group"],
            "frame": shown,
        })  # fmt: skip
    prov = stats_dir / "provenance.json"
    found = json.loads(prov.read_text()).get("result", {}) if prov.exists() else {}
    record = found.get("fibre_voxels") if isinstance(found.get("fibre_voxels"), dict) else {}
    untestable = [record.get("skipped")] + [c.get("skipped") for c in record.get("contrasts", [])]
    untestable = [u for u in untestable if u]
    if untestable:
        tables.append({"title": "Fibre voxel tests the design cannot support",
                       "text": "Not tested: " + " ".join(f"{u}." for u in untestable),
                       "columns": [], "frame": pd.DataFrame()})  # fmt: skip
    vox_figures, vox_tables = _voxel_sections(
        stats_dir, "fibre_", orientation=orientation, alpha=voxel_alpha,
        caption="Voxel-wise t maps of log fibre length density (group minus reference) on "
                f"coronal slices; black outlines: FWE-corrected p < {voxel_alpha:g} (the cells' "
                "test). The maps open in napari or ITK-SNAP from stats/fibre_voxel_maps.",
        title="Fibre voxel clusters (FWE-corrected)",
        means_caption="TH+ fibre length density in atlas space (mm per mm³), mean per group, "
                      "smoothed as the cell density maps, on coronal slices (one scale for "
                      "all groups).",
    )  # fmt: skip
    return figures + vox_figures, tables + vox_tables
