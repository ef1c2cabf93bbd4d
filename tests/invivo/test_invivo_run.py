import json

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import KetamapError, ParameterError
from ketamap.invivo.ensembles.assemblies import jaccard_matrix
from ketamap.pipelines import run_ensembles
from ketamap.simulate.calcium import simulate_calcium_study


@pytest.fixture(scope="module")
def stress_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("calcium")
    toml = simulate_calcium_study(
        root / "sim", seed=0, n_cells=120, n_ensembles=3, ensemble_size=10, duration_s=600.0
    )
    out = root / "out"
    result = run_ensembles(toml, out)
    return root / "sim", out, result


def test_simulator_layout(stress_study):
    sim, _, _ = stress_study
    assert (sim / "sessions.toml").is_file()
    truth = pd.read_csv(sim / "ground_truth" / "ensembles.csv")
    assert {"session", "ensemble", "cell"} <= set(truth.columns)
    plane = sim / "baseline" / "suite2p" / "plane0"
    for name in ("F.npy", "Fneu.npy", "iscell.npy", "stat.npy", "ops.npy"):
        assert (plane / name).is_file()
    ops = np.load(plane / "ops.npy", allow_pickle=True).item()
    assert ops["fs"] == 15.0
    n_rois = len(np.load(plane / "stat.npy", allow_pickle=True))
    assert np.load(plane / "F.npy").shape == (n_rois, 9000)
    assert 100 <= n_rois <= 120  # a few cells are missed or drift off the field


