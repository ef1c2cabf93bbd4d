"""Compare continuous per-region densities between groups: fibre length density, voxel fraction.

Per region, an ordinary least-squares model of ``log(density + offset)`` on group
indicators (and covariates), a second one on dose as a number (the dose trend), and
empirical-Bayes moderated variances (limma's ``squeezeVar``, Smyth 2004): every
region's residual variance is shrunk toward a prior estimated from all regions, and
the moderated t statistic has the region's residual df plus the prior df. Counts of
cells are compared by :mod:`ketamap.stats.regions`; see ``docs/statistics.md`` for
both models and the measured calibration.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from ketamap.errors import InputError, StatsError
from ketamap.params import bounds, did_you_mean, validate
from ketamap.stats.multitest import benjamini_hochberg
from ketamap.stats.regions import _covariate_matrix, check_design, fit_f_prior_df

__all__ = [
    "DENSITY_COLUMNS",
    "DensityParams",
    "Squeezed",
    "compare_densities",
    "squeeze_var",
]

logger = logging.getLogger(__name__)

_LN2 = float(np.log(2.0))
_MIN_REGIONS_PRIOR = 10  # fewer regions with residual df: no prior is estimated (ordinary t)
_TABLE_COLUMNS = ("subject", "region_id", "acronym", "level")

DENSITY_COLUMNS = (
    "region_id", "acronym", "level", "contrast", "log2_fold_change", "ci_low_log2",
    "ci_high_log2", "fold_change", "t", "df", "p", "q", "called", "mean_ref", "mean_group",
    "n_ref", "n_group", "dose_unit_mg_per_kg", "log_offset", "residual_var", "posterior_var",
    "method", "reason",
)  # fmt: skip
"""Columns of :func:`compare_densities`'s table (``hemisphere`` follows ``level`` when the
input has one)."""


@dataclass(frozen=True)
class DensityParams:
    """Parameters of the comparison of continuous per-region densities.

    Attributes
    ----------
    alpha : float
        False discovery rate at which a region is called (``called`` is ``q < alpha``).
    log_offset : float or None
        Added to every density before the logarithm, in the density's own units (e.g.
        mm/mm³ for a length density, a fraction for a voxel fraction), the same for
        every region. None (default): per region, ``log_offset_fraction`` times the
        median of the region's positive densities over all mice, so that the test
        does not depend on the region's density level or on the units.
    log_offset_fraction : float
        With ``log_offset=None``, the offset as a fraction of the region's median
        positive density. At 0.01 a fold change between mice with data shrinks by at
        most 1 % on the log scale, and a mouse with a zero sits log2(0.01) = -6.6
        below the region's median.
    min_subjects : int
        A group contrast is tested only when both groups have at least this many mice
        with data for the region; the dose trend only when two or more doses do.
    trend : bool
        Also test the dose trend (contrast ``"dose_trend"``: dose as a number).
    moderate : bool
        Moderate the residual variances by empirical Bayes (limma's ``squeezeVar``);
        False gives each region's ordinary least-squares t test.
    variance_trend : bool
        Let the prior variance follow a smooth trend in the region's mean log density
        (limma's ``trend=TRUE``) instead of one prior variance for all regions.
    dose_trend_unit_mg_per_kg : float or None
        The dose step over which the ``dose_trend`` fold change is reported; None
        (default) means the span from the lowest to the highest dose, so that the trend
        is on the same scale as a group contrast.
    """

    alpha: float = field(default=0.05, metadata=bounds(gt=0, lt=1, doc="FDR level"))
    log_offset: float | None = field(
        default=None,
        metadata=bounds(gt=0, doc="offset added before the log, density units (None: relative)"),
    )
    log_offset_fraction: float = field(
        default=0.01, metadata=bounds(gt=0, le=1, doc="offset / the region's median density")
    )
    min_subjects: int = field(default=2, metadata=bounds(ge=1, doc="minimum mice per group"))
    trend: bool = field(default=True, metadata=bounds(doc="test the dose trend"))
    moderate: bool = field(default=True, metadata=bounds(doc="empirical-Bayes variances"))
    variance_trend: bool = field(
        default=False, metadata=bounds(doc="prior variance trended in mean log density")
    )
    dose_trend_unit_mg_per_kg: float | None = field(
        default=None, metadata=bounds(gt=0, doc="dose step of the dose-trend fold change")
    )

    def __post_init__(self):
        validate(self)


# --------------------------------------------------------------------------- moderation


class Squeezed(NamedTuple):
    """What :func:`squeeze_var` returns (limma's ``var.post``, ``var.prior``, ``df.prior``)."""

    var_post: np.ndarray
    var_prior: np.ndarray
    df_prior: float


def squeeze_var(s2: ArrayLike, df: ArrayLike, covariate: ArrayLike | None = None) -> Squeezed:
    """Shrink variances toward a prior estimated from all of them (limma's ``squeezeVar``).

    The model (Smyth 2004): each true variance is drawn from a scaled inverse chi-square,
    ``1 / sigma² ~ chi²(d0) / (d0 s0²)``, and each estimate ``s2 | sigma² ~ sigma²
    chi²(d) / d``; marginally ``s2 ~ s0² F(d, d0)``. ``d0`` and ``s0²`` are estimated
    by the method of moments on ``log s2``: its mean is ``log s0² + digamma(d/2) -
    log(d/2) - digamma(d0/2) + log(d0/2)`` and its variance ``trigamma(d/2) +
    trigamma(d0/2)``, so ``d0 = 2 trigamma⁻¹(var(e) - mean trigamma(d/2))`` with ``e``
    the log variances less their expected offset
    (:func:`ketamap.stats.regions.fit_f_prior_df`). The posterior variance is
    ``(d0 s0² + d s2) / (d0 + d)``.

    Parameters
    ----------
    s2 : array_like of float
        Variance estimates (>= 0), one per feature (region).
    df : array_like of float
        Their residual degrees of freedom (>= 0); a feature with df 0 gets the prior
        variance and does not enter the estimate.
    covariate : array_like of float, optional
        A trend in ``log s2`` along it (e.g. mean log density) is fitted by a natural
        cubic spline (up to 4 df), giving a prior variance per feature.

    Returns
    -------
    Squeezed
        ``var_post`` and ``var_prior`` per feature, and ``df_prior`` (``inf`` when the
        variances spread no more than their sampling alone explains: then every
        posterior variance is the prior one).

    Raises
    ------
    InputError
        With fewer than two variances with df > 0, a negative or non-finite variance
        or df, arrays of different lengths, or more than half of the variances zero.

    References
    ----------
    Smyth GK (2004). Linear models and empirical Bayes methods for assessing
    differential expression in microarray experiments. Stat Appl Genet Mol Biol 3:3.
    doi:10.2202/1544-6115.1027

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> sigma2 = 0.04 * 8 / rng.chisquare(8, 5000)           # d0 = 8, s0² = 0.04
    >>> s2 = sigma2 * rng.chisquare(6, 5000) / 6              # d = 6
    >>> sq = squeeze_var(s2, np.full(5000, 6.0))
    >>> round(sq.df_prior), round(float(sq.var_prior[0]), 3)
    (8, 0.04)
    """
    s2 = np.asarray(s2, dtype=float).ravel()
    df = np.asarray(df, dtype=float).ravel()
    if s2.shape != df.shape:
        raise InputError("squeeze_var needs one df per variance.")
    if np.any(~np.isfinite(s2) | (s2 < 0)) or np.any(~np.isfinite(df) | (df < 0)):
        raise InputError("squeeze_var needs finite variances >= 0 and finite df >= 0.")
    use = df > 0
    if use.sum() < 2:
        raise InputError("squeeze_var needs at least two variances with df > 0.")
    if np.median(s2[use]) <= 0:
        raise InputError("More than half of the variances are zero, so no prior can be fitted.")
    cov = None if covariate is None else np.asarray(covariate, dtype=float).ravel()
    if cov is not None and (cov.shape != s2.shape or not np.all(np.isfinite(cov))):
        raise InputError("squeeze_var needs one finite covariate value per variance.")
    d0, s0_used = fit_f_prior_df(
        s2[use], df[use], None if cov is None else cov[use], return_scale=True
    )
    s0_used = np.broadcast_to(np.asarray(s0_used, dtype=float), (int(use.sum()),))
    if cov is None:
        var_prior = np.full(s2.shape, float(s0_used[0]))
    else:
        order = np.argsort(cov[use], kind="stable")
        var_prior = np.interp(cov, cov[use][order], s0_used[order])
        var_prior[use] = s0_used
    if np.isinf(d0):
        var_post = var_prior.copy()
    else:
        var_post = (d0 * var_prior + df * s2) / (d0 + df)
    return Squeezed(var_post, var_prior, float(d0))


# --------------------------------------------------------------------------- fitting


class _Fit(NamedTuple):
    beta: np.ndarray  # (R, p) natural-log coefficients; NaN where not identified
    unscaled: np.ndarray  # (R, p) diagonal of (X'X)^-1 on the identified columns
    s2: np.ndarray  # (R,) residual variance; NaN without residual df
    df: np.ndarray  # (R,) residual df


def _ols(X, Y, obs):
    """Least squares of every region's observed mice on ``X``, grouped by missingness pattern.

    Within a region, the columns of ``X`` are taken in order and a column is kept
    when it raises the rank of the design on that region's observed mice; a
    coefficient not kept (a group without data, a covariate those mice do not vary)
    is NaN.
    """
    n_regions, p = Y.shape[0], X.shape[1]
    beta = np.full((n_regions, p), np.nan)
    unscaled = np.full((n_regions, p), np.nan)
    s2 = np.full(n_regions, np.nan)
    df = np.zeros(n_regions)
    patterns, inverse = np.unique(obs, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    for k, rows in enumerate(patterns):
        if not rows.any():
            continue
        regions = np.flatnonzero(inverse == k)
        Xo = X[rows]
        keep: list[int] = []
        for j in range(p):
            if np.linalg.matrix_rank(Xo[:, [*keep, j]]) > len(keep):
                keep.append(j)
        Xk = Xo[:, keep]
        xtx_inv = np.linalg.inv(Xk.T @ Xk)
        Yo = Y[np.ix_(regions, np.flatnonzero(rows))]
        B = Yo @ Xk @ xtx_inv
        resid = Yo - B @ Xk.T
        d = int(rows.sum()) - len(keep)
        beta[np.ix_(regions, keep)] = B
        unscaled[np.ix_(regions, keep)] = np.diag(xtx_inv)[None, :]
        df[regions] = d
        if d > 0:
            s2[regions] = np.sum(resid**2, axis=1) / d
    return _Fit(beta, unscaled, s2, df)


class _Variances(NamedTuple):
    post: np.ndarray  # (R,) variance used by the tests
    df: np.ndarray  # (R,) df of the tests
    prior_df: float | dict  # per hierarchy level in _variances_by_level
    prior_var: float | dict  # median over regions
    method: str | np.ndarray  # per region in _variances_by_level


def _variances_by_level(fit, informative, params, covariate, model, levels):
    """:func:`_variances` within each hierarchy level (regions of one level are alike).

    A parent region pools its children, so its density varies less between mice than
    theirs: one prior for every level would take the parents' small variances for the
    leaves (and call leaf differences that are chance). Each level gets its own prior.
    """
    post = np.full(fit.s2.shape, np.nan)
    df = np.zeros(fit.s2.shape)
    method = np.full(fit.s2.shape, "t", dtype=object)
    prior_df, prior_var = {}, {}
    for level in np.unique(levels):
        at = levels == level
        part = _Fit(fit.beta[at], fit.unscaled[at], fit.s2[at], fit.df[at])
        var = _variances(part, informative[at], params, covariate[at], f"{model} (level {level})")
        post[at], df[at], method[at] = var.post, var.df, var.method
        prior_df[int(level)], prior_var[int(level)] = var.prior_df, var.prior_var
    return _Variances(post, df, prior_df, prior_var, method)


def _variances(fit, informative, params, covariate, model):
    """Moderated (or ordinary) variances and test df of one model's fit (``model`` names it)."""
    use = informative & (fit.df > 0) & np.isfinite(fit.s2)
    has_df = (fit.df > 0) & np.isfinite(fit.s2)
    enough = use.sum() >= _MIN_REGIONS_PRIOR and np.median(fit.s2[use]) > 0
    if params.moderate and enough:
        sq = squeeze_var(
            fit.s2[use], fit.df[use], covariate[use] if params.variance_trend else None
        )
        d0 = sq.df_prior
        if params.variance_trend:
            order = np.argsort(covariate[use], kind="stable")
            prior = np.interp(covariate, covariate[use][order], sq.var_prior[order])
        else:
            prior = np.full(fit.s2.shape, float(sq.var_prior[0]))
        s2 = np.where(has_df, fit.s2, 0.0)
        if np.isinf(d0):
            post = prior
        else:
            post = np.where(has_df, (d0 * prior + fit.df * s2) / (d0 + fit.df), prior)
        df = np.minimum(fit.df + d0, float(np.sum(fit.df[use])))  # limma's cap
        logger.info("%s model: prior df %.3g, prior variance %.3g (log scale).", model, d0,
                    np.median(prior))  # fmt: skip
        return _Variances(post, df, float(d0), float(np.median(prior)), "moderated-t")
    if params.moderate:
        logger.warning(
            "%s model: only %d regions with residual df and a density above zero (fewer than "
            "%d), so variances are not moderated (ordinary t).",
            model,
            int(use.sum()),
            _MIN_REGIONS_PRIOR,
        )
    return _Variances(fit.s2.copy(), fit.df.astype(float), 0.0, float("nan"), "t")


# --------------------------------------------------------------------------- inputs


def _check_inputs(table, subjects, reference_group, value, covariates, trend):
    missing = [c for c in (*_TABLE_COLUMNS, value) if c not in table.columns]
    if missing:
        near = did_you_mean(missing[0], table.columns)
        raise InputError(f"The density table lacks column(s) {', '.join(missing)}{near}.")
    if table.empty:
        raise InputError("The density table has no rows.")
    check_design(subjects, reference_group, covariates, need_dose=trend)
    unknown = sorted(set(table["subject"].astype(str)) - set(subjects["subject"].astype(str)))
    if unknown:
        raise InputError(
            f"Subject(s) {', '.join(unknown[:5])} in the density table are not in subjects."
        )
    key = ["subject", "region_id", *(["hemisphere"] if "hemisphere" in table.columns else [])]
    if table.duplicated(key).any():
        raise InputError(f"The density table has more than one row for some ({', '.join(key)}).")
    if not pd.api.types.is_numeric_dtype(table[value]) or pd.api.types.is_bool_dtype(table[value]):
        raise InputError(f'Column "{value}" of the density table must hold numbers.')
    v = table[value].to_numpy(dtype=float)
    bad = np.isinf(v) | (v < 0)
    if bad.any():
        raise InputError(
            f'Densities in "{value}" must be finite and >= 0 (NaN means missing); '
            f"{int(bad.sum())} row(s) are not."
        )


def _wide(table, subject_ids, value, hemi):
    """Region metadata and the (regions, subjects) values, NaN where missing."""
    t = table.assign(subject=table["subject"].astype(str))
    index = ["region_id", *(["hemisphere"] if hemi else [])]
    meta = t.groupby(index, sort=True)[["acronym", "level"]].first().reset_index()
    wide = t.pivot_table(index=index, columns="subject", values=value, aggfunc="first",
                         dropna=False)  # fmt: skip
    keys = pd.MultiIndex.from_frame(meta[index]) if hemi else pd.Index(meta["region_id"])
    wide = wide.reindex(index=keys, columns=subject_ids)
    return meta, wide.to_numpy(dtype=float)


def _offsets(V, params):
    """Per-region log offset: ``params.log_offset`` or a fraction of the median positive value."""
    if params.log_offset is not None:
        return np.full(V.shape[0], float(params.log_offset))
    pos = np.where(V > 0, V, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no positive value
        med = np.nanmedian(pos, axis=1)
    return np.where(np.isfinite(med), params.log_offset_fraction * med, 1.0)


# --------------------------------------------------------------------------- main


def compare_densities(
    table: pd.DataFrame,
    subjects: pd.DataFrame,
    *,
    reference_group: str,
    value: str = "length_density_mm_per_mm3",
    covariates: tuple[str, ...] = (),
    params: DensityParams | None = None,
) -> pd.DataFrame:
    """Compare a continuous, non-negative density between groups in every region.

    Per region, ``log(density + offset) = b0 + sum_g b_g [group == g] + covariates +
    error``, fitted by least squares on the mice with data; each non-reference group
    gives the contrast ``"{group}_vs_{reference}"`` with ``log2_fold_change = b_g /
    ln 2``. A second model with dose as a number (scaled to
    ``dose_trend_unit_mg_per_kg``) gives ``"dose_trend"``. The residual variances of
    each model are moderated across regions by empirical Bayes (:func:`squeeze_var`)
    and each coefficient is tested by a moderated t with the region's residual df plus
    the prior df (limma's ``eBayes``). Benjamini-Hochberg ``q`` within each contrast
    and hierarchy level.

    Parameters
    ----------
    table : DataFrame
        One row per (subject, region): ``subject``, ``region_id``, ``acronym``,
        ``level`` and the column ``value`` (>= 0; NaN or a missing row is missing
        data, not zero); e.g. the per-mouse tables of
        :func:`ketamap.wholebrain.fibres.fibre_length_table` stacked with a
        ``subject`` column. With a ``hemisphere`` column, each (region, hemisphere)
        is tested on its own.
    subjects : DataFrame
        ``subject``, ``group``, ``dose_mg_per_kg`` (needed for the dose trend) and any
        covariate columns.
    reference_group : str
        The group every other group is compared with.
    value : str
        The density column, e.g. ``"length_density_mm_per_mm3"``, ``"voxel_fraction"``
        or a side's ``"length_density_left_mm_per_mm3"``.
    covariates : tuple of str
        Subject columns added to both models; text/bool columns are categorical
        (first level as reference), numbers are standardised.
    params : DensityParams, optional
        Model and testing parameters (default ``DensityParams()``).

    Returns
    -------
    DataFrame
        One row per (region, contrast) with the columns of :data:`DENSITY_COLUMNS`,
        sorted by contrast, level and p: the log2 fold change and its 95 % interval,
        ``t`` and its ``df``, ``p``, ``q``, ``called`` (``q < alpha``), the mean
        density and number of mice with data of both sides (the lowest and highest
        dose for the trend), the offset, the residual and posterior variances (natural
        log scale), ``method`` (``"moderated-t"`` or ``"t"``) and ``reason``: why a row
        is untested (its ``p`` is NaN) or a note on zeros. ``attrs`` holds ``value``,
        ``prior_df`` and ``prior_var`` (per model, ``"groups"`` and ``"dose_trend"``, and per
        hierarchy level: each level's variances are moderated on their own).

    Raises
    ------
    InputError
        For missing columns, negative or infinite densities, duplicate rows or
        subjects absent from ``subjects``.
    StatsError
        For a single group, an unknown reference group or covariates confounded
        with group.

    Notes
    -----
    A region where every mouse has density zero has ``log2_fold_change`` 0 and ``p``
    1. Where both compared groups have only zeros the same holds; where one of them
    does, the fold change is bounded by the offset (``reason`` says so). A group
    without data in a region gives NaN and a reason. With fewer than 10 regions with
    residual df no prior is estimated and the test is each region's ordinary t.

    References
    ----------
    Smyth GK (2004). Stat Appl Genet Mol Biol 3:3. doi:10.2202/1544-6115.1027

    Examples
    --------
    >>> subjects = pd.DataFrame({"subject": list("abcdef"), "group": ["s"] * 3 + ["k"] * 3,
    ...                          "dose_mg_per_kg": [0.0] * 3 + [30.0] * 3})
    >>> table = pd.DataFrame({"subject": list("abcdef"), "region_id": 1, "acronym": "CP",
    ...                       "level": 5, "voxel_fraction": [0.10, 0.11, 0.09, 0.2, 0.21, 0.19]})
    >>> res = compare_densities(table, subjects, reference_group="s", value="voxel_fraction")
    >>> res.loc[res.contrast == "k_vs_s", "fold_change"].round(2).tolist()
    [1.99]
    """
    params = DensityParams() if params is None else params
    covariates = tuple(covariates)
    _check_inputs(table, subjects, reference_group, value, covariates, params.trend)
    hemi = "hemisphere" in table.columns
    sub = subjects.assign(subject=subjects["subject"].astype(str),
                          group=subjects["group"].astype(str))  # fmt: skip
    absent = sorted(set(sub["subject"]) - set(table["subject"].astype(str)))
    if absent:
        logger.warning("Subjects without any densities (treated as missing): %s", ", ".join(absent))
    has_dose = "dose_mg_per_kg" in sub.columns and not sub["dose_mg_per_kg"].isna().any()
    order_key = sub.groupby("group")["dose_mg_per_kg"].mean() if has_dose else None
    others = sorted(
        (g for g in pd.unique(sub["group"]) if g != reference_group),
        key=lambda g: (order_key[g], g) if order_key is not None else (0.0, g),
    )
    group = sub["group"].to_numpy()
    cov = _covariate_matrix(sub, covariates)
    n = len(sub)
    Xg = np.column_stack([np.ones(n)] + [(group == g).astype(float) for g in others] + [cov])
    if np.linalg.matrix_rank(Xg) < Xg.shape[1]:
        raise StatsError("The covariates are confounded with group, so the model cannot be fitted.")

    meta, V = _wide(table, sub["subject"].tolist(), value, hemi)
    obs = ~np.isnan(V)
    n_regions = len(meta)
    no_data = ~obs.any(axis=1)
    all_zero = obs.any(axis=1) & (np.nansum(np.where(obs, V, 0.0), axis=1) == 0)
    offset = _offsets(V, params)
    Y = np.log(np.where(obs, V, 0.0) + offset[:, None])
    with np.errstate(all="ignore"):
        mean_log = np.where(no_data, np.nan, np.sum(np.where(obs, Y, 0), 1) / obs.sum(1))
    informative = ~no_data & ~all_zero
    covariate = np.where(np.isfinite(mean_log), mean_log, 0.0)

    base = meta.copy()
    base["log_offset"] = offset
    k = params.min_subjects
    n_obs = lambda m: obs[:, m].sum(axis=1)  # noqa: E731
    only_zero = lambda m: (n_obs(m) > 0) & (np.nansum(np.where(obs & m, V, 0), 1) == 0)  # noqa: E731
    tables = []
    attrs = {"value": value, "prior_df": {}, "prior_var": {}}

    fit = _ols(Xg, Y, obs)
    levels = meta["level"].to_numpy()
    var = _variances_by_level(fit, informative, params, covariate, "group", levels)
    attrs["prior_df"]["groups"], attrs["prior_var"]["groups"] = var.prior_df, var.prior_var
    ref = group == reference_group
    for j, g in enumerate(others, start=1):
        gm = group == g
        why = np.full(n_regions, "", dtype=object)
        low = np.minimum(n_obs(ref), n_obs(gm)) < k
        why[low] = f"fewer than {k} subjects with data in '{reference_group}' or '{g}'"
        none = [(name, n_obs(m) == 0) for name, m in ((reference_group, ref), (g, gm))]
        for r in np.flatnonzero(np.isnan(fit.beta[:, j]) & ~no_data):
            empty = [f"'{name}'" for name, flag in none if flag[r]]
            why[r] = (f"no subject with data in {' or '.join(empty)}: no fold change" if empty
                      else "not estimable from the subjects with data")  # fmt: skip
        why[no_data] = "no subject with data"
        zeros = only_zero(ref).astype(int) + only_zero(gm).astype(int)
        notes = np.select(
            [all_zero, zeros == 2, zeros == 1],
            ["zero in every subject: no change", "both groups have only zeros: no change",
             "a group has only zeros: fold change bounded by the log offset"], "",
        )  # fmt: skip
        tab = _contrast(base, f"{g}_vs_{reference_group}", fit, var, j, 1.0, why, notes,
                        all_zero | (zeros == 2), all_zero)  # fmt: skip
        tables.append(_describe(tab, V, obs, ref, gm))

    dose_ok = False
    if params.trend and has_dose:
        dose = sub["dose_mg_per_kg"].to_numpy(dtype=float)
        span = float(dose.max() - dose.min())
        Xd = np.column_stack([np.ones(n), dose / (span or 1.0), cov])
        dose_ok = span > 0 and np.linalg.matrix_rank(Xd) == Xd.shape[1]
        if not dose_ok:
            logger.info("No dose trend: doses do not vary independently of the covariates.")
    if dose_ok:
        unit = params.dose_trend_unit_mg_per_kg or span
        fit_d = _ols(Xd, Y, obs)
        var_d = _variances_by_level(fit_d, informative, params, covariate, "dose-trend", levels)
        attrs["prior_df"]["dose_trend"] = var_d.prior_df
        attrs["prior_var"]["dose_trend"] = var_d.prior_var
        n_dose = sum((n_obs(dose == u) >= k).astype(int) for u in np.unique(dose))
        why = np.where(n_dose < 2, f"fewer than two doses with {k}+ subjects", "").astype(object)
        why[np.isnan(fit_d.beta[:, 1]) & ~no_data & (why == "")] = (
            "not estimable from the subjects with data"
        )
        why[no_data] = "no subject with data"
        notes = np.where(all_zero, "zero in every subject: no change", "").astype(object)
        tab = _contrast(base, "dose_trend", fit_d, var_d, 1, unit / span, why, notes, all_zero,
                        all_zero)  # fmt: skip
        lo, hi = dose == dose.min(), dose == dose.max()
        tables.append(_describe(tab, V, obs, lo, hi).assign(dose_unit_mg_per_kg=float(unit)))

    out = pd.concat(tables, ignore_index=True)
    out["q"] = out.groupby(["contrast", "level"], sort=False)["p"].transform(
        lambda s: pd.Series(benjamini_hochberg(s.to_numpy()), index=s.index)
    )
    out["called"] = (out["q"] < params.alpha).to_numpy()
    sort = ["contrast", "level", "p", "region_id", *(["hemisphere"] if hemi else [])]
    out = out.sort_values(sort, na_position="last").reset_index(drop=True)
    columns = list(DENSITY_COLUMNS)
    if hemi:
        columns.insert(columns.index("level") + 1, "hemisphere")
    out = out[columns].astype({"n_ref": np.int64, "n_group": np.int64, "called": bool})
    out.attrs.update(attrs)
    logger.info("Compared %s over %d regions and %d contrasts.", value, n_regions, len(tables))
    return out


def _contrast(base, contrast, fit, var, j, scale, why, notes, no_change, no_interval):
    """One contrast's model columns: coefficient ``j`` (times ``scale``) of every region.

    ``no_change``: regions whose coefficient is exactly zero by construction (only
    zeros on both sides), given t 0 and p 1; ``no_interval``: regions without an
    interval (zero in every mouse: the scale of the log is the offset's alone).
    """
    est = fit.beta[:, j] * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(var.post * fit.unscaled[:, j]) * scale
        t = est / se
        crit = stats.t.ppf(0.975, var.df)
        p = 2.0 * stats.t.sf(np.abs(t), var.df)
    est = np.where(no_change & np.isfinite(est), 0.0, est)
    t = np.where(no_change & np.isfinite(est), 0.0, t)
    p = np.where(no_change & np.isfinite(est), 1.0, p)
    p = np.where((se == 0) & (est == 0), 1.0, p)  # no variation anywhere: nothing differs
    t = np.where((se == 0) & (est == 0), 0.0, t)
    ci = np.where(np.isfinite(crit * se) & ~no_interval, crit * se, np.nan)
    why = np.where(np.isnan(p) & (why == ""), "no residual degrees of freedom", why)
    p = np.where(why == "", p, np.nan)
    lfc, half = est / _LN2, ci / _LN2
    return base.assign(
        contrast=contrast,
        log2_fold_change=lfc,
        ci_low_log2=lfc - half,
        ci_high_log2=lfc + half,
        fold_change=np.exp2(lfc),
        t=t,
        df=var.df,
        p=p,
        q=np.nan,
        dose_unit_mg_per_kg=np.nan,
        residual_var=fit.s2,
        posterior_var=var.post,
        method=var.method,
        reason=np.where(why != "", why, notes).astype(object),
    )


def _describe(tab, V, obs, a, b):
    """Add the mean density and the number of mice with data of sides ``a`` and ``b``."""

    def side(m):
        n = obs[:, m].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, np.sum(np.where(obs & m, V, 0.0), 1) / n, np.nan)
        return mean, n

    (m0, n0), (m1, n1) = side(a), side(b)
    return tab.assign(mean_ref=m0, mean_group=m1, n_ref=n0, n_group=n1)
