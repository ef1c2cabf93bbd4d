"""Region statistics at the edges: groups without data, groups without cells, the Poisson bound.

The expected behaviour is edgeR's (glmQLFit / glmQLFTest with prior.count): a fold change
that the data cannot give is NaN with a reason; two groups without cells differ by exactly
nothing (log2 fold change 0, p = 1); a group without cells gets a fold change bounded by the
prior count. Ordinary regions keep the values recorded before these cases were handled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_regions import simulate

from ketamap.stats import StatsParams, benjamini_hochberg, compare_regions

TESTS = ("ql-f", "lr-f", "lr", "wald")


def rows(res, region_id, contrast):
    sel = res[(res.region_id == region_id) & (res.contrast == contrast)]
    assert len(sel) == 1
    return sel.iloc[0]


# --------------------------------------------------------------------------- no data


@pytest.mark.parametrize("min_subjects", [1, 2])
def test_group_without_data_in_a_region_has_no_fold_change(min_subjects):
    counts, subjects = simulate(9, n_regions=30)
    gone = (counts.region_id == 6) & counts.subject.str.startswith("ketamine_30")
    res = compare_regions(counts[~gone], subjects, reference_group="saline",
                          params=StatsParams(min_subjects_per_group=min_subjects))  # fmt: skip
    r = rows(res, 6, "ketamine_30_vs_saline")
    assert r["n_group"] == 0
    for col in ("log2_fold_change", "ci_low_log2", "ci_high_log2", "fold_change", "p", "q"):
        assert np.isnan(r[col]), col
    assert "no subject with data in 'ketamine_30'" in r["reason"]
    for contrast in ("ketamine_100_vs_saline", "dose_trend"):
        other = rows(res, 6, contrast)
        assert np.isfinite(other["log2_fold_change"]) and np.isfinite(other["p"])
    assert res.loc[res.region_id != 6, "log2_fold_change"].notna().all()


def test_group_with_every_subject_excluded_is_as_if_absent():
    """A group whose mice have no counts at all: its contrast has no fold change anywhere,
    and the other contrasts are those of the study without that group."""
    counts, subjects = simulate(31, n_regions=50)
    gone = counts.subject.str.startswith("ketamine_30")
    kept = compare_regions(counts[~gone], subjects, reference_group="saline")
    k30 = kept[kept.contrast == "ketamine_30_vs_saline"]
    assert len(k30) == 50
    assert k30[["log2_fold_change", "fold_change", "p", "q"]].isna().all().all()
    assert k30["reason"].str.contains("no subject with data in 'ketamine_30'").all()
    without = compare_regions(counts[~gone], subjects[~subjects.subject.str.startswith(
        "ketamine_30")], reference_group="saline")  # fmt: skip
    assert kept.attrs["dispersion_prior_df"] == without.attrs["dispersion_prior_df"]
    for contrast in ("ketamine_100_vs_saline", "dose_trend"):
        a = kept[kept.contrast == contrast].set_index("region_id").sort_index()
        b = without[without.contrast == contrast].set_index("region_id").sort_index()
        cols = ["log2_fold_change", "ci_low_log2", "ci_high_log2", "p", "q", "dispersion"]
        np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), rtol=1e-8)


# --------------------------------------------------------------------------- no cells


@pytest.fixture(scope="module")
def zero_groups():
    """Region 2: no cells in saline nor ketamine_30 (saline mice with twice the volume);
    region 3: no cells at 100 mg/kg; every other region ordinary."""
    counts, subjects = simulate(21, n_regions=40, expected=np.full(40, 60.0))
    both = (counts.region_id == 2) & counts.subject.str.match("saline|ketamine_30")
    counts.loc[both, "count"] = 0
    big = (counts.region_id == 2) & counts.subject.str.startswith("saline")
    counts.loc[big, "volume_mm3"] *= 2.0
    one = (counts.region_id == 3) & counts.subject.str.startswith("ketamine_100")
    counts.loc[one, "count"] = 0
    return counts, subjects


@pytest.mark.parametrize("test", TESTS)
def test_two_groups_without_cells_differ_by_nothing(zero_groups, test):
    counts, subjects = zero_groups
    res = compare_regions(counts, subjects, reference_group="saline",
                          params=StatsParams(test=test))  # fmt: skip
    r = rows(res, 2, "ketamine_30_vs_saline")
    assert abs(r["log2_fold_change"]) < 1e-9
    if test == "wald":  # z = estimate / SE, the estimate zero to rounding
        assert r["p"] > 1 - 1e-12 and r["q"] > 1 - 1e-12
    else:  # the likelihood-ratio statistic is exactly zero
        assert r["p"] == 1.0 and r["q"] == 1.0
    assert r["ci_low_log2"] < 0 < r["ci_high_log2"]
    assert abs(r["ci_low_log2"] + r["ci_high_log2"]) < 1e-6
    assert r["reason"] == "both groups have only zeros: no change"
    # seen from the other side, the same
    flipped = compare_regions(counts, subjects, reference_group="ketamine_30",
                              params=StatsParams(test=test))  # fmt: skip
    r = rows(flipped, 2, "saline_vs_ketamine_30")
    assert abs(r["log2_fold_change"]) < 1e-9 and r["p"] > 1 - 1e-12
    # the group that has cells is still far from both
    up = rows(res, 2, "ketamine_100_vs_saline")
    assert up["log2_fold_change"] > 5 and up["p"] < 1e-4


def test_p_of_one_only_enlarges_the_bh_family(zero_groups):
    """The other regions' q are BH over their own p with one more test whose p is 1."""
    counts, subjects = zero_groups
    res = compare_regions(counts, subjects, reference_group="saline")
    family = res[(res.contrast == "ketamine_30_vs_saline") & (res.level == rows(
        res, 2, "ketamine_30_vs_saline")["level"])]  # fmt: skip
    others = family[family.region_id != 2]
    m = len(others)
    expected = np.minimum(1.0, benjamini_hochberg(others["p"].to_numpy()) * (m + 1) / m)
    np.testing.assert_allclose(others["q"], expected, rtol=1e-12)


