"""The HTML report and the figure files."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from ketamap.report import render_report, save_figures, write_report

VOID = {"meta", "img", "input", "br", "hr", "link"}


class Checker(HTMLParser):
    """Collects tags, checks nesting, and records resource references."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.refs, self.rows, self.tags = [], [], [], 0, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)
        if tag == "tr":
            self.rows += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def parse(html):
    checker = Checker()
    checker.feed(html)
    checker.close()
    return checker


@pytest.fixture(scope="module")
def data(census_case):
    return census_case


def region_table(html):
    start = html.index('id="region-table"')
    return html[start : html.index("</table>", start)]


def test_report_without_truth_or_images(data):
    study, subjects, qc, regions, counts = data
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts)
    checker = parse(html)
    assert not checker.errors and checker.stack == []
    assert html.lstrip().startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and "<link" not in html
    for ref in checker.refs:
        assert ref.startswith(("data:", "#")), ref
    assert region_table(html).count("<tr") == len(regions) + 1  # header + every row
    assert "Planted vs recovered" not in html
    assert "Ketamine &lt;TH&gt; census" in html and "<TH>" not in html
    assert "correlation &lt;0.8 &amp; low" in html
    assert 'class="flag"' in html and "extra_metric" in html
    assert html.count('src="data:image/png;base64,') == 2  # volcano + top-hit dots


def test_report_with_truth_images_and_methods(data):
    study, subjects, qc, regions, counts = data
    truth = pd.DataFrame({"acronym": ["VTA", "SNc"], "contrast": ["ketamine_100_vs_saline"] * 2,
                          "true_fold_change": [0.5, 1.5]})  # fmt: skip
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
        "kgAAAABJRU5ErkJggg=="
    )
    methods = {
        "stats": {"alpha": 0.05, "fdr_family": "contrast_level", "dispersion_prior_df": 10.0},
        "versions": {"numpy": np.__version__},
    }
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         truth=truth, key_regions=("VTA", "SNc", "ZI", "DMH"),
                         images={"registration/saline-0": png}, methods=methods)  # fmt: skip
    checker = parse(html)
    assert not checker.errors
    assert "http://" not in html and "https://" not in html
    assert "Planted vs recovered" in html and "of 2 planted effects were called" in html
    assert "registration/saline-0" in html
    assert html.count('src="data:image/png;base64,') == 5  # 4 figures + 1 image
    assert "Key regions not in the counts: DMH" in html
    assert "versions.numpy" in html and "10 prior degrees of freedom" in html
    assert region_table(html).count("<tr") == len(regions) + 1
    vta = regions[(regions.acronym == "VTA") & (regions.contrast == "ketamine_100_vs_saline")]
    assert vta["q"].iloc[0] < 0.05


def test_csv_link_holds_the_region_table(data):
    study, subjects, qc, regions, counts = data
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts)
    uri = re.search(r'href="data:text/csv;base64,([^"]+)"', html).group(1)
    import io

    back = pd.read_csv(io.BytesIO(base64.b64decode(uri)))
    assert len(back) == len(regions) and list(back.columns) == list(regions.columns)


def test_write_report_is_atomic(tmp_path, monkeypatch):
    """A write that dies half-way, or whose final rename fails, leaves the previous report
    whole and no temporary file; a write that succeeds replaces it."""
    import errno
    import pathlib

    from ketamap.errors import OutputError

    old = "<!DOCTYPE html><html><body>" + "old report " * 1000 + "</body></html>"
    new = "<!DOCTYPE html><html><body>" + "new report " * 1000 + "</body></html>"
    path = write_report(old, tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html" and path.read_text() == old

    def listing():
        return sorted(p.name for p in path.parent.iterdir())

    real_write_text = pathlib.Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise RuntimeError("killed while writing")

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", dies_half_way)
        with pytest.raises(RuntimeError, match="killed"):
            write_report(new, path)
    assert path.read_text() == old and listing() == ["report.html"]

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("os.replace", no_space)
        with pytest.raises(OutputError, match="No space left on device while writing"):
            write_report(new, path)
    assert path.read_text() == old and listing() == ["report.html"]

    assert write_report(new, path) == path
    assert path.read_text() == new and listing() == ["report.html"]


def test_save_figures_writes_png_and_svg(tmp_path, data):
    _, subjects, _, regions, counts = data
    paths = save_figures(regions, counts, subjects, tmp_path / "figs", key_regions=("VTA", "ZI"))
    names = {p.name for p in paths}
    assert {"volcano.png", "volcano.svg", "dose_response.png", "dots_key_regions.svg"} <= names
    for p in paths:
        head = p.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in p.read_bytes()


def test_qc_table_has_readable_headers_and_dashes_for_missing_values(data):
    study, subjects, qc, regions, counts = data
    qc = qc.assign(
        n_outside_tissue=pd.array([12] * 11 + [None], dtype="Int64"),
        tissue_fraction=pd.array([0.5] * 11 + [None], dtype="Float64"),
        tissue_atlas_dice=[0.91] * 11 + [np.nan],
    )
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts)
    start = html.index('<table id="qc-table">')
    table = html[start : html.index("</table>", start)]
    assert '<th title="n_outside_tissue">cells dropped outside tissue</th>' in table
    assert '<th title="tissue_atlas_dice">tissue vs atlas brain Dice</th>' in table
    assert '<th title="extra_metric">extra_metric</th>' in table  # unknown: its own name
    assert "<td>12</td>" in table and "<td>0.91</td>" in table
    last = table[table.rindex("<tr") :]
    assert last.count("<td>\u2014</td>") == 3  # the three missing values of the last mouse
    assert "<td>\u2014</td>" not in table[: table.rindex("<tr")]  # blank reasons stay blank


