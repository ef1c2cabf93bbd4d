"""Atlas-slice, voxel-map and network figures, and their section in the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.atlas import make_phantom
from ketamap.report.figures import figure_bytes
from ketamap.report.maps import (
    coronal_axis,
    network_figure,
    region_slice_positions,
    region_slices_figure,
    region_value_volume,
    voxel_slices_figure,
)


@pytest.fixture(scope="module")
def atlas():
    return make_phantom(resolution_um=200)


def test_each_voxel_takes_its_most_specific_tested_region(atlas):
    onto = atlas.ontology
    vta, mb = onto.lookup("VTA"), onto.lookup("MB")
    values = {mb: 1.0, vta: -2.0, onto.lookup("SNc"): np.nan}
    painted = region_value_volume(atlas.annotation, onto, values)
    assert np.all(painted[atlas.annotation == vta] == -2.0)
    snc = atlas.annotation == onto.lookup("SNc")
    assert snc.any() and np.all(painted[snc] == 1.0)  # NaN: falls back to the parent
    assert np.all(np.isnan(painted[atlas.annotation == 0]))
    ctx = np.isin(atlas.annotation, onto.descendants(onto.lookup("CTX"), include_self=True))
    assert np.all(np.isnan(painted[ctx]))


def test_slices_pass_through_the_focus_regions(atlas):
    onto = atlas.ontology
    axis = coronal_axis(atlas.orientation)
    assert axis == 0
    chosen = region_slice_positions(atlas.annotation, onto, ("VTA", "NOPE", "ZI"), axis=axis, n=4)
    assert len(chosen) == 4 and [p for p, _ in chosen] == sorted(p for p, _ in chosen)
    named = {name: pos for pos, name in chosen if name}
    assert "VTA" in " ".join(named)
    pos = next(p for p, n in chosen if "VTA" in n)
    assert (atlas.annotation[pos] == onto.lookup("VTA")).any()


def test_figures_render_to_png_and_svg(atlas):
    onto = atlas.ontology
    ids = [onto.lookup(a) for a in ("VTA", "ZI", "MB")]
    regions = pd.DataFrame({
        "region_id": ids * 2, "contrast": ["ket_vs_sal"] * 3 + ["dose_trend"] * 3,
        "log2_fold_change": [-1.0, 1.0, 0.1, -0.8, 0.9, 0.0], "p": 0.01,
        "q": [0.01, 0.02, 0.5, 0.03, 0.04, 0.9],
    })  # fmt: skip
    for value in ("log2_fold_change", "q"):
        fig = region_slices_figure(regions, atlas.annotation, onto, value=value, focus=("VTA",))
        assert len(fig.axes) >= 2 * 5
        assert figure_bytes(fig, "svg").startswith(b"<?xml")
    mask = atlas.annotation > 0
    t = np.where(mask, np.random.default_rng(0).normal(size=mask.shape), 0).astype(np.float32)
    p = np.where(t > 2, 0.01, 1.0)
    fig = voxel_slices_figure({"ket_vs_sal": t}, {"ket_vs_sal": p}, mask)
    assert figure_bytes(fig).startswith(b"\x89PNG")
    nets = pd.DataFrame({"group": ["sal"] * 3 + ["ket"] * 3, "region_a": ["A", "A", "B"] * 2,
                         "region_b": ["B", "C", "C"] * 2,
                         "r": [0.1, 0.5, -0.2, 0.9, 0.4, 0.0]})  # fmt: skip
    edges = pd.DataFrame({"contrast": "ket_vs_sal", "region_a": ["A", "A", "B"],
                          "region_b": ["B", "C", "C"], "delta_r": [0.8, -0.1, 0.2],
                          "p_fwe": [0.01, 1, 1], "q": [0.01, 1, 1]})  # fmt: skip
    fig = network_figure(nets, edges)
    assert [a.get_title() for a in fig.axes[:3]] == ["r in sal", "r in ket", "Δr ket_vs_sal"]
    assert figure_bytes(fig).startswith(b"\x89PNG")


def test_report_shows_the_maps_section_and_methods(census_case):
    from ketamap.report import render_report
    from ketamap.report.figures import _figure
    from ketamap.stats.network import NetworkParams
    from ketamap.stats.voxels import VoxelParams

    study, subjects, qc, regions, counts = census_case
    fig = _figure(2, 2)
    fig.subplots().plot([0, 1])
    methods = {"stats": {"alpha": 0.05}, "voxels": VoxelParams().__dict__,
               "network": NetworkParams().__dict__}  # fmt: skip
    table = pd.DataFrame({"contrast": ["k_vs_s"], "p_fwe": [0.03]})
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         methods=methods, extra_figures=[("voxel_t_maps", fig, "t maps")],
                         extra_tables=[{"title": "Voxel clusters", "columns": ["contrast", "p_fwe"],
                                        "frame": table}])  # fmt: skip
    assert 'id="maps"' in html and 'id="fig-voxel_t_maps"' in html
    assert "<h3>Voxel clusters</h3>" in html and "k_vs_s" in html
    assert "density map on a 100 µm grid with a gaussian kernel of radius 250 µm" in html
    assert "cluster mass" in html and "Inter-regional covariance" in html


def test_atlas_slices_in_mm_from_bregma_with_only_called_regions(atlas):
    """Slices are titled by AP mm from bregma, with a 1 mm bar and L/R; only regions
    called at q < alpha are painted."""
    onto = atlas.ontology
    ids = [onto.lookup(a) for a in ("VTA", "ZI", "MB")]
    regions = pd.DataFrame({"region_id": ids, "contrast": "ket_vs_sal",
                            "log2_fold_change": [-1.0, 1.0, 4.0], "p": 0.01,
                            "q": [0.01, 0.02, 0.5]})  # fmt: skip
    res = atlas.resolution_um[coronal_axis(atlas.orientation)]
    fig = region_slices_figure(regions, atlas.annotation, onto, focus=("VTA",),
                               resolution_um=res)  # fmt: skip
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles and all(t.startswith("AP ") and " mm" in t for t in titles), titles
    first = fig.axes[0]
    assert {"1 mm", "L", "R"} <= {t.get_text() for t in first.texts}
    # MB's fold change of 4 (q 0.5) is not painted: the colour scale ends near 1
    painted = [im for im in first.get_images() if im.get_cmap().name == "RdBu_r"]
    assert painted and painted[0].get_clim()[1] < 2