def test_group_without_cells_is_bounded_by_the_prior_count(zero_groups):
    counts, subjects = zero_groups
    res = compare_regions(counts, subjects, reference_group="saline")
    r = rows(res, 3, "ketamine_100_vs_saline")
    assert r["p"] < 1e-4 and "only zeros" in r["reason"] and "prior count" in r["reason"]
    # edgeR's predFC: prior_count x volume / mean volume cells added to every mouse
    region = counts[counts.region_id == 3].merge(subjects, on="subject")
    mean_vol = region["volume_mm3"].mean()
    saline = region[region.group == "saline"]
    density_saline = (saline["count"].sum() + 0.125 * len(saline)) / saline["volume_mm3"].sum()
    assert abs(r["log2_fold_change"] - np.log2(0.125 / mean_vol / density_saline)) < 0.05
    halved = compare_regions(counts, subjects, reference_group="saline",
                             params=StatsParams(prior_count=0.0625))  # fmt: skip
    assert rows(halved, 3, "ketamine_100_vs_saline")["log2_fold_change"] == pytest.approx(
        r["log2_fold_change"] - 1.0, abs=0.05
    )
    assert rows(halved, 3, "ketamine_100_vs_saline")["p"] == r["p"]  # p does not use it


# --------------------------------------------------------------------------- ordinary regions