def test_outputs_written(stress_study):
    _, out, result = stress_study
    for name in ("ensembles", "sessions", "cells", "statistics"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file()
    assert (out / "figures" / "raster.png").stat().st_size > 1000
    assert (out / "figures" / "coordination.png").stat().st_size > 1000
    ens = pd.read_csv(out / "ensembles.csv")
    assert {"session", "ensemble", "cell"} <= set(ens.columns)
    sessions = pd.read_csv(out / "sessions.csv")
    assert sessions["session"].tolist() == ["baseline", "stress", "ketamine-3h", "ketamine-24h"]
    assert json.loads((out / "summary.json").read_text())["params"]["bin_s"] == 0.2
    assert result["n_ensembles"]["baseline"] == 3


def test_report_is_one_offline_page_with_every_section(stress_study):
    _, out, _ = stress_study
    page = (out / "report.html").read_text(encoding="utf-8")
    for words in (
        "Sessions",
        "Coordination over sessions",
        "Statistics",
        "Rasters sorted by ensemble",
        "Cells matched across sessions",
        "Ensemble stability",
        "ketamine-24h",
        "block permutation (",
        "Key results",
        "ketamine-24h vs baseline:",
    ):
        assert words in page, words
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    for name in ("raster", "coordination", "stability"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_planted_ensembles_recovered_in_every_coordinated_session(stress_study):
    sim, out, _ = stress_study
    truth = pd.read_csv(sim / "ground_truth" / "ensembles.csv")
    found = pd.read_csv(out / "ensembles.csv")
    for session in ("baseline", "ketamine-3h", "ketamine-24h"):
        t = [g.cell.to_numpy() for _, g in truth[truth.session == session].groupby("ensemble")]
        f = [g.cell.to_numpy() for _, g in found[found.session == session].groupby("ensemble")]
        assert jaccard_matrix(t, f).max(axis=1).min() >= 0.8, session


def test_coordination_falls_under_stress_and_recovers_with_ketamine(stress_study):
    _, out, _ = stress_study
    s = pd.read_csv(out / "sessions.csv").set_index("session")
    for col in ("fraction_coactive_bins", "mean_pairwise_correlation"):
        assert s.loc["stress", col] < 0.6 * s.loc["baseline", col]
        assert s.loc["ketamine-3h", col] > 1.5 * s.loc["stress", col]
        assert s.loc["ketamine-24h", col] > 1.5 * s.loc["stress", col]
    # event rates are matched, so the change is coordination, not firing
    rates = s["event_rate_hz"]
    assert rates.max() / rates.min() < 1.1
    stats = pd.read_csv(out / "statistics.csv")
    first = stats[(stats.comparison == "vs first") & (stats.session_b == "stress")]
    assert (first.p_holm < 0.01).all() and (first.difference < 0).all()
    rescue = stats[(stats.session_a == "stress") & (stats.session_b == "ketamine-3h")]
    assert (rescue.p_holm < 0.01).all() and (rescue.difference > 0).all()


def test_null_study_has_no_ensembles(tmp_path):
    toml = simulate_calcium_study(
        tmp_path / "sim", scenario="null", seed=1, n_cells=60, duration_s=200.0
    )
    assert pd.read_csv(tmp_path / "sim" / "ground_truth" / "ensembles.csv").empty
    result = run_ensembles(toml, tmp_path / "out")
    assert sum(result["n_ensembles"].values()) == 0
    ens = pd.read_csv(tmp_path / "out" / "ensembles.csv")
    assert ens.empty and {"session", "ensemble", "cell"} <= set(ens.columns)


def test_params_from_sessions_file_and_bad_key(tmp_path):
    toml = simulate_calcium_study(
        tmp_path / "sim", scenario="null", seed=2, n_cells=20, duration_s=60.0
    )
    toml.write_text(toml.read_text() + "\n[params]\nbin_sec = 0.5\n")
    with pytest.raises(ParameterError, match="bin_s"):
        run_ensembles(toml, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_scenario():
    with pytest.raises(ParameterError, match="null"):
        simulate_calcium_study("/nonexistent", scenario="nul")


def test_plain_array_sessions_one_cell_and_short(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(100, 1, (1, 400)).astype(np.float32))
    np.savetxt(tmp_path / "b.csv", rng.normal(100, 1, (1, 5)), delimiter=",")
    (tmp_path / "s.toml").write_text(
        "[field_of_view]\nframe_rate_hz = 10.0\n"
        '[[sessions]]\nlabel = "a"\ntime_h = 0\ndata = "a.npy"\n'
        '[[sessions]]\nlabel = "b"\ntime_h = 1\ndata = "b.csv"\n'
    )
    result = run_ensembles(tmp_path / "s.toml", tmp_path / "out")
    assert result["n_ensembles"] == {"a": 0, "b": 0}
    s = pd.read_csv(tmp_path / "out" / "sessions.csv")
    assert s["n_cells"].tolist() == [1, 1]
    stats = pd.read_csv(tmp_path / "out" / "statistics.csv")
    assert stats["p_value"].isna().all()  # too little data for a test, not a crash


def test_bad_array_in_session_is_one_sentence(tmp_path):
    np.save(tmp_path / "a.npy", np.array([[1.0, np.inf, 2.0]]))
    (tmp_path / "s.toml").write_text(
        '[[sessions]]\nlabel = "a"\ntime_h = 0\ndata = "a.npy"\nframe_rate_hz = 5.0\n'
    )
    with pytest.raises(KetamapError, match="NaN or infinite"):
        run_ensembles(tmp_path / "s.toml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_simulate_without_drift_then_ensembles(run_cli, capsys, tmp_path):
    sim = tmp_path / "sim"
    assert (
        run_cli(
            "simulate", "calcium", "--out", sim, "--n-cells", 40, "--no-drift", "--scenario", "null"
        )
        == 0
    )
    cell_map = pd.read_csv(sim / "ground_truth" / "cell_map.csv")
    assert (cell_map.cell == cell_map.global_cell).all() and len(cell_map) == 80
    assert run_cli("ensembles", sim / "sessions.toml", "--out", tmp_path / "out") == 0
    assert "matched across sessions by footprints" in capsys.readouterr().out
    found = pd.read_csv(tmp_path / "out" / "cell_map.csv")
    assert (found.cell == found.global_cell).all()  # same ROI set: identity
    assert run_cli("ensembles", tmp_path / "none.toml", "--out", tmp_path / "o2") == 2
