"""The spine simulator's true rates: counted from births and deaths, held against the analysis.

The truth (`truth_rates`) never calls the analysis' measures; the analysis
(`interval_rates` on the true presence table) must agree with it, so a wrong
count or denominator on either side fails here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ketamap.errors import ParameterError
from ketamap.invivo.spines import interval_rates, pooled_rates, presence_matrix
from ketamap.simulate.spines import (
    SPINE_SCENARIOS,
    simulate_dendrite,
    simulate_spine_study,
    truth_pooled_rates,
    truth_rates,
)

LABELS = ["a", "b", "c"]


def test_truth_of_a_hand_built_example():
    # d1: s0 lives throughout, s1 is there in a only, s2 appears in b and is gone in c;
    # d2: one spine that appears in b (no spine in the first session)
    lives = pd.DataFrame(
        {
            "dendrite": ["d1", "d1", "d1", "d2"],
            "spine_id": [0, 1, 2, 0],
            "born": ["a", "a", "b", "b"],
            "died": [None, "b", "c", None],
        }
    )
    rates = truth_rates(lives, LABELS, length_um=20.0).set_index(["dendrite", "interval"])
    ab, bc = rates.loc[("d1", "a->b")], rates.loc[("d1", "b->c")]
    # a -> b: present {s0, s1} then {s0, s2}: one formed (s2), one eliminated (s1)
    assert (ab.n_a, ab.n_b, ab.formed, ab.eliminated) == (2, 2, 1, 1)
    assert ab.formation_rate == pytest.approx(1 / 2)
    assert ab.elimination_rate == pytest.approx(1 / 2)
    assert ab.turnover_ratio == pytest.approx(2 / 4)
    assert ab.survival_fraction == pytest.approx(1 / 2)  # s0 of {s0, s1}
    assert ab.density_a_per_10um == pytest.approx(10 * 2 / 20)
    # b -> c: present {s0, s2} then {s0}: none formed, s2 eliminated
    assert (bc.n_a, bc.n_b, bc.formed, bc.eliminated) == (2, 1, 0, 1)
    assert bc.formation_rate == 0 and bc.elimination_rate == pytest.approx(1 / 2)
    assert bc.turnover_ratio == pytest.approx(1 / 3)
    assert bc.survival_fraction == pytest.approx(1 / 2)
    assert bc.density_b_per_10um == pytest.approx(0.5)
    # d2 has no spine in a: rates relative to n_a and survival are undefined
    d2 = rates.loc[("d2", "a->b")]
    assert (d2.n_a, d2.n_b, d2.formed) == (0, 1, 1)
    assert np.isnan(d2.formation_rate) and np.isnan(d2.survival_fraction)
    assert d2.turnover_ratio == 1.0
    assert rates.loc[("d2", "b->c"), "formation_rate"] == 0
    pooled = truth_pooled_rates(rates.reset_index()).set_index("interval")
    assert pooled.loc["a->b", ["n_dendrites", "n_a", "n_b", "formed", "eliminated"]].tolist() == [
        2, 2, 3, 2, 1,
    ]  # fmt: skip
    assert pooled.loc["a->b", "formation_rate"] == pytest.approx(2 / 2)
    assert pooled.loc["a->b", "turnover_ratio"] == pytest.approx(3 / 5)
    # the analysis, on the presence table these lives give, says the same
    rows = [("d1", "a", 0), ("d1", "a", 1), ("d1", "b", 0), ("d1", "b", 2), ("d1", "c", 0),
            ("d2", "b", 0), ("d2", "c", 0)]  # fmt: skip
    pres = presence_matrix(pd.DataFrame(rows, columns=["dendrite", "session", "spine_id"]), LABELS)
    measured = interval_rates(pres, LABELS, lengths_um={"d1": 20.0, "d2": 20.0})
    pd.testing.assert_frame_equal(measured, rates.reset_index()[measured.columns])


def test_truth_rejects_impossible_lives():
    lives = pd.DataFrame({"dendrite": ["d1"], "spine_id": [0], "born": ["b"], "died": ["b"]})
    with pytest.raises(ParameterError, match="no later than it is born"):
        truth_rates(lives, LABELS)
    with pytest.raises(ParameterError, match="not a session label"):
        truth_rates(lives.assign(died="z"), LABELS)
    with pytest.raises(ParameterError, match="died is missing"):
        truth_rates(lives.drop(columns="died"), LABELS)


@pytest.mark.parametrize("scenario", list(SPINE_SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_analysis_on_the_true_presence_equals_the_independent_truth(scenario, seed):
    sim = simulate_dendrite(scenario=scenario, seed=seed)
    labels = [s[0] for s in SPINE_SCENARIOS[scenario]]
    truth = truth_rates(sim.lifetimes.assign(dendrite="d"), labels, length_um=44.0)
    pres = presence_matrix(sim.spines.assign(dendrite="d"), labels)
    measured = interval_rates(pres, labels, lengths_um={"d": 44.0})
    pd.testing.assert_frame_equal(measured, truth)
    # spines form and die, so the comparison is not between empty counts
    assert truth["formed"].sum() > 0 and truth["eliminated"].sum() > 0
    # every spine of the record is seen exactly in the sessions of its life, and vice versa
    assert set(sim.lifetimes["spine_id"]) == set(sim.spines["spine_id"])
    assert (truth["n_b"] == truth["n_a"] + truth["formed"] - truth["eliminated"]).all()


def test_written_ground_truth_agrees_with_the_analysis_on_it(tmp_path):
    toml = simulate_spine_study(tmp_path / "sim", seed=4, n_mice=2, dendrites_per_mouse=1)
    gt = toml.parent / "ground_truth"
    labels = [s[0] for s in SPINE_SCENARIOS["stress-ketamine"]]
    spines = pd.read_parquet(gt / "spines.parquet")
    written = pd.read_csv(gt / "rates.csv")
    pres = presence_matrix(spines, labels)
    measured = interval_rates(pres, labels, lengths_um={"m1-d1": 44.0, "m2-d1": 44.0})
    pd.testing.assert_frame_equal(measured, written, check_dtype=False)
    pd.testing.assert_frame_equal(
        pooled_rates(measured), pd.read_csv(gt / "rates_pooled.csv"), check_dtype=False
    )
