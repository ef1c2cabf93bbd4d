"""Sessions compared across mice: the mixed model, its fallback, its null calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import InputError, ParameterError
from ketamap.invivo.ensembles.mice import compare_mice
from ketamap.invivo.ensembles.session import analyse_session
from ketamap.simulate.calcium import simulate_calcium_cohort, simulate_calcium_study


def _cells(n_mice, seed, effect=0.0, **kw):
    """Per-cell measures of one simulated study, every session analysed from its traces."""
    frames = []
    sim = {"n_cells": 40, "duration_s": 120.0} | kw
    eff = {"later": effect} if effect else None
    for r in simulate_calcium_cohort(n_mice, seed=seed, effect=eff, **sim):
        res = analyse_session(r["traces"].F, r["traces"].Fneu, frame_rate_hz=15.0)
        frames.append(res.per_cell.assign(mouse=r["mouse"], session=r["session"]))
    return pd.concat(frames, ignore_index=True)


def _naive_p(cells):
    """What a per-cell model with a mouse intercept only gives: statsmodels' normal p."""
    import warnings

    import statsmodels.formula.api as smf

    d = cells.assign(y=cells["mean_coactivity"] / cells["mean_coactivity"].std())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("y ~ C(session)", d, groups="mouse").fit(reml=True)
    return float(fit.pvalues["C(session)[T.later]"])


@pytest.mark.slow  # 300 null studies: about 4 minutes on 2 cores
def test_null_calibration_across_mice():
    """Null studies of 6 mice (mice differ, and each mouse moves from day to day, as in
    docs/ensembles.md): the per-field model keeps its false-positive rate in 0.03-0.07 at
    alpha 0.05, the per-cell model with session within mouse stays at or below it; the
    pseudo-replicated per-cell model (mouse intercept only) does not."""
    p = {"field": [], "cell": [], "naive": []}
    fallback = 0
    for i in range(300):
        cells = _cells(6, 500 + i)
        for unit in ("field", "cell"):
            row = compare_mice(cells, unit=unit).iloc[0]
            p[unit].append(row["p_value"])
            fallback += unit == "field" and not row["converged"]
        p["naive"].append(_naive_p(cells))
    fpr = {k: float(np.mean(np.asarray(v) < 0.05)) for k, v in p.items()}
    assert 0.03 <= fpr["field"] <= 0.07, fpr
    assert fpr["cell"] <= 0.07, fpr
    assert fpr["naive"] > 0.2, fpr
    assert fallback < 30  # the model converges on most null studies


def test_planted_change_is_found_with_its_interval():
    """Coordination falls by 0.4 in every mouse of 8: the coactivity drop is called, the
    CI excludes 0 and holds the estimate, and the event rate (unchanged by design) is
    not."""
    cells = _cells(8, 7, effect=-0.4, n_cells=60, duration_s=180.0)
    for unit in ("field", "cell"):
        row = compare_mice(cells, unit=unit).iloc[0]
        assert row["converged"] and row["method"].startswith("MixedLM"), row["method"]
        assert row["estimate"] < 0 and row["ci_high"] < 0 < row["p_value"] < 0.05, row
        assert row["ci_low"] < row["estimate"] < row["ci_high"]
        assert row["df"] == 7.0 and row["n_mice"] == 8
    rate = compare_mice(cells, measure="event_rate_hz").iloc[0]
    assert rate["p_value"] > 0.05


def test_no_p_value_from_a_fit_that_did_not_converge(monkeypatch):
    """A fit that does not converge gives no p: the exact sign-flip test of the mouse
    means does, and says so."""
    from statsmodels.regression.mixed_linear_model import MixedLM

    cells = _cells(5, 3)
    fit = MixedLM.fit

    def failing(self, *a, **k):
        res = fit(self, *a, **k)
        res.converged = False
        return res

    monkeypatch.setattr(MixedLM, "fit", failing)
    row = compare_mice(cells).iloc[0]
    assert not row["converged"]
    assert row["method"].startswith("MixedLM did not converge: exact sign-flip test over 5 mice")
    means = cells.groupby(["mouse", "session"])["mean_coactivity"].mean().unstack()
    d = (means["later"] - means["baseline"]).to_numpy()
    signs = 1 - 2 * ((np.arange(32)[:, None] >> np.arange(5)) & 1)
    expected = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    assert np.isclose(row["estimate"], d.mean()) and np.isclose(row["p_value"], expected)
    assert row["ci_low"] < row["estimate"] < row["ci_high"]


