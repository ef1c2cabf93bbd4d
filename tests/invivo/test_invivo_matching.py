import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError
from ketamap.invivo.ensembles.matching import match_cells, track_cells
from ketamap.pipelines import run_ensembles
from ketamap.simulate.calcium import simulate_calcium_study

LABELS = ["baseline", "stress", "ketamine-3h", "ketamine-24h"]


@pytest.fixture(scope="module")
def dense_study(tmp_path_factory):
    """400 cells (ROIs 13 px apart), 4 drifting sessions; short traces, matching only."""
    root = tmp_path_factory.mktemp("match")
    simulate_calcium_study(root, seed=3, n_cells=400, duration_s=20.0)
    sessions = {}
    for label in LABELS:
        plane = root / label / "suite2p" / "plane0"
        ops = np.load(plane / "ops.npy", allow_pickle=True).item()
        stat = list(np.load(plane / "stat.npy", allow_pickle=True))
        sessions[label] = (ops["meanImg"], stat)
    truth = pd.read_csv(root / "ground_truth" / "cell_map.csv")
    drift = pd.read_csv(root / "ground_truth" / "drift.csv").set_index("session")
    return sessions, truth, drift


def _true_pairs(truth, a, b):
    ta = truth[truth.session == a].set_index("global_cell")["cell"]
    tb = truth[truth.session == b].set_index("global_cell")["cell"]
    common = ta.index.intersection(tb.index)
    return set(zip(ta[common], tb[common], strict=True))


def _score(pred: set, true: set) -> tuple[float, float]:
    hit = len(pred & true)
    return hit / len(true), hit / max(len(pred), 1)


@pytest.mark.parametrize("use_mean_image", [True, False])
def test_match_cells_recovers_identity_under_drift(dense_study, use_mean_image):
    sessions, truth, drift = dense_study
    mean_a, stat_a = sessions["baseline"]
    for label in LABELS[1:]:
        mean_b, stat_b = sessions[label]
        pairs, fit = match_cells(
            mean_a if use_mean_image else None, stat_a, mean_b if use_mean_image else None, stat_b
        )
        true = _true_pairs(truth, "baseline", label)
        recall, precision = _score(set(zip(pairs.cell_a, pairs.cell_b, strict=True)), true)
        assert recall >= 0.95 and precision >= 0.95, (label, recall, precision)
        # the fit undoes the planted drift: p_a = R^T (p_b - c - t) + c, so the
        # rotation is minus the planted one and the centre moves by -R^T t (up to
        # the planted 1.5 px non-rigid warp, whose local slope is up to ~2°)
        theta = drift.loc[label, "rotation_deg"]
        assert abs(fit.rotation_deg + theta) <= 1.0
        t = np.deg2rad(theta)
        R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        planted = -R.T @ drift.loc[label, ["shift_y_px", "shift_x_px"]].to_numpy(float)
        assert np.abs(np.asarray(fit.shift_px) - planted).max() <= 2.0, (fit.shift_px, planted)
        assert pairs.overlap.min() >= 0.2


def test_track_cells_gives_consistent_global_ids(dense_study):
    sessions, truth, _ = dense_study
    ids, registration = track_cells(
        [sessions[s][0] for s in LABELS], [sessions[s][1] for s in LABELS]
    )
    assert len(registration) == 4 and (registration.n_matched > 0.8 * registration.n_rois).all()
    for i, a in enumerate(LABELS):
        for j in range(i + 1, len(LABELS)):
            b = LABELS[j]
            pos = {g: r for r, g in enumerate(ids[i])}
            pred = {(pos[g], r) for r, g in enumerate(ids[j]) if g in pos}
            recall, precision = _score(pred, _true_pairs(truth, a, b))
            assert recall >= 0.95 and precision >= 0.95, (a, b, recall, precision)


