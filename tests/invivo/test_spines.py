"""Spine turnover: units on hand-made tables, and accuracy on a simulated study."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from ketamap.errors import InputError, InputNotFoundError, ManifestError, ParameterError
from ketamap.invivo.spines import (
    SpineParams,
    export_annotations,
    export_napari,
    import_annotations,
    interval_rates,
    pooled_rates,
    presence_matrix,
    return_to_lost_sites,
    score_spines,
    track_spines,
)
from ketamap.invivo.spines.image import Centreline, detect_spines, register_rigid
from ketamap.invivo.spines.track import confirm_faint
from ketamap.manifest import load_spine_sessions
from ketamap.pipelines import run_spines
from ketamap.simulate.spines import SpineSimParams, simulate_dendrite, simulate_spine_study

LABELS = ["a", "b", "c"]


# --------------------------------------------------------------------------- units


def test_presence_and_rates_follow_the_written_definitions():
    rows = [
        ("d1", s, i)
        for s, ids in (("a", [0, 1, 2, 3]), ("b", [0, 1, 4]), ("c", [0, 4, 5, 6]))
        for i in ids
    ]
    spines = pd.DataFrame(rows, columns=["dendrite", "session", "spine_id"])
    pres = presence_matrix(spines, LABELS)
    assert pres[LABELS].sum().tolist() == [4, 3, 4]
    rates = interval_rates(pres, LABELS, lengths_um={"d1": 20.0}).set_index("interval")
    ab, bc = rates.loc["a->b"], rates.loc["b->c"]
    assert (ab.formed, ab.eliminated, ab.n_a) == (1, 2, 4)
    assert ab.formation_rate == pytest.approx(1 / 4)
    assert ab.elimination_rate == pytest.approx(2 / 4)
    assert ab.turnover_ratio == pytest.approx(3 / 7)
    assert bc.formation_rate == pytest.approx(2 / 3) and bc.elimination_rate == pytest.approx(1 / 3)
    assert bc.survival_fraction == pytest.approx(1 / 4)  # only spine 0 of session a is left
    assert ab.density_a_per_10um == pytest.approx(2.0)
    two = pd.concat(
        [rates.reset_index(), rates.reset_index().assign(dendrite="d2", formed=0, n_a=6)]
    )
    pooled = pooled_rates(two).set_index("interval")
    assert pooled.loc["a->b", "formation_rate"] == pytest.approx(1 / 10)


def test_tracking_links_by_arc_length_and_side_and_a_return_is_a_new_spine():
    det = pd.DataFrame(
        {
            "dendrite": "d",
            "session": ["a", "a", "a", "b", "b", "c", "c", "c"],
            "s_um": [5.0, 10.0, 10.2, 5.3, 10.1, 5.2, 10.0, 10.1],
            "side": [1, 1, -1, 1, -1, 1, 1, -1],
        }
    )
    out = track_spines(det, LABELS, tolerance_um=1.0)
    ids = out["spine_id"].tolist()
    assert ids[3] == ids[0] and ids[5] == ids[0]  # the spine at 5 µm persists
    assert ids[4] == ids[2] and ids[7] == ids[2]  # side -1 at 10 µm persists
    assert ids[6] not in ids[:6]  # side +1 at 10 µm was gone in b: back in c, it is new


def test_return_to_lost_sites_finds_planted_returns_and_not_random_ones():
    rng = np.random.default_rng(1)
    rows = []
    for d in range(6):
        lost = rng.choice(np.arange(3, 57, 4.0), 6, replace=False)
        keep = [x for x in np.arange(3, 57, 4.0) if x not in lost]
        for s_um in keep:
            rows += [
                (f"d{d}", "a", f"k{s_um}", s_um, 1),
                (f"d{d}", "b", f"k{s_um}", s_um, 1),
                (f"d{d}", "c", f"k{s_um}", s_um, 1),
            ]
        for s_um in lost:
            rows.append((f"d{d}", "a", f"l{s_um}", s_um, 1))
        for j, s_um in enumerate(lost[:4] + rng.uniform(-0.3, 0.3, 4)):
            rows.append((f"d{d}", "c", f"n{j}", s_um, -1))
    t = pd.DataFrame(rows, columns=["dendrite", "session", "spine_id", "s_um", "side"])
    pres = presence_matrix(t, LABELS)
    lengths = {f"d{d}": (0.0, 60.0) for d in range(6)}
    planted = return_to_lost_sites(pres, LABELS, new_session="c", stretch_um=lengths, seed=0)
    assert planted.iloc[-1]["share_near"] == 1.0 and planted.iloc[-1]["p_value"] < 0.001
    # the same new spines moved to uniform random places: no enrichment
    new = t["spine_id"].str.startswith("n")
    t.loc[new, "s_um"] = rng.uniform(0, 60, new.sum())
    null = return_to_lost_sites(
        presence_matrix(t, LABELS), LABELS, new_session="c", stretch_um=lengths, seed=0
    )
    assert null.iloc[-1]["p_value"] > 0.05


def _crowded_dendrite(seed=0):
    """A straight shaft with a faint head 1.4 µm beside a bright one and a long-necked spine."""
    px = 0.15
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:120, :400].astype(float)

    def blob(y, x, amp, sigma_um=0.3):
        return amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (sigma_um / px) ** 2))

    img = 10 + 40 * np.exp(-((yy - 60) ** 2) / (2 * (0.4 / px) ** 2))
    img += blob(60 - 2.0 / px, 150, 30) + blob(60 - 2.0 / px, 150 + 1.4 / px, 10)
    # head 2.5 µm out on the other side, a thin neck, wider where it leaves the shaft
    img += blob(60 + 2.5 / px, 280, 30) + blob(60 + 0.95 / px, 280 + 0.2 / px, 8, 0.25)
    for t in np.linspace(0.5 / px, 2.5 / px, 60):
        img += blob(60 + t, 280, 1.0, 0.18)
    img += rng.normal(0, 1.0, img.shape)
    line = Centreline(np.column_stack([np.full(1521, 60.0), 10 + 0.25 * np.arange(1521)]), px)
    return img.astype(np.float32), line


def test_detection_separates_a_faint_head_beside_a_bright_one_but_not_a_neck():
    img, line = _crowded_dendrite()
    found = detect_spines(img, line)
    assert len(found) == 3
    heads = np.array([[47, 150], [47, 150 + 1.4 / 0.15], [60 + 2.5 / 0.15, 280]])
    d = np.hypot(*(found[["y_px", "x_px"]].to_numpy()[:, None] - heads[None]).transpose(2, 0, 1))
    assert (d.min(axis=0) <= 2).all()  # every head found within 0.3 µm
    # a wide suppression footprint loses the faint head; without the neck rule the neck counts
    apart = SpineParams(min_separation_um=0.7, merge_um=1.2)
    assert len(detect_spines(img, line, params=apart)) == 2
    assert len(detect_spines(img, line, params=SpineParams(neck_saddle_ratio=1.0))) == 4


def test_a_faint_detection_needs_the_same_place_in_an_adjacent_session():
    det = pd.DataFrame(
        {
            "session": ["a", "b", "b", "c"],
            "s_um": [10.2, 10.0, 20.0, 20.3],
            "side": [1, 1, 1, 1],
            "distance_um": [1.6, 1.5, 1.5, 3.2],
            "snr": [20.0, 4.0, 20.0, 4.0],
        }
    )
    kept = confirm_faint(det, LABELS, threshold_sd=6.0, confirm_threshold_sd=3.5, tolerance_um=1.0)
    # the faint spine in b is where a's spine is; the faint blob in c is 1.7 µm farther out
    assert kept.index.tolist() == [0, 1, 2]


def test_rigid_registration_recovers_rotation_and_shift():
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter((rng.random((160, 240)) > 0.995).astype(np.float32) * 50, 2.0)
    theta = np.deg2rad(3.0)
    m = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    c = (np.array(img.shape) - 1) / 2
    off = c - m @ c + np.array([4.0, -7.0])
    moving = ndi.affine_transform(img, np.linalg.inv(m), offset=-np.linalg.inv(m) @ off, order=1)
    tf = register_rigid(img, moving, pixel_size_um=0.15)
    assert abs(tf.rotation_deg - 3.0) <= 0.3
    pts = np.array([[40.0, 60.0], [120.0, 200.0]])
    np.testing.assert_allclose(tf.to_moving(pts), pts @ m.T + off, atol=1.0)
    np.testing.assert_allclose(tf.to_reference(tf.to_moving(pts)), pts, atol=1e-9)


def test_simulated_dendrite_has_consistent_truth():
    sim = simulate_dendrite(scenario="stress-ketamine", seed=3)
    assert len(sim.images) == 4 and sim.images[0].dtype == np.uint16
    t = sim.spines
    assert set(t["session"]) == {"baseline-1", "baseline-2", "stress", "ketamine-24h"}
    assert not t.duplicated(["session", "spine_id"]).any()
    assert t.loc[t["returned"], "born"].eq("ketamine-24h").all()
    h, w = sim.images[0].shape
    assert t["head_y_px"].between(0, h).all() and t["head_x_px"].between(0, w).all()
    stack = simulate_dendrite(params=SpineSimParams(n_z=5, image_shape_px=(120, 400)), seed=1)
    assert stack.images[0].shape == (5, 120, 400)
    with pytest.raises(ParameterError, match="no-return"):
        simulate_dendrite(scenario="no-retrun")


def test_parameters_are_checked():
    with pytest.raises(ParameterError, match="max_distance_um"):
        SpineParams(min_distance_um=2.0, max_distance_um=1.0)
    with pytest.raises(ParameterError, match="threshold_sd"):
        SpineParams(threshold_sd=-1.0)


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """One mouse, one dendrite: fast enough for file and CLI tests."""
    root = tmp_path_factory.mktemp("small")
    toml = simulate_spine_study(root / "study", seed=5, n_mice=1, dendrites_per_mouse=1)
    return toml


def test_sessions_file_errors_are_one_sentence(small_study, tmp_path):
    sf = load_spine_sessions(small_study)
    assert sf.labels[0] == "baseline-1" and sf.dendrites[0].pixel_size_um == 0.15
    text = small_study.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("pixel_size_um", "pixel_size"))
    with pytest.raises(ManifestError, match="pixel_size_um"):
        load_spine_sessions(bad)
    bad.write_text(text.replace("images/", str(tmp_path / "nowhere") + "/"))
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_spine_sessions(bad)
    bad.write_text(text.replace("images/", "../images/"))
    with pytest.raises(ManifestError, match="points outside"):
        load_spine_sessions(bad)
    bad.write_text(text.replace("time_h = 72.0", "time_h = 1000.0"))
    with pytest.raises(ManifestError, match="time order"):
        load_spine_sessions(bad)


def test_annotations_round_trip(tmp_path):
    det = pd.DataFrame(
        {
            "dendrite": ["d1", "d1", "d2"],
            "session": ["a", "b", "a"],
            "spine_id": [0, 0, 3],
            "y_px": [10.5, 11.0, 30.25],
            "x_px": [20.0, 21.5, 40.0],
            "s_um": [1.0, 1.1, 2.0],
        }
    )
    back = import_annotations(export_annotations(det, tmp_path / "ann.csv"))
    pd.testing.assert_frame_equal(back[["y_px", "x_px"]], det[["y_px", "x_px"]])
    assert back["spine_id"].tolist() == [0, 0, 3]
    export_napari(det, tmp_path / "napari")
    napari = pd.read_csv(tmp_path / "napari" / "d1__a.csv")
    assert list(napari.columns) == ["index", "axis-0", "axis-1"]
    back = import_annotations(tmp_path / "napari")
    assert len(back) == 3 and back["spine_id"].isna().all()
    (tmp_path / "broken.csv").write_text("dendrite,session\nd1,a\n")
    with pytest.raises(InputError, match="y_px"):
        import_annotations(tmp_path / "broken.csv")


def test_cli_runs_and_reruns_from_corrected_annotations(small_study, tmp_path, run_cli):
    out = tmp_path / "out"
    assert run_cli("spines", small_study, "--out", out) == 0
    rates = pd.read_csv(out / "rates.csv")
    assert {"dendrite", "interval", "formation_rate", "elimination_rate"} <= set(rates.columns)
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 3
    start = page.index("id='key-results'")
    key = page[start : page.index("</div>", start)]
    assert "formation" in key and "elimination" in key and "ketamine-24h" in key, key
    assert "<h2>Methods</h2>" in page and "version of statsmodels" in page
    assert (out / "figures" / "turnover.svg").exists()
    # the user deletes one spine of the last session that was present before
    ann = pd.read_csv(out / "annotations.csv")
    last = ann[ann.session == "ketamine-24h"]
    before = set(ann.loc[ann.session == "stress", "spine_id"])
    drop = last[last.spine_id.isin(before)].index[0]
    ann.drop(index=drop).to_csv(tmp_path / "fixed.csv", index=False)
    out2 = tmp_path / "out2"
    assert (
        run_cli("spines", small_study, "--out", out2, "--annotations", tmp_path / "fixed.csv") == 0
    )
    r1 = rates.set_index("interval").loc["stress->ketamine-24h"]
    r2 = pd.read_csv(out2 / "rates.csv").set_index("interval").loc["stress->ketamine-24h"]
    assert r2.eliminated == r1.eliminated + 1 and r2.n_b == r1.n_b - 1
    assert run_cli("spines", tmp_path / "missing.toml", "--out", tmp_path / "x") == 2


# --------------------------------------------------------------------------- accuracy


def _analyse(tmp_path_factory, scenario):
    root = tmp_path_factory.mktemp(scenario)
    toml = simulate_spine_study(root / "study", scenario=scenario, seed=0)
    run_spines(toml, root / "out")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return _analyse(tmp_path_factory, "stress-ketamine")


def test_detection_and_tracking_accuracy(planted):
    labels = load_spine_sessions(planted / "study" / "sessions.toml").labels
    truth = pd.read_parquet(planted / "study" / "ground_truth" / "spines.parquet")
    det = pd.read_parquet(planted / "out" / "detections.parquet")
    score = score_spines(truth, det, labels, pixel_size_um=0.15)
    assert score["f1"] >= 0.9
    assert score["tracking_accuracy"] >= 0.95 and score["n_links"] > 200


def test_rates_within_two_points_of_truth(planted):
    truth = pd.read_csv(planted / "study" / "ground_truth" / "rates_pooled.csv")
    got = pd.read_csv(planted / "out" / "rates_pooled.csv")
    assert got["interval"].tolist() == truth["interval"].tolist()
    for col in ("formation_rate", "elimination_rate"):
        assert np.abs(got[col] - truth[col]).max() <= 0.02, col
    per = pd.read_csv(planted / "out" / "rates.csv")
    assert len(per) == 6 * 3  # one row per dendrite and interval
    stats = pd.read_csv(planted / "out" / "statistics.csv")
    ket = stats[(stats.measure == "formation_rate") & stats.interval.str.startswith("stress->")]
    assert ket["estimate"].iloc[0] > 0.1  # ketamine raises formation over baseline


def test_planted_return_to_lost_sites_is_recovered(planted):
    rs = pd.read_csv(planted / "out" / "return_sites.csv").set_index("dendrite").loc["all"]
    assert rs["p_value"] < 0.01 and rs["enrichment"] > 1.5


def _rate_errors(root):
    truth = pd.read_csv(root / "study" / "ground_truth" / "rates_pooled.csv")
    got = pd.read_csv(root / "out" / "rates_pooled.csv")
    return [np.abs(got[c] - truth[c]).max() for c in ("formation_rate", "elimination_rate")]


@pytest.mark.slow
def test_no_return_control_shows_no_enrichment(tmp_path_factory):
    root = _analyse(tmp_path_factory, "no-return")
    rs = pd.read_csv(root / "out" / "return_sites.csv").set_index("dendrite").loc["all"]
    assert rs["p_value"] > 0.05
    assert max(_rate_errors(root)) <= 0.02


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rates_within_two_points_on_more_studies(tmp_path_factory, seed):
    root = tmp_path_factory.mktemp(f"seed{seed}")
    toml = simulate_spine_study(root / "study", scenario="stress-ketamine", seed=seed)
    run_spines(toml, root / "out")
    assert max(_rate_errors(root)) <= 0.02
    rs = pd.read_csv(root / "out" / "return_sites.csv").set_index("dendrite").loc["all"]
    assert rs["p_value"] < 0.01
