"""Empirical-Bayes prior df of the region dispersions (limma/edgeR-style F fit)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from test_regions import simulate

from ketamap.errors import InputError, ParameterError
from ketamap.params import from_mapping
from ketamap.stats import StatsParams, compare_regions
from ketamap.stats.regions import _residual_df, fit_f_prior_df


def _prior_df(counts, subjects, **params):
    res = compare_regions(counts, subjects, reference_group="saline",
                          params=StatsParams(**params))  # fmt: skip
    return res, res.attrs["dispersion_prior_df"]


def test_fit_f_prior_df_recovers_known_prior_df_around_a_trend():
    rng = np.random.default_rng(0)
    n, d1 = 3000, 9.0
    covariate = rng.uniform(0, 5, n)
    s0 = np.exp(0.5 * np.sin(covariate))  # a smooth trend the spline must remove
    for d0, lo, hi in ((4.0, 3.0, 5.5), (20.0, 12.0, 35.0)):
        sigma2 = s0 * d0 / rng.chisquare(d0, n)  # scaled inverse chi-square prior
        s2 = sigma2 * rng.chisquare(d1, n) / d1
        assert lo < fit_f_prior_df(s2, np.full(n, d1), covariate) < hi
    s2 = s0 * rng.chisquare(d1, n) / d1  # no spread around the trend at all
    assert fit_f_prior_df(s2, np.full(n, d1), covariate) > 200
    # without the covariate the trend inflates the spread, so the prior looks weaker
    assert fit_f_prior_df(s2, np.full(n, d1)) < 100
    with pytest.raises(InputError, match="two or more variances"):
        fit_f_prior_df([1.0], [9.0])
    with pytest.raises(InputError, match="df > 0"):
        fit_f_prior_df([1.0, 2.0], [9.0, 0.0])


def test_prior_df_is_large_for_homogeneous_and_small_for_heterogeneous_dispersions():
    expected = np.full(300, 200.0)
    homogeneous = [_prior_df(*simulate(s, expected=expected, cv=(0.18, 0.18)))[1] for s in (0, 1)]
    heterogeneous = [_prior_df(*simulate(s, expected=expected, cv=(0.03, 0.6)))[1] for s in (0, 1)]
    assert min(homogeneous) > 50, homogeneous
    assert max(heterogeneous) < 8, heterogeneous
    # capped at the df of the trend: 2 x ceil(0.3 x 300 / 2) regions x 9 residual df
    assert max(homogeneous) <= 90 * 9


def test_explicit_prior_df_reproduces_the_estimate_and_the_fixed_prior():
    counts, subjects = simulate(5, n_regions=40)
    est, d0 = _prior_df(counts, subjects)
    assert np.isfinite(d0) and d0 > 0
    fixed, d_fixed = _prior_df(counts, subjects, dispersion_prior_df=d0)
    assert d_fixed == d0
    pd.testing.assert_frame_equal(est, fixed, check_exact=True)
    # the LR-F test with a fixed prior df of 10 gives exactly the earlier fixed-prior model
    ten, d_ten = _prior_df(counts, subjects, dispersion_prior_df=10.0, test="lr-f")
    assert d_ten == 10.0
    got = ten.set_index(["contrast", "region_id"])
    expected = {  # (contrast, region): (p, dispersion) with the fixed edgeR default of 10
        ("dose_trend", 1): (0.59822046909190285, 0.03917731797805047),
        ("dose_trend", 2): (0.12953261865064714, 0.02820263548415346),
        ("ketamine_100_vs_saline", 1): (0.54313785123172220, 0.03917731797805047),
        ("ketamine_100_vs_saline", 2): (0.19492120172051916, 0.02820263548415346),
        ("ketamine_30_vs_saline", 1): (0.58819332138728153, 0.03917731797805047),
        ("ketamine_30_vs_saline", 2): (0.76796375752400270, 0.02820263548415346),
    }
    for key, (p, disp) in expected.items():
        np.testing.assert_allclose(got.loc[key, ["p", "dispersion"]].to_numpy(float),
                                   [p, disp], rtol=1e-8)  # fmt: skip


def test_few_regions_fall_back_to_ten_with_a_note(caplog):
    counts, subjects = simulate(3, n_regions=12)
    with caplog.at_level(logging.INFO, logger="ketamap.stats.regions"):
        res, d0 = _prior_df(counts, subjects)
    assert d0 == 10.0
    assert "not estimated" in caplog.text
    assert res["p"].notna().all()


def test_prior_df_with_zero_counts_all_zero_regions_and_zero_groups():
    counts, subjects = simulate(8, n_regions=80, expected=np.exp(np.linspace(np.log(0.3), 5, 80)))
    counts.loc[counts.region_id <= 5, "count"] = 0  # all-zero regions
    zero_group = (counts.region_id.between(6, 10)) & counts.subject.str.startswith("ketamine_30")
    counts.loc[zero_group, "count"] = 0  # one group without cells
    res, d0 = _prior_df(counts, subjects)
    assert np.isfinite(d0) and d0 > 0
    assert res.loc[res.region_id <= 5, "p"].isna().all()
    assert res.loc[res.region_id > 5, "p"].notna().all()


def test_residual_df_drops_observations_fitted_at_zero():
    x = np.column_stack([np.ones(12), np.repeat([0, 1, 0], 4), np.repeat([0, 0, 1], 4)])
    y = np.full((2, 12), 5.0)
    y[1, 4:8] = 0  # the second group has no cells in region 1
    w = np.ones((2, 12))
    w[0, 0] = 0  # a mouse without data for region 0
    _, cell = np.unique(x, axis=0, return_inverse=True)
    np.testing.assert_array_equal(_residual_df(x, y, w, cell.ravel()), [8, 6])


def test_prior_df_parameter():
    assert StatsParams().dispersion_prior_df is None
    assert from_mapping(StatsParams, {"dispersion_prior_df": 20}).dispersion_prior_df == 20.0
    with pytest.raises(ParameterError, match="dispersion_prior_df"):
        StatsParams(dispersion_prior_df=-1.0)