def test_same_roi_set_matches_itself_and_lost_cells_stay_unmatched():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:80]
    stat = []
    for cy, cx in rng.uniform(6, 74, (30, 2)):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < 9
        stat.append({"ypix": yy[m], "xpix": xx[m], "lam": np.exp(-((yy[m] - cy) ** 2) / 8)})
    pairs, _ = match_cells(None, stat, None, stat, max_rotation_deg=0)
    assert len(pairs) == 30 and (pairs.cell_a == pairs.cell_b).all()
    assert (pairs.overlap > 0.99).all()
    # drop 5 ROIs of session b: they must not be matched to anything else
    pairs, _ = match_cells(None, stat, None, stat[5:])
    assert set(pairs.cell_a) <= set(range(5, 30)) and (pairs.cell_a == pairs.cell_b + 5).all()


def test_run_ensembles_matches_cells_and_keeps_input_indices(tmp_path):
    toml = simulate_calcium_study(tmp_path / "sim", seed=5, n_cells=100, duration_s=60.0)
    out = run_ensembles(toml, tmp_path / "out")
    assert out["cell_matching"] == "footprints"
    truth = pd.read_csv(tmp_path / "sim" / "ground_truth" / "cell_map.csv")
    found = pd.read_csv(tmp_path / "out" / "cell_map.csv")
    # every ROI of every session is listed once, by its input index
    assert len(found) == len(truth)
    merged = found.merge(truth, on=["session", "cell"], suffixes=("", "_true"))
    assert len(merged) == len(truth)
    # global ids are a relabelling of the true identities
    per_true = merged.groupby("global_cell_true")["global_cell"].nunique()
    per_found = merged.groupby("global_cell")["global_cell_true"].nunique()
    assert (per_true == 1).mean() >= 0.95 and (per_found == 1).mean() >= 0.95
    s = pd.read_csv(tmp_path / "out" / "sessions.csv")
    assert (s.n_matched_first[1:] >= 0.85 * s.n_cells[1:]).all()
    assert {"shift_y_px", "rotation_deg", "registration_correlation"} <= set(s.columns)


def test_given_cell_map_is_used(tmp_path):
    sim = tmp_path / "sim"
    toml = simulate_calcium_study(sim, scenario="null", seed=6, n_cells=40, duration_s=30.0)
    text = toml.read_text().replace(
        "[field_of_view]\n", '[field_of_view]\ncell_map = "ground_truth/cell_map.csv"\n'
    )
    toml.write_text(text)
    out = run_ensembles(toml, tmp_path / "out")
    assert out["cell_matching"] == "cell_map"
    found = pd.read_csv(tmp_path / "out" / "cell_map.csv")
    truth = pd.read_csv(sim / "ground_truth" / "cell_map.csv")
    pd.testing.assert_frame_equal(
        found.sort_values(["session", "cell"]).reset_index(drop=True),
        truth.sort_values(["session", "cell"]).reset_index(drop=True),
    )
    cells = pd.read_csv(tmp_path / "out" / "cells.csv")
    assert set(cells.global_cell) == set(truth.global_cell)


@pytest.mark.parametrize(
    "csv, words",
    [
        ("session,cell\nbaseline,0\n", "lacks the column"),
        ("session,cell,global_cell\nbaseline,0,x\n", "integers only"),
        ("session,cell,global_cell\nbasline,0,1\n", "not in the sessions file"),
        ("session,cell,global_cell\nbaseline,0,1\nbaseline,0,2\n", "cell 0 twice"),
    ],
)
def test_bad_cell_map_is_one_sentence(tmp_path, csv, words):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(100, 1, (3, 300)).astype(np.float32))
    (tmp_path / "map.csv").write_text(csv)
    (tmp_path / "s.toml").write_text(
        '[field_of_view]\nframe_rate_hz = 10.0\ncell_map = "map.csv"\n'
        '[[sessions]]\nlabel = "baseline"\ntime_h = 0\ndata = "a.npy"\n'
    )
    with pytest.raises(InputError, match=words) as e:
        run_ensembles(tmp_path / "s.toml", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_footprint_matching_needs_footprints(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(100, 1, (3, 300)))
    (tmp_path / "s.toml").write_text(
        '[field_of_view]\nframe_rate_hz = 10.0\n[params]\ncell_matching = "footprints"\n'
        '[[sessions]]\nlabel = "a"\ntime_h = 0\ndata = "a.npy"\n'
    )
    with pytest.raises(InputError, match='no ROI footprints.*cell_matching = "index"'):
        run_ensembles(tmp_path / "s.toml", tmp_path / "out")
