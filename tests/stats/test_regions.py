"""Region-level group comparison: calibration, power, recovery and edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ketamap.errors import InputError, ParameterError, StatsError
from ketamap.params import from_mapping
from ketamap.stats import StatsParams, benjamini_hochberg, compare_regions
from ketamap.stats.regions import OUTPUT_COLUMNS

GROUPS = (("saline", 0.0), ("ketamine_30", 30.0), ("ketamine_100", 100.0))


def simulate(
    seed,
    *,
    n_regions=300,
    n_per_group=4,
    levels=5,
    expected=None,
    effects=None,
    cv=(0.15, 0.20),
    dose_slope=None,
):
    """A cohort with known truth: NB counts (gamma-Poisson), per-mouse volumes.

    ``expected``: expected cells per region in the reference group (default
    log-uniform 5..500). ``effects``: {group: array of fold changes}.
    ``dose_slope``: array of log fold changes per 100 mg/kg (log-linear in dose).
    """
    rng = np.random.default_rng(seed)
    subjects = pd.DataFrame(
        [(f"{g}-{i}", g, d) for g, d in GROUPS for i in range(n_per_group)],
        columns=["subject", "group", "dose_mg_per_kg"],
    )
    if expected is None:
        expected = np.exp(rng.uniform(np.log(5), np.log(500), n_regions))
    volume = np.exp(rng.uniform(np.log(0.05), np.log(5), n_regions))
    region_cv = rng.uniform(*cv, n_regions)
    shape = 1 / region_cv**2
    frames = []
    for s, g, d in subjects.itertuples(index=False):
        brain = rng.normal(1, 0.05)  # brain size: scales volume and cells alike
        mu = expected * brain
        if effects and g in effects:
            mu = mu * effects[g]
        if dose_slope is not None:
            mu = mu * np.exp(dose_slope * d / 100)
        counts = rng.poisson(rng.gamma(shape, mu / shape))
        frames.append(pd.DataFrame({
            "subject": s,
            "region_id": np.arange(1, n_regions + 1, dtype=np.int64),
            "acronym": [f"R{i}" for i in range(1, n_regions + 1)],
            "level": 1 + np.arange(n_regions) % levels,
            "count": counts.astype(np.int64),
            "volume_mm3": volume * brain,
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True), subjects


def row(res, region_id, contrast):
    sel = res[(res.region_id == region_id) & (res.contrast == contrast)]
    assert len(sel) == 1
    return sel.iloc[0]


# --------------------------------------------------------------------------- accuracy


def test_null_p_values_are_calibrated():
    frac = []
    for seed in range(4):  # 4 x 300 null regions, 3 contrasts each
        counts, subjects = simulate(seed)
        res = compare_regions(counts, subjects, reference_group="saline")
        assert res["p"].notna().all()
        frac.append(res.groupby("contrast")["p"].apply(lambda p: np.mean(p < 0.05)))
    by_contrast = pd.concat(frac, axis=1).mean(axis=1)
    assert set(by_contrast.index) == {
        "ketamine_30_vs_saline", "ketamine_100_vs_saline", "dose_trend"
    }  # fmt: skip
    assert ((by_contrast > 0.02) & (by_contrast < 0.08)).all(), by_contrast.to_dict()


def test_power_for_two_fold_change_in_a_region_of_50_cells():
    hits = []
    for seed in range(20):
        n_regions = 60
        expected = np.exp(np.random.default_rng(seed).uniform(np.log(5), np.log(500), n_regions))
        expected[0] = 50.0
        fold = np.ones(n_regions)
        fold[0] = 2.0
        counts, subjects = simulate(
            100 + seed, n_regions=n_regions, levels=2, expected=expected,
            effects={"ketamine_100": fold},
        )  # fmt: skip
        res = compare_regions(counts, subjects, reference_group="saline")
        hits.append(row(res, 1, "ketamine_100_vs_saline")["q"] < 0.05)
    assert np.mean(hits) >= 0.8


def test_known_effects_are_recovered_with_sign_and_ci():
    n_regions = 120
    fold = np.ones(n_regions)
    truth = np.tile([0.5, 0.67, 1.5, 2.0], 10)
    fold[:40] = truth
    expected = np.full(n_regions, 200.0)
    counts, subjects = simulate(7, n_regions=n_regions, expected=expected,
                                effects={"ketamine_30": fold})  # fmt: skip
    res = compare_regions(counts, subjects, reference_group="saline")
    hit = res[(res.contrast == "ketamine_30_vs_saline") & (res.region_id <= 40)]
    hit = hit.sort_values("region_id")
    true_lfc = np.log2(truth)
    assert (np.sign(hit["log2_fold_change"]) == np.sign(true_lfc)).all()
    covered = (hit["ci_low_log2"] <= true_lfc) & (true_lfc <= hit["ci_high_log2"])
    assert covered.mean() >= 0.85
    assert (hit["q"] < 0.05).mean() >= 0.8
    np.testing.assert_allclose(hit["fold_change"], np.exp2(hit["log2_fold_change"]))


def test_dose_trend_reports_fold_change_over_the_dose_span():
    n_regions = 60
    slope = np.zeros(n_regions)
    slope[:10] = np.log(0.5)  # halves from 0 to 100 mg/kg, log-linearly
    counts, subjects = simulate(3, n_regions=n_regions, expected=np.full(n_regions, 300.0),
                                dose_slope=slope)  # fmt: skip
    res = compare_regions(counts, subjects, reference_group="saline")
    trend = res[(res.contrast == "dose_trend")].sort_values("region_id")
    assert (trend["dose_unit_mg_per_kg"] == 100.0).all()
    planted = trend[trend.region_id <= 10]
    assert np.abs(planted["log2_fold_change"].median() + 1) < 0.15
    assert (planted["q"] < 0.05).all()
    assert planted["spearman_p"].notna().all() and planted["welch_p"].isna().all()
    per10 = compare_regions(counts, subjects, reference_group="saline",
                            params=StatsParams(dose_trend_unit_mg_per_kg=10.0))  # fmt: skip
    t10 = per10[per10.contrast == "dose_trend"].set_index("region_id")["log2_fold_change"]
    t100 = trend.set_index("region_id")["log2_fold_change"]
    np.testing.assert_allclose(t10 * 10, t100.loc[t10.index], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- output


def test_output_columns_types_and_order():
    counts, subjects = simulate(1, n_regions=30)
    counts["region_id"] += 100_000  # Allen ids above 65535 must survive
    res = compare_regions(counts, subjects, reference_group="saline")
    assert tuple(res.columns) == OUTPUT_COLUMNS
    assert len(res) == 30 * 3
    assert res["region_id"].dtype == np.int64 and res["region_id"].min() > 65535
    assert res["n_ref"].dtype == np.int64 and res["converged"].dtype == bool
    assert (res["method"] == "negbin").all() and res["converged"].all()
    assert list(res["contrast"]) == sorted(res["contrast"])
    for _, part in res.groupby(["contrast", "level"]):
        assert part["p"].is_monotonic_increasing
    group_rows = res[res.contrast != "dose_trend"]
    assert group_rows["welch_p"].notna().all() and group_rows["mannwhitney_p"].notna().all()
    assert (group_rows["n_ref"] == 4).all() and (group_rows["n_group"] == 4).all()
    assert res["dose_unit_mg_per_kg"].isna().sum() == 60


def test_fdr_families():
    counts, subjects = simulate(2, n_regions=50)
    qs = {}
    for fam in ("contrast_level", "contrast", "all"):
        res = compare_regions(counts, subjects, reference_group="saline",
                              params=StatsParams(fdr_family=fam))  # fmt: skip
        res = res.sort_values(["contrast", "region_id"])
        qs[fam] = res["q"].to_numpy()
        if fam == "contrast_level":
            part = res[(res.contrast == "dose_trend") & (res.level == 2)]
            np.testing.assert_allclose(part["q"], benjamini_hochberg(part["p"]))
        if fam == "all":
            np.testing.assert_allclose(res["q"], benjamini_hochberg(res["p"]))
    assert not np.allclose(qs["contrast_level"], qs["all"])


@pytest.fixture(scope="module")
def planted_cohort():
    """60 regions of 50-500 cells; regions 1-8 change 2.5-fold up or down at 100 mg/kg."""
    n = 60
    expected = np.exp(np.random.default_rng(4).uniform(np.log(50), np.log(500), n))
    fold = np.ones(n)
    fold[:8] = [2.5, 0.4] * 4
    counts, subjects = simulate(4, n_regions=n, expected=expected,
                                effects={"ketamine_100": fold})  # fmt: skip
    default = compare_regions(counts, subjects, reference_group="saline")
    return counts, subjects, fold, default.sort_values(["contrast", "region_id"])


@pytest.mark.parametrize("test", ["lr-f", "lr", "wald"])
def test_alternative_tests_find_planted_effects_and_agree_with_the_default(test, planted_cohort):
    counts, subjects, fold, default = planted_cohort
    res = compare_regions(counts, subjects, reference_group="saline",
                          params=StatsParams(test=test))  # fmt: skip
    res = res.sort_values(["contrast", "region_id"])
    planted = (res.contrast == "ketamine_100_vs_saline") & (res.region_id <= 8)
    hit = res[planted]
    assert (hit["p"] < 1e-4).all(), hit["p"].tolist()
    assert (np.sign(hit["log2_fold_change"]) == np.sign(np.log(fold[:8]))).all()
    null = res.loc[(res.contrast != "dose_trend") & ~planted, "p"]  # 112 tests, no effect
    assert stats.kstest(null, "uniform").pvalue > 0.01
    assert 0.0 <= (null < 0.05).mean() <= 0.12
    assert stats.spearmanr(res["p"], default["p"]).statistic > 0.98
    if test == "lr-f":  # the same statistic as "lr", against F(1, d) instead of chi-square(1)
        chi2 = compare_regions(
            counts, subjects, reference_group="saline", params=StatsParams(test="lr")
        ).sort_values(["contrast", "region_id"])
        assert (res["p"].to_numpy() >= chi2["p"].to_numpy()).all()


def test_covariates():
    counts, subjects = simulate(5, n_regions=20)
    subjects["sex"] = ["M", "F"] * 6
    subjects["batch"] = [1.0, 2.0, 3.0] * 4
    res = compare_regions(counts, subjects, reference_group="saline", covariates=("sex", "batch"))
    assert res["p"].notna().all()
    subjects["litter"] = subjects["group"]  # confounded with group
    with pytest.raises(StatsError, match="confounded"):
        compare_regions(counts, subjects, reference_group="saline", covariates=("litter",))
    with pytest.raises(InputError, match='did you mean "sex"'):
        compare_regions(counts, subjects, reference_group="saline", covariates=("sexx",))


# --------------------------------------------------------------------------- edge cases


def test_zero_counts_and_all_zero_region():
    counts, subjects = simulate(6, n_regions=20)
    counts.loc[counts.region_id == 3, "count"] = 0
    counts.loc[(counts.region_id == 4) & (counts.subject == "saline-0"), "count"] = 0
    res = compare_regions(counts, subjects, reference_group="saline")
    dead = res[res.region_id == 3]
    assert dead["p"].isna().all() and dead["q"].isna().all()
    assert (dead["reason"] == "no cells in any subject").all()
    assert (dead["method"] == "not-tested").all()
    assert res[res.region_id == 4]["p"].notna().all()


def test_group_with_only_zeros_gives_finite_estimate_and_small_p():
    counts, subjects = simulate(8, n_regions=20, expected=np.full(20, 40.0))
    gone = (counts.region_id == 2) & counts.subject.str.startswith("ketamine_100")
    counts.loc[gone, "count"] = 0
    res = compare_regions(counts, subjects, reference_group="saline")
    r = row(res, 2, "ketamine_100_vs_saline")
    assert np.isfinite(r["log2_fold_change"]) and r["log2_fold_change"] < -3
    assert r["p"] < 1e-4 and "only zeros" in r["reason"]


def test_region_missing_in_some_mice():
    counts, subjects = simulate(9, n_regions=20)
    drop = (counts.region_id == 5) & counts.subject.isin(["saline-0", "ketamine_30-1"])
    drop |= (counts.region_id == 6) & counts.subject.str.startswith("ketamine_30")
    res = compare_regions(counts[~drop], subjects, reference_group="saline")
    r = row(res, 5, "ketamine_30_vs_saline")
    assert (r["n_ref"], r["n_group"]) == (3, 3) and np.isfinite(r["p"])
    r = row(res, 6, "ketamine_30_vs_saline")
    assert r["n_group"] == 0 and np.isnan(r["p"]) and "fewer than 2" in r["reason"]
    assert np.isfinite(row(res, 6, "ketamine_100_vs_saline")["p"])
    assert np.isfinite(row(res, 6, "dose_trend")["p"])


def test_missing_is_not_zero():
    counts, subjects = simulate(10, n_regions=20)
    drop = (counts.region_id == 7) & counts.subject.str.startswith("ketamine_100")
    drop &= counts.subject != "ketamine_100-0"
    res = compare_regions(counts[~drop], subjects, reference_group="saline",
                          params=StatsParams(min_subjects_per_group=1))  # fmt: skip
    r = row(res, 7, "ketamine_100_vs_saline")
    assert r["n_group"] == 1 and abs(r["log2_fold_change"]) < 1


def test_group_with_a_single_subject():
    counts, subjects = simulate(12, n_regions=20)
    keep = ~counts.subject.isin(["ketamine_30-1", "ketamine_30-2", "ketamine_30-3"])
    subjects = subjects[~subjects.subject.isin(["ketamine_30-1", "ketamine_30-2",
                                                "ketamine_30-3"])]  # fmt: skip
    res = compare_regions(counts[keep], subjects, reference_group="saline")
    single = res[res.contrast == "ketamine_30_vs_saline"]
    assert single["p"].isna().all() and single["welch_p"].isna().all()
    assert single["reason"].str.contains("fewer than 2 subjects").all()
    assert single["log2_fold_change"].notna().all()
    assert res[res.contrast == "ketamine_100_vs_saline"]["p"].notna().all()


def test_min_total_count_filters_regions():
    counts, subjects = simulate(13, n_regions=20, expected=np.r_[np.full(10, 2.0),
                                                                 np.full(10, 200.0)])  # fmt: skip
    res = compare_regions(counts, subjects, reference_group="saline",
                          params=StatsParams(min_total_count=100))  # fmt: skip
    low = res[res.region_id <= 10]
    assert low["p"].isna().all() and low["reason"].str.contains("total count below 100").all()
    assert res[res.region_id > 10]["p"].notna().all()


def test_single_group_is_an_error():
    counts, subjects = simulate(14, n_regions=5)
    subjects["group"] = "saline"
    with pytest.raises(StatsError) as err:
        compare_regions(counts, subjects, reference_group="saline")
    msg = str(err.value)
    assert "at least two groups" in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_unknown_reference_group_suggests_the_nearest():
    counts, subjects = simulate(15, n_regions=5)
    with pytest.raises(StatsError, match='did you mean "saline"'):
        compare_regions(counts, subjects, reference_group="salin")


def test_bad_inputs():
    counts, subjects = simulate(16, n_regions=5)
    with pytest.raises(InputError, match="volume_mm3"):
        compare_regions(counts.assign(volume_mm3=0.0), subjects, reference_group="saline")
    with pytest.raises(InputError, match="whole numbers"):
        compare_regions(counts.assign(count=-1), subjects, reference_group="saline")
    with pytest.raises(InputError, match="not in subjects"):
        compare_regions(counts, subjects.iloc[1:], reference_group="saline")
    with pytest.raises(InputError, match="more than one row"):
        compare_regions(pd.concat([counts, counts.iloc[:1]]), subjects,
                        reference_group="saline")  # fmt: skip


def test_no_dose_variation_drops_the_trend():
    counts, subjects = simulate(17, n_regions=5)
    res = compare_regions(counts, subjects.assign(dose_mg_per_kg=1.0), reference_group="saline")
    assert "dose_trend" not in set(res["contrast"])


def test_params_are_validated():
    with pytest.raises(ParameterError):
        StatsParams(alpha=1.5)
    with pytest.raises(ParameterError, match="fdr_family"):
        StatsParams(fdr_family="level")
    with pytest.raises(ParameterError, match='did you mean "min_total_count"'):
        from_mapping(StatsParams, {"min_total_counts": 3})
    params = from_mapping(StatsParams, {"dose_trend_unit_mg_per_kg": 10})
    assert params.dose_trend_unit_mg_per_kg == 10.0


# --------------------------------------------------------------------------- BH


def test_benjamini_hochberg_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(size=200), rng.uniform(0, 1e-3, 20)]
    expected = multitest.multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    with_nan = p.copy()
    with_nan[::7] = np.nan
    got = benjamini_hochberg(with_nan)
    ok = ~np.isnan(with_nan)
    assert np.isnan(got[~ok]).all()
    np.testing.assert_allclose(got[ok], multitest.multipletests(p[ok], method="fdr_bh")[1])
    assert benjamini_hochberg(np.array([])).shape == (0,)
    assert benjamini_hochberg(p.reshape(20, 11)).shape == (20, 11)
    with pytest.raises(InputError):
        benjamini_hochberg([0.5, 1.2])