PLANTED = np.r_[[0.5, 2.0, 0.6, 1.7, 0.4, 2.5], np.ones(34)]
# Recorded before groups without data or cells were handled (and without the Poisson bound):
# (log2 fold change, CI low, p, q) of some rows, and sums over all 120 rows of
# log2 fold change, CI low, log p, log q and log dispersion.
RECORDED = {
    "ql-f": {
        ("dose_trend", 1): (-1.2397928235575122, -1.6604699345715699, 1.9291947938615748e-07,
                            1.929194793861575e-06),
        ("dose_trend", 2): (0.7410771556087365, 0.12791256906854143, 0.01579289504981553,
                            0.1052859669987702),
        ("dose_trend", 20): (0.11527383317206708, -0.41879573654921276, 0.666139905655246,
                             0.7401554507280511),
        ("ketamine_100_vs_saline", 1): (-1.0966028515209758, -1.5327215136155825,
                                        2.1440478066991077e-06, 2.1440478066991076e-05),
        ("ketamine_100_vs_saline", 5): (-1.297134591018945, -1.671250885274936,
                                        4.908655305713293e-10, 9.817310611426586e-09),
        ("ketamine_100_vs_saline", 20): (0.01755791228601103, -0.5177364524991621,
                                         0.9486912489376788, 0.967477515370096),
        "sums": (-0.8510595042967246, -66.12134935014028, -250.91064484226493,
                 -152.91276914521228, -413.54753562240643),
    },
    "wald": {
        ("dose_trend", 5): (-1.5375867237602971, -1.9064317471769132, 3.073463731561565e-16,
                            6.146927463123131e-15),
        ("ketamine_100_vs_saline", 2): (0.5293894923908625, -0.0461494511457643,
                                        0.07141888457850169, 0.4761258971900113),
        "sums": (-0.8494227972881879, -65.51526779652961, -271.4647074847808,
                 -174.1280204785177, -414.36382137366775),
    },
}  # fmt: skip


@pytest.mark.parametrize("test", ["ql-f", "wald"])
def test_ordinary_regions_keep_their_recorded_results(test):
    counts, subjects = simulate(2024, n_regions=40, levels=2, effects={"ketamine_100": PLANTED})
    params = StatsParams(test=test, poisson_bound=False)
    res = compare_regions(counts, subjects, reference_group="saline", params=params)
    res = res.sort_values(["contrast", "region_id"])
    assert res.attrs["dispersion_prior_df"] == 108.0
    for key, want in RECORDED[test].items():
        if key == "sums":
            got = (res["log2_fold_change"].sum(), res["ci_low_log2"].sum(),
                   np.log(res["p"]).sum(), np.log(res["q"]).sum(),
                   np.log(res["dispersion"]).sum())  # fmt: skip
        else:
            r = rows(res, key[1], key[0])
            got = (r["log2_fold_change"], r["ci_low_log2"], r["p"], r["q"])
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=str(key))
    assert (res["reason"] == "").all()


# --------------------------------------------------------------------------- Poisson bound


def test_poisson_bound_raises_p_to_the_poisson_likelihood_ratio_test():
    """Where the squeezed QL dispersion puts a mouse's variance below Poisson, p is that of the
    Poisson LR test (checked against statsmodels); elsewhere, and for other tests, nothing."""
    sm = pytest.importorskip("statsmodels.api")
    counts, subjects = simulate(40, n_regions=60, cv=(0.02, 0.5))
    key = ["contrast", "region_id"]
    on = compare_regions(counts, subjects, reference_group="saline").set_index(key)
    off = compare_regions(counts, subjects, reference_group="saline",
                          params=StatsParams(poisson_bound=False)).set_index(key)  # fmt: skip
    off = off.loc[on.index]
    assert (on["p"] >= off["p"]).all()
    raised = on.index[on["p"] > off["p"]]
    assert 1 <= len(raised) <= 0.1 * len(on)
    assert (on.drop(index=raised)["p"] == off.drop(index=raised)["p"]).all()
    for contrast, region in raised:
        if contrast == "dose_trend":
            continue
        data = counts[counts.region_id == region].merge(subjects, on="subject")
        groups = ["ketamine_30", "ketamine_100"]
        x = np.column_stack([np.ones(len(data))] + [(data.group == g).to_numpy(float)
                                                    for g in groups])  # fmt: skip
        reduced = [0] + [1 + k for k, g in enumerate(groups) if not contrast.startswith(g)]

        def loglik(design, data=data):
            fit = sm.GLM(data["count"].to_numpy(float), design, family=sm.families.Poisson(),
                         offset=np.log(data["volume_mm3"].to_numpy())).fit()  # fmt: skip
            return fit.llf

        lr = 2 * (loglik(x) - loglik(x[:, reduced]))
        assert on.loc[(contrast, region), "p"] == pytest.approx(stats.chi2.sf(lr, 1), rel=1e-5)
    for test in ("lr-f", "wald"):
        a, b = (compare_regions(counts, subjects, reference_group="saline",
                                params=StatsParams(test=test, poisson_bound=flag))
                for flag in (True, False))  # fmt: skip
        pd.testing.assert_frame_equal(a, b)