def test_planted_vs_recovered_counts_only_planted_effects(data):
    """A truth table as the simulator writes it (every region, most with no effect): only
    the planted rows are planted effects; the no-effect rows score the false calls."""
    study, subjects, qc, regions, counts = data
    contrast = "ketamine_100_vs_saline"
    acr = regions.loc[regions.contrast == contrast, "acronym"].astype(str).unique()
    truth = pd.DataFrame({"acronym": acr, "contrast": contrast, "true_fold_change": 1.0,
                          "planted": False})  # fmt: skip
    truth.loc[truth.acronym == "VTA", ["true_fold_change", "planted"]] = [0.5, True]
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         truth=truth)  # fmt: skip
    r = regions[regions.contrast == contrast]
    n_null_called = int(((r.q < 0.05) & (r.acronym != "VTA")).sum())
    import html as html_lib

    text = " ".join(html_lib.unescape(re.sub(r"<[^>]+>", " ", html)).split())
    assert "1 of 1 planted effects were called at q < 0.05 in the right direction" in text
    assert f"of {len(acr) - 1} tests of regions with no effect" in text
    assert f"{n_null_called} were called" in text
    start = html.index('id="truth"')
    table = html[start : html.index("</table>", start)]
    assert table.count("<tr") == 2  # the header and VTA: no null region listed as planted


def test_uninformative_intervals_are_not_printed_as_numbers(data):
    """A region with no cells in one group has a CI over 2^-33 to 2^30: shown as not
    estimable, never as "9.1e-11 to 1.8e+09"; the CSV download keeps the numbers."""
    study, subjects, qc, regions, counts = data
    regions = regions.copy()
    row = (regions.acronym == "VTA") & (regions.contrast == "ketamine_100_vs_saline")
    regions.loc[row, ["ci_low_log2", "ci_high_log2"]] = [-33.4, 30.7]
    truth = pd.DataFrame({"acronym": ["VTA"], "contrast": ["ketamine_100_vs_saline"],
                          "true_fold_change": [0.5], "planted": [True]})  # fmt: skip
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         truth=truth)  # fmt: skip
    assert "not estimable" in html
    assert "-33.4" not in region_table(html) and "30.7" not in region_table(html)
    uri = re.search(r'href="data:text/csv;base64,([^"]+)"', html).group(1)
    assert "-33.4" in base64.b64decode(uri).decode()


def test_key_results_box_at_the_top(data):
    """What changed, where and how sure, before anything else, as the console prints it."""
    study, subjects, qc, regions, counts = data
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts)
    start = html.index("id='key-results'")
    box = html[start : html.index("</div>", start)]
    assert start < html.index('id="design"')
    called = regions[(regions.contrast == "ketamine_100_vs_saline") & (regions.q < 0.05)]
    assert f"ketamine_100_vs_saline: {len(called)} region" in box
    assert "VTA ×0.48 (q 3e-06)" in box  # the planted halving, with its fold change and q
    assert "1 of 12 mice counted although their QC flagged them" in box


def test_dot_plots_carry_confidence_intervals_and_significance_marks(data):
    """Each group: its mice, the mean, the mean's 95% CI; a group whose contrast with the
    reference is called gets stars by its q."""
    from ketamap.report.figures import dot_figure

    study, subjects, qc, regions, counts = data
    fig = dot_figure(counts, subjects, ["VTA", "R5"], regions=regions, alpha=0.05)
    vta, other = fig.axes[0], fig.axes[1]
    q = regions.loc[(regions.acronym == "VTA") & (regions.contrast == "ketamine_100_vs_saline"),
                    "q"].iloc[0]  # fmt: skip
    assert q < 0.05 / 50
    assert [t.get_text() for t in vta.texts] == ["***"]  # only the called group is marked
    called_r5 = (regions.acronym == "R5") & (regions.q < 0.05)
    assert len(other.texts) == int(called_r5.sum())
    assert len(vta.collections) >= 3 * 3  # per group: mice, mean bar, CI line


def test_images_open_full_size_and_figures_link_to_their_files(data):
    """Every figure and QC image opens in the page's own lightbox (no network, no
    ``data:`` navigation, which browsers refuse); with a figure folder the captions
    link to the PNG and SVG files, without one the page links to nothing outside."""
    study, subjects, qc, regions, counts = data
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6"
        "kgAAAABJRU5ErkJggg=="
    )
    images = {"registration/saline-0": png, "checkerboard/saline-0": png}
    html = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                         images=images, figure_folder="report/figures",
                         qc_boundary_level=5)  # fmt: skip
    checker = parse(html)
    assert not checker.errors
    n_img = html.count("<img ")
    assert n_img == 4 + 1  # volcano, top-hit dots, two QC images, and the lightbox's own
    assert html.count('<img class="zoom"') == 4
    assert 'id="lightbox" hidden' in html and 'addEventListener("keydown"' in html
    assert "Atlas boundaries are drawn at depth 5 of the region hierarchy" in html
    links = [r for r in checker.refs if not r.startswith(("data:", "#"))]
    assert sorted(links) == sorted(f"report/figures/{name}.{fmt}"
                                   for name in ("volcano", "dots_top_hits")
                                   for fmt in ("png", "svg"))  # fmt: skip
    assert "http://" not in html and "https://" not in html
    plain = render_report(study=study, subjects=subjects, qc=qc, regions=regions, counts=counts,
                          images=images)  # fmt: skip
    assert all(r.startswith(("data:", "#")) for r in parse(plain).refs)
    assert "Atlas boundaries are drawn" not in plain and "Click an image" in plain
