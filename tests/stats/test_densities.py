"""Continuous per-region densities: moderated t on log densities, recovery and edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf

from ketamap.errors import InputError, ParameterError, StatsError
from ketamap.params import from_mapping
from ketamap.stats.densities import (
    DENSITY_COLUMNS,
    DensityParams,
    compare_densities,
    squeeze_var,
)

GROUPS = (("saline", 0.0), ("ket30", 30.0), ("ket100", 100.0))
VALUE = "length_density_mm_per_mm3"


def simulate(seed, *, n_regions=200, n_per_group=5, folds=None, d0=8.0, s0=0.2, levels=4):
    """Log-normal densities with region variances from a scaled inverse chi-square.

    ``log density = log base + log fold + sigma_r * N(0, 1)``, ``sigma_r² ~ s0² d0 /
    chi²(d0)``; ``folds``: {group: per-region fold changes}. Returns the long table,
    the subjects and the per-region sigma.
    """
    rng = np.random.default_rng(seed)
    base = np.exp(rng.uniform(np.log(20), np.log(2000), n_regions))
    sigma = s0 * np.sqrt(d0 / rng.chisquare(d0, n_regions))
    subjects = pd.DataFrame(
        [(f"{g}-{i}", g, d) for g, d in GROUPS for i in range(n_per_group)],
        columns=["subject", "group", "dose_mg_per_kg"],
    )
    frames = []
    for s, g, _ in subjects.itertuples(index=False):
        fold = (folds or {}).get(g, 1.0)
        dens = base * fold * np.exp(sigma * rng.normal(size=n_regions))
        frames.append(pd.DataFrame({
            "subject": s,
            "region_id": np.arange(1, n_regions + 1, dtype=np.int64),
            "acronym": [f"R{i}" for i in range(1, n_regions + 1)],
            "level": 1 + np.arange(n_regions) % levels,
            VALUE: dens,
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True), subjects, sigma


def row(res, region_id, contrast):
    sel = res[(res.region_id == region_id) & (res.contrast == contrast)]
    assert len(sel) == 1
    return sel.iloc[0]


# --------------------------------------------------------------------------- accuracy


def test_planted_effects_are_recovered():
    n = 300
    rng = np.random.default_rng(5)
    hit = np.zeros(n, bool)
    hit[rng.choice(n, 30, replace=False)] = True
    truth = np.where(hit, rng.choice([0.5, 2.0], n), 1.0)
    table, subjects, _ = simulate(1, n_regions=n, n_per_group=6, folds={"ket100": truth})
    res = compare_densities(table, subjects, reference_group="saline")
    assert list(res.columns) == list(DENSITY_COLUMNS)
    r = res[res.contrast == "ket100_vs_saline"].sort_values("region_id")
    assert r["p"].notna().all() and (r["method"] == "moderated-t").all()
    called = r["called"].to_numpy()
    assert called[hit].mean() >= 0.9
    assert (called & ~hit).sum() <= 2
    lfc = r["log2_fold_change"].to_numpy()
    assert np.all(np.sign(lfc[hit & called]) == np.sign(np.log2(truth[hit & called])))
    # sampling error of a log2 fold change: 0.2 * sqrt(2 / 6) / ln 2 = 0.17 (SD)
    assert np.mean(np.abs(lfc - np.log2(truth))) < 0.17
    assert np.mean(lfc[hit] * np.sign(np.log2(truth[hit]))) == pytest.approx(1.0, abs=0.08)
    covered = (r["ci_low_log2"] <= np.log2(truth)) & (np.log2(truth) <= r["ci_high_log2"])
    assert 0.91 <= covered.mean() <= 0.99
    # the other contrasts carry no effect in the planted regions of ket100 only
    assert res.loc[res.contrast == "ket30_vs_saline", "called"].sum() <= 2
    # the planted group is the top dose: the trend finds most of them too
    trend = res[res.contrast == "dose_trend"].sort_values("region_id")
    assert trend["called"].to_numpy()[hit].mean() >= 0.7
    assert (trend["dose_unit_mg_per_kg"] == 100).all()


def test_null_p_values_are_calibrated():
    rates = []
    for seed in range(4):
        table, subjects, _ = simulate(10 + seed, n_regions=300, n_per_group=4)
        res = compare_densities(table, subjects, reference_group="saline")
        rates.append(res.groupby("contrast")["p"].apply(lambda p: np.mean(p < 0.05)))
    mean = pd.concat(rates, axis=1).mean(axis=1)
    assert set(mean.index) == {"ket30_vs_saline", "ket100_vs_saline", "dose_trend"}
    assert mean.between(0.03, 0.07).all(), mean.to_dict()


def test_moderation_adds_power_when_variances_are_alike():
    n = 300
    hit = np.arange(n) < 30
    table, subjects, _ = simulate(
        3, n_regions=n, n_per_group=4, folds={"ket100": np.where(hit, 1.6, 1.0)}, d0=40.0
    )
    found = {}
    for moderate in (True, False):
        res = compare_densities(
            table, subjects, reference_group="saline", params=DensityParams(moderate=moderate)
        )
        r = res[res.contrast == "ket100_vs_saline"].sort_values("region_id")
        found[moderate] = int(r["called"].to_numpy()[hit].sum())
        if moderate:
            assert min(res.attrs["prior_df"]["groups"].values()) > 15  # per level
            assert (r["df"] > 12).all()
        else:
            assert (r["df"] == 12 - 3).all()
            assert all(np.isnan(v) for v in res.attrs["prior_var"]["groups"].values())
    assert found[True] > found[False] + 3


def _ols_table(table, subjects, region, offset, formula):
    data = table[table.region_id == region].merge(subjects, on="subject")
    data = data.assign(y=np.log(data[VALUE] + offset))
    return smf.ols(formula, data=data).fit()


def test_t_statistics_agree_with_per_region_ols_without_moderation():
    table, subjects, _ = simulate(7, n_regions=30, n_per_group=5)
    subjects = subjects.assign(
        age=np.random.default_rng(0).normal(10, 2, len(subjects)), sex=["f", "m", "m"] * 5
    )
    params = DensityParams(moderate=False)
    res = compare_densities(table, subjects, reference_group="saline",
                            covariates=("age", "sex"), params=params)  # fmt: skip
    assert (res["method"] == "t").all()
    for region in (1, 7, 22):
        offset = row(res, region, "dose_trend")["log_offset"]
        z = "+ I((age - age.mean()) / age.std(ddof=0)) + sex"
        fit = _ols_table(table, subjects, region, offset,
                         f"y ~ C(group, Treatment('saline')) {z}")  # fmt: skip
        for g in ("ket30", "ket100"):
            name = f"C(group, Treatment('saline'))[T.{g}]"
            r = row(res, region, f"{g}_vs_saline")
            assert r["t"] == pytest.approx(fit.tvalues[name], rel=1e-8)
            assert r["p"] == pytest.approx(fit.pvalues[name], rel=1e-8)
            assert r["df"] == fit.df_resid == 15 - 5
            assert r["log2_fold_change"] == pytest.approx(fit.params[name] / np.log(2), rel=1e-8)
            lo, hi = fit.conf_int().loc[name] / np.log(2)
            assert (r["ci_low_log2"], r["ci_high_log2"]) == pytest.approx((lo, hi), rel=1e-8)
            assert r["residual_var"] == pytest.approx(fit.mse_resid, rel=1e-8)
        # the dose trend: dose as a number, reported per the study's dose span (100 mg/kg)
        fit = _ols_table(table, subjects, region, offset, f"y ~ dose_mg_per_kg {z}")
        r = row(res, region, "dose_trend")
        assert r["t"] == pytest.approx(fit.tvalues["dose_mg_per_kg"], rel=1e-8)
        assert r["p"] == pytest.approx(fit.pvalues["dose_mg_per_kg"], rel=1e-8)
        slope = fit.params["dose_mg_per_kg"] * 100 / np.log(2)
        assert r["log2_fold_change"] == pytest.approx(slope, rel=1e-8)


def test_moderated_t_is_the_ols_estimate_over_the_squeezed_variance():
    table, subjects, _ = simulate(8, n_regions=120, n_per_group=4)
    res = compare_densities(table, subjects, reference_group="saline")
    for region in (3, 50):
        r = row(res, region, "ket30_vs_saline")
        level = int(r["level"])  # each hierarchy level has its own prior
        d0, s0 = res.attrs["prior_df"]["groups"][level], res.attrs["prior_var"]["groups"][level]
        assert 0 < d0 < np.inf and s0 > 0
        fit = _ols_table(table, subjects, region, r["log_offset"],
                         "y ~ C(group, Treatment('saline'))")  # fmt: skip
        name = "C(group, Treatment('saline'))[T.ket30]"
        post = (d0 * s0 + 9 * fit.mse_resid) / (d0 + 9)
        assert r["posterior_var"] == pytest.approx(post, rel=1e-8)
        se = fit.bse[name] * np.sqrt(post / fit.mse_resid)
        assert r["t"] == pytest.approx(fit.params[name] / se, rel=1e-8)
        assert r["df"] == pytest.approx(9 + d0)


@pytest.mark.parametrize("d0", [4.0, 10.0])
def test_squeeze_var_recovers_the_prior(d0):
    rng = np.random.default_rng(int(d0))
    n, d, s0 = 3000, 9.0, 0.04
    sigma2 = s0 * d0 / rng.chisquare(d0, n)
    s2 = sigma2 * rng.chisquare(d, n) / d
    sq = squeeze_var(s2, np.full(n, d))
    assert sq.df_prior == pytest.approx(d0, rel=0.2)
    assert sq.var_prior == pytest.approx(np.full(n, s0), rel=0.06)
    expected = (sq.df_prior * sq.var_prior + d * s2) / (sq.df_prior + d)
    np.testing.assert_allclose(sq.var_post, expected)
    # shrinking brings the estimates closer to the true variances (more so for a larger d0)
    gain = np.mean(np.log(sq.var_post / sigma2) ** 2) / np.mean(np.log(s2 / sigma2) ** 2)
    assert gain < (0.75 if d0 < 5 else 0.55)


def test_squeeze_var_edge_cases():
    rng = np.random.default_rng(2)
    # no spread beyond sampling: an infinite prior df, every posterior is the prior
    s2 = 0.09 * rng.chisquare(6, 4000) / 6
    sq = squeeze_var(s2, np.full(4000, 6.0))
    assert sq.df_prior > 200
    assert sq.var_prior[0] == pytest.approx(0.09, rel=0.03)
    # df 0: left out of the estimate, given the prior
    sq = squeeze_var(np.r_[s2[:500], 7.0], np.r_[np.full(500, 6.0), 0.0])
    assert sq.var_post[-1] == sq.var_prior[-1]
    # a trend in the covariate is followed
    x = rng.uniform(0, 1, 4000)
    trend = squeeze_var(s2 * np.exp(3 * x), np.full(4000, 6.0), covariate=x)
    ratio = trend.var_prior / (0.09 * np.exp(3 * x))
    assert np.all(np.abs(ratio - 1) < 0.15)
    for bad in ([0.1], [0.1, -1.0], [np.nan, 0.1]):
        with pytest.raises(InputError):
            squeeze_var(bad, np.full(len(bad), 3.0))


# --------------------------------------------------------------------------- edge cases


@pytest.fixture(scope="module")
def edges():
    """Region 2: zero in every mouse; region 3: zero in saline and ket30; region 4: zero
    at 100 mg/kg; region 5: no ket30 mouse has data; region 6: one saline mouse only."""
    table, subjects, _ = simulate(21, n_regions=40, n_per_group=4)
    table.loc[table.region_id == 2, VALUE] = 0.0
    table.loc[(table.region_id == 3) & ~table.subject.str.startswith("ket100"), VALUE] = 0.0
    table.loc[(table.region_id == 4) & table.subject.str.startswith("ket100"), VALUE] = 0.0
    table = table[~((table.region_id == 5) & table.subject.str.startswith("ket30"))]
    one = (table.region_id == 6) & table.subject.str.startswith("saline")
    table = table[~one | (table.subject == "saline-0")]
    res = compare_densities(table, subjects, reference_group="saline")
    return table, subjects, res


def test_region_with_only_zeros_has_no_change(edges):
    _, _, res = edges
    for contrast in ("ket30_vs_saline", "ket100_vs_saline", "dose_trend"):
        r = row(res, 2, contrast)
        assert r["log2_fold_change"] == 0 and r["t"] == 0 and r["p"] == 1 and r["q"] == 1
        assert np.isnan(r["ci_low_log2"]) and r["reason"] == "zero in every subject: no change"
    assert max(res.attrs["prior_df"]["groups"].values()) > 0


def test_groups_with_only_zeros(edges):
    table, _, res = edges
    r = row(res, 3, "ket30_vs_saline")
    assert r["log2_fold_change"] == 0 and r["p"] == 1
    assert r["reason"] == "both groups have only zeros: no change"
    assert r["ci_low_log2"] < 0 < r["ci_high_log2"]
    up = row(res, 3, "ket100_vs_saline")
    assert up["log2_fold_change"] > 5 and up["p"] < 1e-6
    assert "only zeros" in up["reason"] and "log offset" in up["reason"]
    down = row(res, 4, "ket100_vs_saline")
    # the zeros sit at the offset: 1 % of the region's median positive density
    positive = table.loc[(table.region_id == 4) & (table[VALUE] > 0), VALUE]
    assert down["log_offset"] == pytest.approx(0.01 * positive.median())
    assert down["log2_fold_change"] < -5 and down["p"] < 1e-6


def test_group_without_data_is_nan_with_a_reason(edges):
    _, _, res = edges
    r = row(res, 5, "ket30_vs_saline")
    assert np.isnan(r["log2_fold_change"]) and np.isnan(r["p"]) and np.isnan(r["q"])
    assert r["reason"] == "no subject with data in 'ket30': no fold change"
    assert r["n_group"] == 0 and r["n_ref"] == 4
    other = row(res, 5, "ket100_vs_saline")
    assert np.isfinite(other["p"]) and other["reason"] == ""
    few = row(res, 6, "ket30_vs_saline")
    assert np.isnan(few["p"]) and few["reason"].startswith("fewer than 2 subjects")
    assert np.isfinite(few["log2_fold_change"])


def test_a_single_region_gets_the_ordinary_t(caplog):
    table, subjects, _ = simulate(4, n_regions=1, n_per_group=4)
    res = compare_densities(table, subjects, reference_group="saline")
    assert len(res) == 3 and (res["method"] == "t").all() and res["p"].notna().all()
    assert list(res.attrs["prior_df"]["groups"].values()) == [0]
    assert "not moderated" in caplog.text
    plain = compare_densities(table, subjects, reference_group="saline",
                              params=DensityParams(moderate=False))  # fmt: skip
    pd.testing.assert_frame_equal(res, plain)


def test_scale_of_a_region_does_not_matter():
    table, subjects, _ = simulate(9, n_regions=60, n_per_group=4)
    scaled = table.assign(**{VALUE: table[VALUE] * np.where(table.region_id == 10, 1e3, 1.0)})
    a = compare_densities(table, subjects, reference_group="saline")
    b = compare_densities(scaled, subjects, reference_group="saline")
    cols = ["log2_fold_change", "ci_low_log2", "ci_high_log2", "t", "p", "q"]
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-9)


def test_hemispheres_are_tested_apart():
    table, subjects, _ = simulate(11, n_regions=40, n_per_group=4)
    right = table.assign(hemisphere="right", **{VALUE: table[VALUE] * 2.0})
    both = pd.concat([table.assign(hemisphere="left"), right], ignore_index=True)
    up = both.hemisphere.eq("right") & both.subject.str.startswith("ket100")
    both.loc[up & both.region_id.eq(1), VALUE] *= 3.0
    res = compare_densities(both, subjects, reference_group="saline")
    assert list(res.columns[:4]) == ["region_id", "acronym", "level", "hemisphere"]
    assert len(res) == 3 * 80
    sel = res[(res.region_id == 1) & (res.contrast == "ket100_vs_saline")]
    by_side = sel.set_index("hemisphere")
    assert by_side.loc["right", "called"] and not by_side.loc["left", "called"]
    assert by_side.loc["right", "log2_fold_change"] > 0.8  # log2(3) = 1.58, 4 mice a side


def test_voxel_fraction_and_no_trend():
    table, subjects, _ = simulate(12, n_regions=50, n_per_group=4)
    frac = table.assign(voxel_fraction=table[VALUE] / 1e4).drop(columns=VALUE)
    params = DensityParams(trend=False)
    res = compare_densities(frac, subjects.drop(columns="dose_mg_per_kg"),
                            reference_group="saline", value="voxel_fraction",
                            params=params)  # fmt: skip
    assert set(res.contrast) == {"ket30_vs_saline", "ket100_vs_saline"}
    assert res.attrs["value"] == "voxel_fraction" and "dose_trend" not in res.attrs["prior_df"]
    ref = compare_densities(table, subjects, reference_group="saline", params=params)
    np.testing.assert_allclose(res["p"], ref["p"], rtol=1e-9)


# --------------------------------------------------------------------------- bad input


def _one_sentence(err):
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg
    return msg


def test_bad_input_is_one_sentence():
    table, subjects, _ = simulate(13, n_regions=5, n_per_group=3)
    neg = table.copy()
    neg.loc[0, VALUE] = -1.0
    with pytest.raises(InputError) as err:
        compare_densities(neg, subjects, reference_group="saline")
    assert "1 row(s)" in _one_sentence(err)
    inf = table.copy()
    inf.loc[3, VALUE] = np.inf
    with pytest.raises(InputError) as err:
        compare_densities(inf, subjects, reference_group="saline")
    _one_sentence(err)
    with pytest.raises(InputError) as err:
        compare_densities(table, subjects, reference_group="saline", value="length_density")
    assert "length_density_mm_per_mm3" in _one_sentence(err)  # did you mean
    with pytest.raises(StatsError) as err:
        compare_densities(table, subjects, reference_group="salin")
    assert 'did you mean "saline"' in _one_sentence(err)
    with pytest.raises(StatsError) as err:
        compare_densities(table, subjects.assign(group="saline"), reference_group="saline")
    _one_sentence(err)
    with pytest.raises(InputError) as err:
        compare_densities(pd.concat([table, table.iloc[:1]]), subjects, reference_group="saline")
    _one_sentence(err)
    with pytest.raises(InputError) as err:
        compare_densities(table.assign(**{VALUE: "x"}), subjects, reference_group="saline")
    _one_sentence(err)
    with pytest.raises(InputError) as err:
        compare_densities(table, subjects.iloc[1:], reference_group="saline")
    assert "saline-0" in _one_sentence(err)
    with pytest.raises(StatsError) as err:
        compare_densities(table, subjects.assign(batch=subjects.group), reference_group="saline",
                          covariates=("batch",))  # fmt: skip
    assert "confounded" in _one_sentence(err)
    with pytest.raises(InputError) as err:
        compare_densities(table.iloc[:0], subjects, reference_group="saline")
    _one_sentence(err)


def test_params_are_checked():
    with pytest.raises(ParameterError):
        DensityParams(log_offset=0.0)
    with pytest.raises(ParameterError):
        DensityParams(alpha=1.5)
    with pytest.raises(ParameterError) as err:
        from_mapping(DensityParams, {"log_ofset": 1.0})
    assert "log_offset" in str(err.value)
    assert from_mapping(DensityParams, {"moderate": False}).moderate is False


def test_parents_do_not_shrink_their_childrens_variances():
    """A parent pools its children (small variance); the leaves keep their own prior.

    With one prior for every level, the many low-variance parents pull the leaves'
    variance down and the leaves' null false-positive rate rises to about 0.11 here.
    """
    rng = np.random.default_rng(11)
    n_leaf, n_parent, per = 100, 1000, 4
    subjects = pd.DataFrame({"subject": [f"m{i}" for i in range(2 * per)],
                             "group": ["saline"] * per + ["ket"] * per,
                             "dose_mg_per_kg": [0] * per + [100] * per})  # fmt: skip
    rates = []
    for _ in range(3):
        sd = np.where(np.arange(n_leaf + n_parent) < n_leaf, 0.3, 0.08)
        values = 100 * np.exp(rng.normal(0, sd[:, None], (len(sd), 2 * per)))
        table = pd.DataFrame({
            "subject": np.tile(subjects["subject"], len(sd)),
            "region_id": np.repeat(np.arange(1, len(sd) + 1), 2 * per),
            "acronym": np.repeat([f"R{r}" for r in range(1, len(sd) + 1)], 2 * per),
            "level": np.repeat(np.where(sd == 0.3, 6, 3), 2 * per),
            "length_density_mm_per_mm3": values.ravel(),
        })  # fmt: skip
        res = compare_densities(table, subjects, reference_group="saline")
        rates.append((res.loc[res["level"] == 6, "p"] < 0.05).mean())
    assert np.mean(rates) < 0.08, rates
    assert res.attrs["prior_var"]["groups"][6] > 5 * res.attrs["prior_var"]["groups"][3]
