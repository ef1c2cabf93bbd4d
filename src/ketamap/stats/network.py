"""Inter-regional covariance: correlation networks of regional densities across mice.

Per group, the density of every region (at one hierarchy level) is correlated
with every other region across the group's mice; the difference of two
groups' networks is tested by permuting mice between the groups, edge by edge
(family-wise error from the maximum |Δr| over edges, and Benjamini-Hochberg q)
and globally (mean |Δr| over edges). With a handful of mice per group a
correlation is very uncertain; the permutation test accounts for it exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats as sstats

from ketamap.errors import InputError, StatsError
from ketamap.params import bounds, validate
from ketamap.stats.multitest import benjamini_hochberg

__all__ = [
    "NetworkParams",
    "NetworkResult",
    "density_matrix",
    "correlation_networks",
    "compare_networks",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkParams:
    """Parameters of the inter-regional correlation networks.

    Attributes
    ----------
    enabled : bool
        Compute networks in the stats stage.
    level : int or None
        Hierarchy level of the regions; None picks the level with the most
        regions that pass ``min_mean_count``.
    method : {"spearman", "pearson"}
        Correlation; Pearson is computed on ``log(density + 1)``.
    min_mean_count : float
        A region enters when its mean count is at least this in every group.
    max_regions : int
        At most this many regions (the most abundant) enter the network.
    n_permutations : int
        Relabellings of mice between two groups (all of them when fewer exist).
    alpha : float
        Level at which an edge difference is called (``p_fwe`` or ``q``).
    seed : int
        Seed of the random relabellings.
    """

    enabled: bool = field(default=True, metadata=bounds(doc="compute networks"))
    level: int | None = field(default=None, metadata=bounds(ge=0, doc="hierarchy level"))
    method: str = field(
        default="spearman", metadata=bounds(choices=("spearman", "pearson"), doc="correlation")
    )
    min_mean_count: float = field(default=5.0, metadata=bounds(ge=0, doc="minimum mean count"))
    max_regions: int = field(default=40, metadata=bounds(ge=2, doc="most regions"))
    n_permutations: int = field(default=1000, metadata=bounds(ge=1, doc="relabellings"))
    alpha: float = field(default=0.05, metadata=bounds(gt=0, lt=1, doc="level"))
    seed: int = field(default=0, metadata=bounds(ge=0, doc="seed"))

    def __post_init__(self):
        validate(self)


class NetworkResult(NamedTuple):
    """Tables returned by :func:`compare_networks`."""

    networks: pd.DataFrame
    """``group, region_a, region_b, r, n_subjects`` for every edge of every group."""
    edges: pd.DataFrame
    """``contrast, region_a, region_b, r_ref, r_group, delta_r, p, p_fwe, q`` per edge."""
    summary: pd.DataFrame
    """``contrast, level, n_regions, n_edges, mean_abs_delta_r, p_global,
    n_permutations, exact, n_edges_fwe, n_edges_q`` per contrast."""


def density_matrix(
    counts: pd.DataFrame, *, level: int, min_mean_count: float = 0.0, groups=None
) -> pd.DataFrame:
    """Subjects × regions table of densities at one hierarchy level.

    Parameters
    ----------
    counts : DataFrame
        Long table ``subject, acronym, level, count, volume_mm3`` (and
        optionally ``density_per_mm3``).
    level : int
        Hierarchy level kept.
    min_mean_count : float
        Regions whose mean count is below this in any group are dropped
        (needs ``groups``); regions missing in some mouse are dropped too.
    groups : Series, optional
        Group of each subject, indexed by subject.

    Returns
    -------
    DataFrame
        Index: subject; columns: acronyms, ordered by decreasing mean count.
    """
    c = counts[counts["level"] == level]
    if "density_per_mm3" not in c.columns:
        c = c.assign(density_per_mm3=c["count"] / c["volume_mm3"])
    c = c.assign(subject=c["subject"].astype(str), acronym=c["acronym"].astype(str))
    dens = c.pivot_table(index="subject", columns="acronym", values="density_per_mm3")
    cnt = c.pivot_table(index="subject", columns="acronym", values="count")
    keep = dens.notna().all(axis=0)
    if groups is not None:
        g = groups.astype(str).reindex(cnt.index)
        keep &= cnt.groupby(g).mean().min(axis=0) >= min_mean_count
    order = cnt.loc[:, keep].mean(axis=0).sort_values(ascending=False).index
    return dens.loc[:, list(order)]


def _corr(x: np.ndarray, method: str) -> np.ndarray:
    """Correlation matrices of stacks (..., n_subjects, n_regions); NaN -> 0."""
    if method == "spearman":
        x = sstats.rankdata(x, axis=-2)
    else:
        x = np.log1p(x)
    xc = x - x.mean(axis=-2, keepdims=True)
    norm = np.sqrt((xc**2).sum(axis=-2, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(norm > 0, xc / np.where(norm > 0, norm, 1.0), 0.0)
    r = np.einsum("...ni,...nj->...ij", z, z)
    return np.clip(r, -1.0, 1.0)


def correlation_networks(matrix: pd.DataFrame, groups: pd.Series, *, method: str = "spearman"):
    """Correlation of every pair of regions across the mice of each group.

    Parameters
    ----------
    matrix : DataFrame
        Subjects × regions densities (see :func:`density_matrix`).
    groups : Series
        Group of each subject, indexed by subject.
    method : {"spearman", "pearson"}
        Pearson is computed on ``log(density + 1)``.

    Returns
    -------
    DataFrame
        ``group, region_a, region_b, r, n_subjects``, one row per unordered pair.
    """
    regions = list(matrix.columns)
    iu = np.triu_indices(len(regions), 1)
    g = groups.astype(str).reindex(matrix.index)
    frames = []
    for name in dict.fromkeys(groups.astype(str)):  # groups in the order they are given
        if not (g == name).any():
            continue
        x = matrix[g == name].to_numpy(float)
        r = _corr(x, method) if len(x) >= 3 else np.full((len(regions),) * 2, np.nan)
        frames.append(pd.DataFrame({
            "group": name, "region_a": np.asarray(regions)[iu[0]],
            "region_b": np.asarray(regions)[iu[1]], "r": r[iu], "n_subjects": len(x),
        }))  # fmt: skip
    cols = ["group", "region_a", "region_b", "r", "n_subjects"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _relabellings(n: int, n_ref: int, n_permutations: int, rng) -> tuple[np.ndarray, bool]:
    """Boolean (k, n) membership in the reference group; row 0 is the observed one."""
    observed = np.zeros(n, bool)
    observed[:n_ref] = True
    if math.comb(n, n_ref) <= n_permutations:
        rows = []
        for combo in itertools.combinations(range(n), n_ref):
            m = np.zeros(n, bool)
            m[list(combo)] = True
            rows.append(m)
        out = np.array(rows)
        first = int(np.flatnonzero((out == observed).all(axis=1))[0])
        out[[0, first]] = out[[first, 0]]
        return out, True
    out = np.zeros((n_permutations, n), bool)
    out[0] = observed
    for i in range(1, n_permutations):
        out[i, rng.permutation(n)[:n_ref]] = True
    return out, False


def _delta_stack(x: np.ndarray, members: np.ndarray, method: str, iu) -> np.ndarray:
    """Δr = r_group - r_ref on the upper-triangle edges for each relabelling."""
    idx_ref = np.array([np.flatnonzero(m) for m in members])
    idx_grp = np.array([np.flatnonzero(~m) for m in members])
    r_ref = _corr(x[idx_ref], method)
    r_grp = _corr(x[idx_grp], method)
    return (r_grp - r_ref)[:, iu[0], iu[1]]


def compare_networks(
    counts: pd.DataFrame,
    subjects: pd.DataFrame,
    *,
    reference_group: str,
    params: NetworkParams | None = None,
) -> NetworkResult:
    """Correlation network per group and permutation tests of their differences.

    Parameters
    ----------
    counts : DataFrame
        Long counts table ``subject, acronym, level, count, volume_mm3``.
    subjects : DataFrame
        ``subject, group``.
    reference_group : str
        Each other group's network is compared with this group's.
    params : NetworkParams, optional

    Returns
    -------
    NetworkResult
        ``networks`` (r per group and edge), ``edges`` (per contrast and edge:
        ``r_ref, r_group, delta_r``, permutation ``p``, ``p_fwe`` from the
        maximum |Δr| over edges, BH ``q``) and ``summary`` (per contrast:
        mean |Δr| and its permutation p).

    Raises
    ------
    StatsError
        If there is a single group, the reference group is unknown, a group
        has fewer than 3 mice, or fewer than 2 regions pass the filters.
    InputError
        If a column is missing.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> rows = [(f"{g}{i}", g, f"R{k}", 5, rng.poisson(50), 1.0)
    ...         for g in "ab" for i in range(4) for k in range(5)]
    >>> counts = pd.DataFrame(rows, columns=["subject", "group", "acronym", "level",
    ...                                      "count", "volume_mm3"])
    >>> subjects = counts[["subject", "group"]].drop_duplicates()
    >>> res = compare_networks(counts, subjects, reference_group="a")
    >>> len(res.edges), int(res.summary["n_permutations"].iloc[0])
    (10, 70)
    """
    params = params or NetworkParams()
    for col in ("subject", "acronym", "level", "count", "volume_mm3"):
        if col not in counts.columns:
            raise InputError(f'The counts table has no "{col}" column.')
    for col in ("subject", "group"):
        if col not in subjects.columns:
            raise InputError(f'The subjects table has no "{col}" column.')
    groups = subjects.assign(subject=subjects["subject"].astype(str)).set_index("subject")["group"]
    groups = groups.astype(str)
    names = list(dict.fromkeys(groups))
    if reference_group not in names:
        raise StatsError(f'Reference group "{reference_group}" has no mice in the subjects table.')
    if len(names) < 2:
        raise StatsError("Networks are compared between groups, but the study has a single group.")
    small = [g for g in names if (groups == g).sum() < 3]
    if small:
        raise StatsError(
            f"A correlation network needs at least 3 mice per group; {', '.join(small)} has fewer."
        )
    levels = sorted(int(v) for v in pd.unique(counts["level"]))
    if params.level is not None:
        chosen = params.level
        if chosen not in levels:
            raise StatsError(f"Network level {chosen} is not in the counts (levels {levels}).")
    else:
        sizes = {
            lv: density_matrix(
                counts, level=lv, min_mean_count=params.min_mean_count, groups=groups
            ).shape[1]
            for lv in levels
        }
        chosen = max(levels, key=lambda lv: (min(sizes[lv], params.max_regions), lv))
    matrix = density_matrix(
        counts, level=chosen, min_mean_count=params.min_mean_count, groups=groups
    )
    matrix = matrix.iloc[:, : params.max_regions]
    matrix = matrix[matrix.index.isin(groups.index)]
    if matrix.shape[1] < 2:
        raise StatsError(
            f"Fewer than 2 regions at level {chosen} have a mean count of at least "
            f"{params.min_mean_count:g} in every group; no network can be built."
        )
    regions = np.asarray(matrix.columns)
    iu = np.triu_indices(len(regions), 1)
    networks = correlation_networks(matrix, groups, method=params.method)
    rng = np.random.default_rng(params.seed)
    edge_frames, summary_rows = [], []
    for name in names:
        if name == reference_group:
            continue
        sub = matrix[groups.reindex(matrix.index).isin([reference_group, name])]
        is_ref = (groups.reindex(sub.index) == reference_group).to_numpy()
        x = np.concatenate([sub.to_numpy(float)[is_ref], sub.to_numpy(float)[~is_ref]])
        members, exact = _relabellings(len(x), int(is_ref.sum()), params.n_permutations, rng)
        delta = _delta_stack(x, members, params.method, iu)  # (k, n_edges)
        obs, null = delta[0], (delta if exact else delta[1:])
        absn = np.abs(null)
        tol = 1e-9
        ge_edge = (absn >= np.abs(obs) - tol).sum(axis=0)
        max_null = absn.max(axis=1)
        ge_fwe = (max_null[:, None] >= np.abs(obs)[None, :] - tol).sum(axis=0)
        glob_null = absn.mean(axis=1)
        ge_glob = int((glob_null >= np.abs(obs).mean() - tol).sum())
        if exact:
            p, p_fwe, p_glob = ge_edge / len(null), ge_fwe / len(null), ge_glob / len(null)
        else:
            k = len(null) + 1.0
            p, p_fwe, p_glob = (1 + ge_edge) / k, (1 + ge_fwe) / k, (1 + ge_glob) / k
        n_ref = int(is_ref.sum())  # x holds the reference mice first
        r_ref = _corr(x[:n_ref], params.method)[iu]
        r_grp = _corr(x[n_ref:], params.method)[iu]
        contrast = f"{name}_vs_{reference_group}"
        q = benjamini_hochberg(p)
        edge_frames.append(pd.DataFrame({
            "contrast": contrast, "level": chosen, "region_a": regions[iu[0]],
            "region_b": regions[iu[1]], "r_ref": r_ref, "r_group": r_grp, "delta_r": obs,
            "p": p, "p_fwe": p_fwe, "q": q,
        }))  # fmt: skip
        summary_rows.append({
            "contrast": contrast, "level": chosen, "n_regions": len(regions),
            "n_edges": len(obs), "mean_abs_delta_r": float(np.abs(obs).mean()),
            "p_global": float(p_glob), "n_permutations": len(members), "exact": exact,
            "n_edges_fwe": int((p_fwe < params.alpha).sum()),
            "n_edges_q": int((q < params.alpha).sum()),
        })  # fmt: skip
    edges = pd.concat(edge_frames, ignore_index=True)
    summary = pd.DataFrame(summary_rows)
    logger.info(
        "networks at level %d: %d regions, %d contrasts", chosen, len(regions), len(names) - 1
    )
    return NetworkResult(networks, edges, summary)
