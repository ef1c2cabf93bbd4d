"""Inter-regional correlation networks and the permutation test of their difference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ketamap.errors import ParameterError, StatsError
from ketamap.stats.network import (
    NetworkParams,
    compare_networks,
    correlation_networks,
    density_matrix,
)


def cohort(n_per_group=8, n_regions=8, coupled=("R0", "R1"), seed=0, groups=("sal", "ket")):
    """Counts where, in the last group, two regions share a strong per-mouse factor."""
    rng = np.random.default_rng(seed)
    rows, subjects = [], []
    for g in groups:
        for i in range(n_per_group):
            sid = f"{g}-{i}"
            subjects.append((sid, g))
            factor = rng.normal(0, 0.4, n_regions)
            if g == groups[-1]:
                shared = rng.normal(0, 0.6)
                for k in range(n_regions):
                    if f"R{k}" in coupled:
                        factor[k] = shared + rng.normal(0, 0.05)
            lam = 200 * np.exp(factor)
            for k in range(n_regions):
                rows.append((sid, f"R{k}", 5, rng.poisson(lam[k]), 1.0))
                rows.append((sid, f"P{k // 4}", 4, 0, 1.0))  # coarse level, filled below
    counts = pd.DataFrame(rows, columns=["subject", "acronym", "level", "count", "volume_mm3"])
    counts = counts.groupby(["subject", "acronym", "level"], as_index=False).sum()
    subj = pd.DataFrame(subjects, columns=["subject", "group"])
    return counts, subj


def test_planted_coupling_is_the_top_edge_and_significant():
    counts, subjects = cohort(n_per_group=12)
    res = compare_networks(counts, subjects, reference_group="sal",
                           params=NetworkParams(level=5, n_permutations=2000, seed=1))  # fmt: skip
    e = res.edges.sort_values("p")
    top = e.iloc[0]
    assert {top["region_a"], top["region_b"]} == {"R0", "R1"}
    assert top["delta_r"] > 1.0 and top["r_group"] > 0.9
    assert top["p"] < 0.01 and top["p_fwe"] < 0.05
    s = res.summary.iloc[0]
    assert s["contrast"] == "ket_vs_sal" and s["n_regions"] == 8 and s["n_edges"] == 28
    assert not s["exact"] and s["n_permutations"] == 2000
    assert set(res.networks["group"]) == {"sal", "ket"}


def test_null_edges_are_rarely_called():
    calls = 0
    for seed in range(10):
        counts, subjects = cohort(n_per_group=5, coupled=(), seed=seed)
        res = compare_networks(counts, subjects, reference_group="sal",
                               params=NetworkParams(level=5, seed=seed))  # fmt: skip
        calls += int((res.edges["p_fwe"] < 0.05).any())
        assert res.summary["exact"].iloc[0]  # C(10, 5) = 252 <= 1000
    assert calls <= 3  # expected 0.5 under the null; P(>3) < 0.002


def test_spearman_and_pearson_match_scipy():
    counts, subjects = cohort(n_per_group=6, n_regions=4)
    m = density_matrix(counts, level=5)
    g = subjects.set_index("subject")["group"]
    sal = m[g.reindex(m.index) == "sal"]
    for method in ("spearman", "pearson"):
        net = correlation_networks(m, g, method=method)
        row = net[(net["group"] == "sal") & (net["region_a"] == m.columns[0])
                  & (net["region_b"] == m.columns[1])].iloc[0]  # fmt: skip
        x, y = sal.iloc[:, 0], sal.iloc[:, 1]
        ref = (stats.spearmanr(x, y)[0] if method == "spearman"
               else stats.pearsonr(np.log1p(x), np.log1p(y))[0])  # fmt: skip
        assert row["r"] == pytest.approx(ref, abs=1e-9)


def test_filters_and_level_choice():
    counts, subjects = cohort(n_per_group=4, n_regions=6)
    # a sparse region and one missing in a mouse are dropped
    extra = pd.DataFrame([(s, "SPARSE", 5, 1, 1.0) for s in subjects["subject"]]
                         + [(s, "HOLE", 5, 100, 1.0) for s in subjects["subject"][1:]],
                         columns=counts.columns)  # fmt: skip
    res = compare_networks(pd.concat([counts, extra]), subjects, reference_group="sal")
    assert res.summary["level"].iloc[0] == 5  # the level with the most regions
    assert not {"SPARSE", "HOLE"} & (set(res.edges["region_a"]) | set(res.edges["region_b"]))
    assert res.summary["exact"].iloc[0] and res.summary["n_permutations"].iloc[0] == 70
    capped = compare_networks(counts, subjects, reference_group="sal",
                              params=NetworkParams(max_regions=3))  # fmt: skip
    assert capped.summary["n_edges"].iloc[0] == 3


def test_clear_errors():
    counts, subjects = cohort(n_per_group=4)
    one = subjects.assign(group="sal")
    with pytest.raises(StatsError, match="single group"):
        compare_networks(counts, one, reference_group="sal")
    with pytest.raises(StatsError, match="Reference group"):
        compare_networks(counts, subjects, reference_group="vehicle")
    few = subjects[~subjects["subject"].isin(["ket-0", "ket-1"])]
    with pytest.raises(StatsError, match="at least 3 mice"):
        compare_networks(counts, few, reference_group="sal")
    with pytest.raises(StatsError, match="level 9"):
        compare_networks(counts, subjects, reference_group="sal", params=NetworkParams(level=9))
    with pytest.raises(StatsError, match="Fewer than 2 regions"):
        compare_networks(counts, subjects, reference_group="sal",
                         params=NetworkParams(min_mean_count=1e6))  # fmt: skip
    with pytest.raises(ParameterError, match="method"):
        NetworkParams(method="kendall")