def test_several_fields_of_one_mouse_are_not_independent_mice():
    """Two fields per mouse: still 4 mice, and the t reference has the mice's df."""
    a, b = _cells(4, 11), _cells(4, 12)
    two = pd.concat([a.assign(field_of_view="a"), b.assign(field_of_view="b")])
    row = compare_mice(two).iloc[0]
    assert row["n_mice"] == 4 and row["n_obs"] == 16
    if row["converged"]:
        assert "session within mouse + field within mouse" in row["method"]
        assert row["df"] == 3.0
    else:
        assert "sign-flip test over 4 mice" in row["method"]


def test_bad_input_is_one_sentence():
    cells = pd.DataFrame({"mouse": ["a", "b"], "session": ["x", "y"], "v": [1.0, 2.0]})
    with pytest.raises(InputError, match=r"lacks column\(s\) mean_coactivity \(it has mouse, "):
        compare_mice(cells)
    with pytest.raises(InputError, match=r"session\(s\) z not in the cells table"):
        compare_mice(cells, measure="v", sessions=["x", "z"])
    with pytest.raises(ParameterError, match='unit must be one of field, cell, got "mice"'):
        compare_mice(cells, measure="v", unit="mice")
    with pytest.raises(InputError, match='column "mouse" must be numeric'):
        compare_mice(cells, measure="mouse")
    assert compare_mice(cells[cells.mouse == "a"], measure="v").empty  # one mouse


@pytest.fixture(scope="module")
def three_mice(tmp_path_factory):
    root = tmp_path_factory.mktemp("mice")
    files = []
    for i in range(3):
        toml = simulate_calcium_study(root / f"m{i}", seed=i, n_cells=60, n_ensembles=2,
                                      ensemble_size=10, duration_s=180.0, drift=False)  # fmt: skip
        text = toml.read_text().replace(
            'name = "simulated-stress-ketamine"', f'name = "m{i}-fov1"\nmouse = "m{i}"'
        )
        toml.write_text(text)
        files.append(toml)
    return root, files


def test_stage_over_three_mice(three_mice, run_cli, capsys):
    from ketamap.pipelines.ensembles import run_ensembles_mice

    root, files = three_mice
    out = root / "out"
    res = run_ensembles_mice(files, out)
    assert res["n_mice"] == 3
    assert res["sessions"] == ["baseline", "stress", "ketamine-3h", "ketamine-24h"]  # by time
    stats = pd.read_csv(out / "statistics.csv")
    assert len(stats) == 2 * 3 and set(stats["reference"]) == {"baseline"}
    stress = stats[(stats.measure == "mean_coactivity") & (stats.session == "stress")].iloc[0]
    assert stress["estimate"] < 0 and stress["n_mice"] == 3
    assert (stats["converged"] | stats["method"].str.contains("sign-flip")).all()
    for i in range(3):
        assert (out / "fields" / f"m{i}-fov1" / "report.html").is_file()
    page = (out / "report.html").read_text()
    assert "id='key-results'" in page and "href='fields/m0-fov1/report.html'" in page
    assert set(pd.read_csv(out / "mice.csv")["mouse"]) == {"m0", "m1", "m2"}
    assert run_cli("ensembles", *files, "--out", root / "cli", "--unit", "cell") == 0
    printed = capsys.readouterr().out
    assert "mean_coactivity, stress vs baseline" in printed and "(3 mice)" in printed


def test_stage_refuses_one_file_and_twin_names(three_mice, tmp_path):
    from ketamap.pipelines.ensembles import run_ensembles_mice

    _, files = three_mice
    with pytest.raises(InputError, match="a sessions file per field of view, got 1"):
        run_ensembles_mice(files[:1], tmp_path / "o")
    with pytest.raises(InputError, match="m0-fov1 is used twice"):
        run_ensembles_mice([files[0], files[0]], tmp_path / "o")
    assert not (tmp_path / "o").exists()
