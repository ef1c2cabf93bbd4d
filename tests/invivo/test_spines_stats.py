"""Spine-turnover statistics: no p-value from a failed fit, and a calibrated fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ketamap.invivo.spines import cluster_sign_flip, mixed_model

INTERVALS = ["base1->base2", "base2->stress", "stress->ket24h"]


def _null_rates(rng, n_mice=5, n_dendrites=3, effect=0.0):
    """Rates with mouse and dendrite effects, autocorrelated noise, no interval effect."""
    rows = []
    for m in range(n_mice):
        mouse = rng.normal(0, 0.03)
        for d in range(n_dendrites):
            dend = rng.normal(0, 0.02)
            for k, interval in enumerate(INTERVALS):
                rate = 0.1 + mouse + dend + (effect if k == 2 else 0.0) + rng.normal(0, 0.02)
                rows.append({"dendrite": f"m{m}d{d}", "mouse": f"m{m}", "interval": interval,
                             "formation_rate": rate, "elimination_rate": rate})  # fmt: skip
    return pd.DataFrame(rows)


def test_sign_flip_is_calibrated_on_null_cohorts():
    """False-positive rate at alpha 0.05 on 600 null cohorts of 8 mice (3 dendrites each)."""
    rng = np.random.default_rng(0)
    p = [
        cluster_sign_flip(_null_rates(rng, n_mice=8), "formation_rate", INTERVALS)[1]["p_value"]
        for _ in range(600)
    ]
    fpr = float(np.mean(np.asarray(p) < 0.05))
    assert 0.02 <= fpr <= 0.08, fpr  # exact by construction; measured 0.047
    # ... and it has power against a real change
    changed = [_null_rates(rng, 8, effect=0.06) for _ in range(100)]
    p = [cluster_sign_flip(r, "formation_rate", INTERVALS)[1]["p_value"] for r in changed]
    power = float(np.mean(np.asarray(p) < 0.05))
    assert power >= 0.8, power


def test_no_p_value_from_a_fit_that_did_not_converge():
    """Identical rates in every mouse: MixedLM cannot estimate its variances; the rows come
    from the sign-flip test and say so, never from the failed fit."""
    rng = np.random.default_rng(1)
    rates = _null_rates(rng)
    rates["formation_rate"] = 0.1  # no variance at all
    rates.loc[rates.interval == INTERVALS[2], "formation_rate"] = 0.2
    mice = dict(zip(rates["dendrite"], rates["mouse"]))
    out = mixed_model(rates, mice)
    form = out[out.measure == "formation_rate"]
    assert len(form) == 2
    assert not form["converged"].any()
    assert form["model"].str.contains("sign-flip test over mice").all(), form["model"].tolist()
    assert form["model"].str.contains("with 5 mice no p below 0.0625 is possible").all()
    last = form[form.interval == INTERVALS[2]].iloc[0]
    assert np.isclose(last["estimate"], 0.1) and last["p_value"] == 2 / 2**5  # every mouse went up
    # every row: a converged MixedLM, or the sign-flip test, never a failed fit's p
    for row in out.itertuples():
        assert ("sign-flip" in row.model) != bool(row.converged), row
        assert 0 < row.p_value <= 1


def test_sign_flip_over_dendrites_of_a_single_mouse():
    """With one mouse the fallback flips the signs of dendrites (the cluster is the
    dendrite column itself)."""
    df = pd.DataFrame({"dendrite": list("aabbccdd"), "mouse": "m1",
                       "interval": ["i1", "i2"] * 4,
                       "rate": [0.1, 0.3, 0.2, 0.4, 0.1, 0.2, 0.3, 0.5]})  # fmt: skip
    r = cluster_sign_flip(df, "rate", ["i1", "i2"], cluster="dendrite")[0]
    assert np.isclose(r["estimate"], 0.175)
    assert r["p_value"] == 2 / 16  # all four differences positive: 2 of the 16 flips
