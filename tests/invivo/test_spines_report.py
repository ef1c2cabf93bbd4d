"""The spines report's example dendrite images: spines coloured by fate across sessions."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from ketamap.invivo.spines import presence_matrix
from ketamap.invivo.spines.report import dendrite_crop, dendrite_figure, example_dendrites
from ketamap.pipelines import run_spines
from ketamap.simulate.spines import simulate_spine_study

LABELS = ["base", "stress", "ket"]


def _spines():
    """Spine 1 in every session, 2 lost after the first, 3 gained in the second, 4 gained
    in the last (reference-frame pixels, at an offset crop origin)."""
    rows = [(k, 1, 20.0, 30.0) for k in LABELS]
    rows += [("base", 2, 20.0, 60.0)]
    rows += [("stress", 3, 28.0, 90.0), ("ket", 3, 28.4, 90.2)]
    rows += [("ket", 4, 12.0, 110.0)]
    return pd.DataFrame(rows, columns=["session", "spine_id", "ref_y_px", "ref_x_px"])


def _offsets(ax):
    """Marker positions of the panel's stable, gained and lost collections."""
    return [c.get_offsets() for c in ax.collections]


def test_spines_are_marked_by_fate_in_every_session():
    crops = {k: np.random.default_rng(0).random((40, 140)).astype(np.float32) for k in LABELS}
    fig = dendrite_figure(crops, _spines(), origin=(5, 10), pixel_size_um=0.1,
                          times_h={"base": 0, "stress": 24, "ket": 48}, title="d1")  # fmt: skip
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 3
    counts = [[len(o) for o in _offsets(ax)] for ax in axes]
    # stable, gained, lost per session
    assert counts == [[2, 0, 0], [1, 1, 1], [2, 1, 0]]
    stress_stable, stress_gained, stress_lost = _offsets(axes[1])
    np.testing.assert_allclose(stress_stable, [[30 - 10, 20 - 5]])  # (x, y) in the crop
    np.testing.assert_allclose(stress_gained, [[90 - 10, 28 - 5]])
    np.testing.assert_allclose(stress_lost, [[60 - 10, 20 - 5]])  # where spine 2 was
    assert axes[1].get_title().startswith("stress (24 h)\n1 stable, 1 gained, 1 lost")
    colours = [tuple(np.round(c.get_edgecolor()[0][:3], 2)) if len(c.get_offsets()) else None
               for c in axes[2].collections]  # fmt: skip
    assert colours[0] != colours[1]  # stable and gained differ
    assert any(t.get_text() == "5 µm" for t in axes[0].texts)  # 50 px at 0.1 µm


def test_dendrite_figure_rejects_bad_input_in_one_sentence():
    crops = {"a": np.zeros((20, 30)), "b": np.zeros((20, 31))}
    with pytest.raises(ValueError, match=r"one shape, got \[\(20, 30\), \(20, 31\)\]\.$"):
        dendrite_figure(crops, _spines(), pixel_size_um=0.1)
    with pytest.raises(ValueError, match=r"at least one session image\.$"):
        dendrite_figure({}, _spines(), pixel_size_um=0.1)
    with pytest.raises(ValueError, match=r"lacks column\(s\) ref_x_px\.$"):
        dendrite_figure({"a": np.zeros((20, 30))}, _spines().drop(columns="ref_x_px"),
                        pixel_size_um=0.1)  # fmt: skip


def test_crop_keeps_the_dendrite_and_its_margin():
    planes = {k: np.arange(100 * 200, dtype=np.float32).reshape(100, 200) for k in LABELS}
    line = np.array([[50.0, 40.0], [52.0, 120.0]])
    crops, origin = dendrite_crop(planes, line, pixel_size_um=0.5, margin_um=5.0)
    assert origin == (40, 30)  # 10 px margin
    assert crops["base"].shape == (52 + 10 + 1 - 40, 120 + 10 + 1 - 30)
    assert crops["ket"][0, 0] == planes["ket"][40, 30]


def test_examples_are_the_dendrites_with_most_turnover():
    spines = pd.DataFrame(
        [("quiet", "base", 1), ("quiet", "stress", 1), ("quiet", "ket", 1),
         ("busy", "base", 1), ("busy", "ket", 2), ("busy", "stress", 3),
         ("some", "base", 1)],
        columns=["dendrite", "session", "spine_id"],
    )  # fmt: skip
    presence = presence_matrix(spines, LABELS)
    assert example_dendrites(presence, LABELS, n=2) == ["busy", "some"]
    assert example_dendrites(presence.iloc[:0], LABELS) == []


def test_report_shows_example_dendrites_matching_the_presence_table(tmp_path):
    """On a simulated study: up to three example images, written as figures and shown in
    the report; each panel's counts agree with the presence table of that dendrite."""
    toml = simulate_spine_study(tmp_path / "study", seed=2, n_mice=2, dendrites_per_mouse=2)
    out = tmp_path / "out"
    run_spines(toml, out)
    page = (out / "report.html").read_text()
    assert "id='example-dendrites'" in page
    section = page[page.index("id='example-dendrites'") :]
    shown = re.findall(r'alt="dendrite_([^"]+)"', section)
    assert 1 <= len(shown) <= 3
    presence = pd.read_csv(out / "spines.csv")
    labels = [c for c in presence.columns if c not in ("dendrite", "spine_id", "s_um", "side")]
    assert shown == example_dendrites(presence, labels, n=3)
    for name in shown:
        assert (out / "figures" / f"dendrite_{name}.png").stat().st_size > 5_000
        assert (out / "figures" / f"dendrite_{name}.svg").exists()
    # counts per session from the presence table, as the figure titles give them
    g = presence[presence.dendrite == shown[0]]
    p = g[labels].to_numpy(bool)
    expect = []
    for j in range(len(labels)):
        prev = p[:, j - 1] if j else p[:, j]
        expect.append((int((p[:, j] & prev).sum()), int((p[:, j] & ~prev).sum()),
                       int((~p[:, j] & prev).sum())))  # fmt: skip
    assert sum(e[1] + e[2] for e in expect) > 0  # the example shows turnover
    from ketamap.invivo.spines.report import _fates

    det = pd.read_csv(out / "detections.csv")
    fates = _fates(det[det.dendrite == shown[0]], labels)
    got = [(len(f["stable"]), len(f["gained"]), len(f["lost"])) for f in fates]
    assert got == expect
