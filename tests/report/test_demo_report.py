"""The demo's report shows the planted ketamine directions and their dose trend.

Runs the full demo (simulated ketamine 10-day study, phantom atlas, 3 groups ×
4 mice) once; about three minutes on two cores, hence ``slow``.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ALPHA = 0.05
# (acronym, contrast, sign) planted by the ketamine-10day scenario
AT_30 = [("DR", -1), ("DMH", -1), ("MPN", -1), ("ZI", +1), ("SNr", +1)]
AT_100 = [("VTA", -1), ("SNc", -1), ("PVH", +1), ("ARH", +1), ("VMH", +1), ("LHA", +1)]


class RegionTable(HTMLParser):
    """Reads the header, cells and row classes of ``<table id="region-table">``."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.header, self.rows, self.classes = [], [], []
        self._cell = None
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "region-table":
            self.inside = True
        elif self.inside and tag == "tr":
            self._row = []
            self.classes.append(attrs.get("class", ""))
        elif self.inside and tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if not self.inside:
            return
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            if self._row and not self.header:
                self.header = self._row
                self.classes.pop()
            elif self._row:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self.inside = False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from ketamap.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, n_per_group=4, n_jobs=2, seed=0)
    return out


@pytest.fixture(scope="module")
def html_table(demo):
    parser = RegionTable()
    parser.feed((demo / "report.html").read_text(encoding="utf-8"))
    table = pd.DataFrame(parser.rows, columns=parser.header)
    table["called_row"] = [c == "called" for c in parser.classes]
    for col in ("log2_fold_change", "q"):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    return table


def _row(table, acronym, contrast):
    hit = table[(table["acronym"] == acronym) & (table["contrast"] == contrast)]
    assert len(hit) == 1, (acronym, contrast, len(hit))
    return hit.iloc[0]


@pytest.mark.parametrize(("acronym", "sign"), AT_30)
def test_thirty_mg_directions_are_called_in_the_report(html_table, acronym, sign):
    r = _row(html_table, acronym, "ket30_vs_saline")
    assert r["q"] < ALPHA and r["called_row"]
    assert np.sign(r["log2_fold_change"]) == sign


@pytest.mark.parametrize(("acronym", "sign"), AT_100)
def test_hundred_mg_directions_and_dose_trend_are_called(html_table, acronym, sign):
    r = _row(html_table, acronym, "ket100_vs_saline")
    assert r["q"] < ALPHA and r["called_row"]
    assert np.sign(r["log2_fold_change"]) == sign
    # the effect grows with dose: a significant log-linear dose trend of the same sign
    t = _row(html_table, acronym, "dose_trend")
    assert t["q"] < ALPHA and t["called_row"]
    assert np.sign(t["log2_fold_change"]) == sign


def test_report_table_matches_the_stats_output(demo, html_table):
    regions = pd.read_csv(demo / "stats" / "regions.csv")
    assert len(html_table) == len(regions)
    for acronym, sign in AT_100:
        r = regions[(regions["acronym"] == acronym) & (regions["contrast"] == "dose_trend")]
        assert (np.sign(r["log2_fold_change"]) == sign).all() and (r["q"] < ALPHA).all()


def test_report_has_atlas_voxel_and_network_sections(demo):
    html = (demo / "report.html").read_text(encoding="utf-8")
    for fig in ("atlas_log2_fold_change", "atlas_q", "voxel_t_maps", "network"):
        assert f'id="fig-{fig}"' in html
        for fmt in ("png", "svg"):
            assert (demo / "report" / "figures" / f"{fig}.{fmt}").stat().st_size > 1000
    assert re.search(r"density map on a 100 µm grid", html)
    assert "Inter-regional covariance" in html


def test_voxel_maps_open_as_nifti_and_ome_zarr(demo):
    import SimpleITK as sitk

    from ketamap.io.volumes import open_volume, read_voxel_size_um

    folder = demo / "stats" / "voxel_maps"
    for name in ("mask", "mean_density_saline", "t_ket100_vs_saline", "p_fwe_ket100_vs_saline",
                 "log2_fold_change_ket30_vs_saline"):  # fmt: skip
        img = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
        assert img.GetSpacing() == pytest.approx((0.1, 0.1, 0.1))
        zarr = open_volume(folder / f"{name}.ome.zarr")
        assert read_voxel_size_um(folder / f"{name}.ome.zarr") == pytest.approx((100,) * 3)
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == zarr.shape
        np.testing.assert_allclose(arr, np.asarray(zarr), rtol=1e-6)
    p = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "p_fwe_ket100_vs_saline.nii.gz")))
    assert 0 < p.min() <= p.max() <= 1
    clusters = pd.read_csv(demo / "stats" / "voxel_clusters.csv")
    assert {"contrast", "sign", "p_fwe", "peak_acronym"} <= set(clusters.columns)
    edges = pd.read_csv(demo / "stats" / "network_edges.csv")
    assert {"ket30_vs_saline", "ket100_vs_saline"} == set(edges["contrast"])
    assert edges["p"].between(0, 1).all() and edges["q"].between(0, 1).all()


def test_voxel_test_finds_the_planted_hypothalamic_increase(demo):
    """The strongest ket100 voxel cluster is a called increase peaking in the hypothalamus."""
    from ketamap.atlas import make_phantom

    onto = make_phantom(resolution_um=200).ontology
    hy = onto.lookup("HY")
    clusters = pd.read_csv(demo / "stats" / "voxel_clusters.csv", keep_default_na=False)
    c = clusters[clusters["contrast"] == "ket100_vs_saline"]
    top = c.sort_values(["p_fwe", "statistic"], ascending=[True, False]).iloc[0]
    assert top["sign"] == "increase" and top["p_fwe"] < ALPHA
    assert hy in onto.ancestors(onto.lookup(top["peak_acronym"]), include_self=True)


def test_demo_recovers_the_planted_fibre_effects(demo):
    import json

    found = json.loads((demo / "fibres" / "evaluation.json").read_text())
    hits = [p for p in found["planted"] if p["called"] and p["right_direction"]]
    assert {(p["acronym"], p["contrast"]) for p in hits} >= {
        ("PL", "ket100_vs_saline"), ("CP", "ket100_vs_saline"), ("SSp", "ket100_vs_saline"),
    }  # fmt: skip
    assert found["null_called"] <= 1 and found["null_tests"] == 14
    # in the crops' interiors, as the accuracy benchmark; the target is +-10 % per region
    assert found["length_error"]["median"] < 0.06 and found["length_error"]["max"] <= 0.10
    stats = pd.read_csv(demo / "fibres" / "fibres.csv")
    assert {"PL", "CP", "SSp"} <= set(stats.loc[stats["q"] < 0.05, "acronym"])
