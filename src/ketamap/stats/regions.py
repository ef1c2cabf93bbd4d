"""Compare cell densities between groups, region by region.

Negative-binomial GLMs with a log-volume offset, a dispersion trend in
abundance across regions and, by default, edgeR-style quasi-likelihood F
tests whose prior degrees of freedom are estimated by empirical Bayes. All
regions are fitted at once by a vectorised, penalised IRLS on one numpy design
matrix. See ``docs/statistics.md`` for the model and the
measured calibration.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import special, stats

from ketamap.errors import InputError, StatsError
from ketamap.params import bounds, did_you_mean, validate
from ketamap.stats.multitest import benjamini_hochberg

__all__ = [
    "StatsParams",
    "compare_regions",
    "fit_f_prior_df",
    "OUTPUT_COLUMNS",
]

logger = logging.getLogger(__name__)

_LN2 = float(np.log(2.0))
_ETA_MAX = 30.0  # exp(30) ~ 1e13 cells: a bound that only stops overflow
_ZERO_FIT_COUNT = 1e-6  # cells per mouse: a design cell without cells is fitted at ~zero
_LR_RESOLUTION = 1e-10  # relative: an LR statistic this small is rounding, not a difference
_DISP_GRID = np.exp(np.linspace(np.log(1e-5), np.log(10.0), 41))
_COUNT_COLUMNS = ("subject", "region_id", "acronym", "level", "count", "volume_mm3")

OUTPUT_COLUMNS = (
    "region_id", "acronym", "level", "contrast", "log2_fold_change", "ci_low_log2",
    "ci_high_log2", "fold_change", "p", "q", "mean_density_ref_per_mm3",
    "mean_density_group_per_mm3", "n_ref", "n_group", "welch_p", "mannwhitney_p",
    "spearman_p", "dose_unit_mg_per_kg", "dispersion", "method", "converged", "reason",
)  # fmt: skip


@dataclass(frozen=True)
class StatsParams:
    """Parameters of the region-level comparison.

    Attributes
    ----------
    alpha : float
        False discovery rate at which a region is called (``q < alpha``).
    fdr_family : {"contrast_level", "contrast", "all"}
        Which p-values are adjusted together by Benjamini-Hochberg:
        ``"contrast_level"`` adjusts within each (contrast, hierarchy level),
        ``"contrast"`` within each contrast across levels, ``"all"`` once.
    test : {"ql-f", "lr-f", "lr", "wald"}
        ``"ql-f"`` (default): quasi-likelihood F test (edgeR's QL F test,
        Lund et al. 2012): the likelihood-ratio statistic at the trended
        dispersion divided by the region's squeezed quasi-likelihood
        dispersion, referred to F(1, df + prior df). ``"lr-f"``:
        likelihood-ratio statistic at the region's shrunk dispersion referred
        to an F distribution whose denominator df accounts for the uncertainty
        of that dispersion (Satterthwaite); ``"lr"``: the same statistic
        referred to chi-square(1); ``"wald"``: Wald z-test.
    poisson_bound : bool
        With ``test="ql-f"``: a region whose squeezed quasi-likelihood
        dispersion makes some mouse's variance smaller than Poisson
        (``s2_post * (1 + dispersion * mu) < 1``) gets a p-value no smaller
        than that of the likelihood-ratio test with Poisson variance (edgeR's
        ``glmQLFTest(poisson.bound=TRUE)``, the default of the quasi-likelihood
        method followed here).
    min_total_count : int
        Regions whose total count over all mice is below this are not tested
        (``p`` is NaN, ``reason`` says why). All-zero regions are never tested.
    min_subjects_per_group : int
        A contrast is tested only if both groups have at least this many mice
        with data for the region.
    dispersion_prior_df : float or None
        Weight of the across-region trend when shrinking each region's
        (quasi-likelihood) dispersion, in residual degrees of freedom (edgeR's
        ``prior.df``), also added to the denominator df of the F tests. None
        (default) estimates it from the data by empirical Bayes: a scaled F
        distribution is fitted to the regions' quasi-likelihood dispersions
        around their abundance trend (limma's ``squeezeVar``, Smyth 2004), as
        edgeR's ``estimateDisp`` does. The estimate is capped at the residual
        df of the regions that form the trend (the trend cannot be surer than
        its data); with fewer than 20 regions with residual df it falls back
        to 10 (edgeR's fixed default). A number fixes it; 0 uses each
        region's own estimate.
    dispersion_trend_span : float
        Fraction of regions, ranked by abundance, averaged to form the trend.
    dose_trend_unit_mg_per_kg : float or None
        The dose step over which the ``dose_trend`` fold change is reported.
        None (default) means the span from the lowest to the highest dose in
        the study, so that the trend is on the same scale as a group contrast.
    coef_prior_sd_log2 : float
        Standard deviation (in log2 fold change) of a weak normal prior on
        every coefficient but the intercept in the fits of regions where every
        group has cells (and in the dispersion fits); negligible there.
    prior_count : float
        In a region where a group (a design cell) has only zeros, cells added
        to every mouse's count in proportion to its region volume
        (``prior_count * volume / mean volume of the region``) before the fold
        change and its interval are estimated (edgeR's ``prior.count``): the
        fold change of a group with only zeros stays finite, and two groups
        with only zeros differ by exactly nothing. The p-values do not use it.
    max_iter : int
        Maximum IRLS iterations per fit.
    untested_regions : tuple of str
        Acronyms whose whole subtrees are not tested for cell density by the census
        (default: Allen's ``fiber tracts`` and ``VS``, the ventricles: white matter and
        cerebrospinal fluid hold no somata of interest, and their few cells, often
        misregistered from the neighbouring grey matter, only add noisy tests).
        Acronyms absent from the atlas are ignored; ``[]`` tests every region.
    """

    alpha: float = field(default=0.05, metadata=bounds(gt=0, lt=1, doc="FDR level"))
    fdr_family: str = field(
        default="contrast_level",
        metadata=bounds(choices=("contrast_level", "contrast", "all"), doc="BH family"),
    )
    test: str = field(
        default="ql-f", metadata=bounds(choices=("ql-f", "lr-f", "lr", "wald"), doc="test")
    )
    poisson_bound: bool = field(
        default=True, metadata=bounds(doc="QL F p-values no smaller than Poisson's")
    )
    min_total_count: int = field(default=0, metadata=bounds(ge=0, doc="minimum total count"))
    min_subjects_per_group: int = field(default=2, metadata=bounds(ge=1, doc="minimum mice"))
    dispersion_prior_df: float | None = field(
        default=None, metadata=bounds(ge=0, doc="prior df of the dispersion (None: estimate)")
    )
    dispersion_trend_span: float = field(default=0.3, metadata=bounds(gt=0, le=1, doc="span"))
    dose_trend_unit_mg_per_kg: float | None = field(
        default=None, metadata=bounds(gt=0, doc="dose step of the dose-trend fold change")
    )
    coef_prior_sd_log2: float = field(default=10.0, metadata=bounds(gt=0, doc="prior sd"))
    prior_count: float = field(
        default=0.125, metadata=bounds(gt=0, doc="cells per mouse added where a group has none")
    )
    max_iter: int = field(default=100, metadata=bounds(ge=1, doc="IRLS iterations"))
    untested_regions: tuple[str, ...] = field(
        default=("fiber tracts", "VS"),
        metadata=bounds(doc="acronyms whose subtrees are not tested (white matter, ventricles)"),
    )

    def __post_init__(self):
        validate(self)


# --------------------------------------------------------------------------- fitting


def _fit_nb(X, Y, Off, W0, disp, lam, beta0, max_iter):
    """Penalised IRLS for negative-binomial GLMs with fixed dispersions, all regions at once.

    ``X`` is (n, p); ``Y``, ``Off``, ``W0`` (counts, offsets, 1/0 observed) are
    (R, n); ``disp`` is (R,); ``lam`` the ridge precision per coefficient, (p,)
    or per region (R, p). Returns beta (R, p), mu (R, n), the penalised
    information (R, p, p) and a converged flag (R,).
    """
    beta = beta0.copy()
    pen = np.asarray(lam, dtype=float)[..., :, None] * np.eye(X.shape[1])
    converged = np.zeros(Y.shape[0], dtype=bool)
    d = disp[:, None]
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        for _ in range(max_iter):
            eta = np.clip(beta @ X.T + Off, -_ETA_MAX, _ETA_MAX)
            mu = np.exp(eta)
            w = W0 * mu / (1.0 + d * mu)
            wz = w * (eta - Off) + W0 * (Y - mu) / (1.0 + d * mu)
            info = np.einsum("ni,rn,nj->rij", X, w, X) + pen
            new = np.linalg.solve(info, np.einsum("ni,rn->ri", X, wz)[..., None])[..., 0]
            step = np.max(np.abs(new - beta), axis=1)
            beta = np.where(np.isfinite(new), new, beta)
            converged = step < 1e-7
            if converged.all():
                break
        eta = np.clip(beta @ X.T + Off, -_ETA_MAX, _ETA_MAX)
        mu = np.exp(eta)
        info = np.einsum("ni,rn,nj->rij", X, W0 * mu / (1.0 + d * mu), X) + pen
    return beta, mu, info, converged


def _fit_glm(X, Y, Off, W0, disp, max_iter):
    """Unpenalised fit of every region; coefficients its mice with data do not identify stay 0."""
    lam = np.where(_identifiable(X, W0), 0.0, 1.0)
    return _fit_nb(X, Y, Off, W0, disp, lam, _start(X, Y, Off, W0), max_iter)


def _nb_loglik(Y, mu, disp, W0):
    """Negative-binomial (NB2) log-likelihood per region, observed entries only."""
    r = 1.0 / disp[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = (
            special.gammaln(Y + r) - special.gammaln(r) - special.gammaln(Y + 1.0)
            - r * np.log1p(mu / r) + Y * (np.log(mu) - np.log(mu + r))
        )  # fmt: skip
    return np.sum(np.where(W0 > 0, ll, 0.0), axis=1)


def _start(X, Y, Off, W0):
    """Return starting coefficients: intercept at the log pooled density, others zero."""
    beta = np.zeros((Y.shape[0], X.shape[1]))
    beta[:, 0] = np.log(np.maximum(np.sum(Y * W0, axis=1), 0.5) / np.sum(np.exp(Off) * W0, axis=1))
    return beta


def _identifiable(X, W0):
    """Which coefficients the mice with data identify, per region: (R, p) bool.

    The columns of ``X`` are taken in order and a column is kept when it
    raises the rank of the design restricted to the region's observed mice. A
    coefficient that is not kept (a group without any mouse with data, or a
    covariate that those mice do not vary) cannot be estimated.
    """
    pattern, inverse = np.unique(W0 > 0, axis=0, return_inverse=True)
    keep = np.zeros((len(pattern), X.shape[1]), dtype=bool)
    for k, rows in enumerate(pattern):
        rank = 0
        if not rows.any():
            continue
        for j in range(X.shape[1]):
            cols = np.append(np.flatnonzero(keep[k]), j)
            if np.linalg.matrix_rank(X[rows][:, cols]) > rank:
                keep[k, j], rank = True, rank + 1
    return keep[inverse.ravel()]


def _empty_cell(X, Y, W0):
    """Regions in which a design cell (mice with identical rows of ``X``) with data has no cells."""
    _, cell = np.unique(X, axis=0, return_inverse=True)
    cell = cell.ravel()
    total = np.zeros((Y.shape[0], cell.max() + 1))
    n_obs = np.zeros_like(total)
    np.add.at(total.T, cell, (Y * W0).T)
    np.add.at(n_obs.T, cell, W0.T)
    return np.any((n_obs > 0) & (total == 0), axis=1)


def _poisson_loglik(Y, mu, W0):
    """Poisson log-likelihood per region, observed entries only."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = special.xlogy(Y, mu) - mu - special.gammaln(Y + 1.0)
    return np.sum(np.where(W0 > 0, ll, 0.0), axis=1)


def _nb_deviance(Y, mu, disp, W0):
    """Negative-binomial residual deviance per region, observed entries only."""
    r = 1.0 / disp[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = 2.0 * (special.xlogy(Y, Y / mu) - (Y + r) * np.log((Y + r) / (mu + r)))
    return np.sum(np.where(W0 > 0, np.maximum(dev, 0.0), 0.0), axis=1)


def _grid_max(curves):
    """Log-dispersion at the maximum of each curve on the grid, refined by a parabola."""
    k = np.argmax(curves, axis=1)
    logd = np.log(_DISP_GRID)
    step = logd[1] - logd[0]
    inner = (k > 0) & (k < _DISP_GRID.size - 1)
    kk = np.clip(k, 1, _DISP_GRID.size - 2)
    rows = np.arange(curves.shape[0])
    y0, y1, y2 = curves[rows, kk - 1], curves[rows, kk], curves[rows, kk + 1]
    curv = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(curv < 0, 0.5 * (y0 - y2) / curv, 0.0)
    return logd[k] + np.where(inner, np.clip(offset, -0.5, 0.5) * step, 0.0)


def _trigamma_inverse(x):
    """Solve ``trigamma(y) = x`` for y > 0 by Newton's method (as limma does)."""
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = special.polygamma(1, y)
        dif = tri * (1.0 - tri / x) / special.polygamma(2, y)
        y += dif
        if -dif / y < 1e-8:
            break
    return float(y)


def _spline_basis(x, n_df):
    """Natural cubic spline basis with ``n_df`` columns (intercept included) in ``x``."""
    x = (x - x.min()) / max(np.ptp(x), 1e-12)
    cols = [np.ones_like(x)]
    if n_df >= 2:
        cols.append(x)
    if n_df >= 3:
        knots = np.quantile(x, np.linspace(0.0, 1.0, n_df))

        def d(k):
            return (np.maximum(x - knots[k], 0) ** 3 - np.maximum(x - knots[-1], 0) ** 3) / max(
                knots[-1] - knots[k], 1e-12
            )

        cols += [d(k) - d(n_df - 2) for k in range(n_df - 2)]
    return np.column_stack(cols)


def fit_f_prior_df(
    s2: ArrayLike, df: ArrayLike, covariate: ArrayLike | None = None, *, return_scale: bool = False
):
    """Prior degrees of freedom of variances by empirical Bayes (limma's ``fitFDist``).

    Assumes ``s2 ~ s0^2 * F(df, d0)``, with ``s0^2`` a smooth function of
    ``covariate``, and estimates ``d0`` by moments of ``log s2`` (Smyth 2004).

    Parameters
    ----------
    s2 : array_like of float
        Variance estimates (>= 0), one per feature.
    df : array_like of float
        Their residual degrees of freedom (> 0).
    covariate : array_like of float, optional
        A trend in ``log s2`` along it (e.g. abundance) is removed first, by a
        natural cubic spline with up to 4 df.
    return_scale : bool
        Also return the prior scale ``s0^2`` of every feature.

    Returns
    -------
    float
        ``d0``; ``inf`` when the spread of ``log s2`` is no larger than the
        sampling spread expected at ``df`` alone.
    ndarray
        ``s0^2`` per feature, only with ``return_scale=True``.

    Raises
    ------
    InputError
        With fewer than two variances, a negative or NaN variance, or df <= 0.

    References
    ----------
    Smyth GK (2004). Stat Appl Genet Mol Biol 3:3. doi:10.2202/1544-6115.1027

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> s2 = rng.chisquare(9, 2000) / 9 * 8 / rng.chisquare(8, 2000)  # F(9, 8)
    >>> round(fit_f_prior_df(s2, np.full(2000, 9.0)))
    8
    """
    s2 = np.asarray(s2, dtype=float)
    df = np.asarray(df, dtype=float)
    if s2.size < 2 or s2.shape != df.shape or np.any(df <= 0) or np.any(~(s2 >= 0)):
        raise InputError("fit_f_prior_df needs two or more variances >= 0, each with df > 0.")
    med = np.median(s2)
    z = np.log(np.maximum(s2, 1e-5 * med))
    e = z - special.digamma(df / 2) + np.log(df / 2)
    n = s2.size
    n_df = 1 + int(n >= 3) + int(n >= 6) + int(n >= 30)
    if covariate is not None:
        n_df = min(n_df, np.unique(np.asarray(covariate)).size)
        basis = _spline_basis(np.asarray(covariate, dtype=float), n_df)
    else:
        n_df, basis = 1, np.ones((n, 1))
    coef = np.linalg.lstsq(basis, e, rcond=None)[0]
    emean = basis @ coef
    resid = e - emean
    evar = float(np.sum(resid**2) / (n - n_df) - np.mean(special.polygamma(1, df / 2)))
    d0 = 2.0 * _trigamma_inverse(evar) if evar > 0 else np.inf
    if return_scale:
        s0sq = np.exp(emean + (special.digamma(d0 / 2) - np.log(d0 / 2) if np.isfinite(d0) else 0))
        return d0, s0sq
    return d0


def _residual_df(X, Y, W0, cell, rank=None):
    """Residual df per region, less the observations that are fitted as zero.

    An observation whose whole design cell (mice with identical rows of the
    design) has zero counts is fitted at (nearly) zero and carries no
    information on the dispersion; such observations are dropped and the df
    recomputed on the rest (as edgeR's ``.residDF``). ``rank``: the number of
    coefficients the observed mice identify, per region (default: all of them).
    """
    df = W0.sum(axis=1) - (X.shape[1] if rank is None else rank)
    observed_sum = np.zeros((Y.shape[0], cell.max() + 1))
    np.add.at(observed_sum.T, cell, (Y * W0).T)
    zero_fit = (observed_sum[:, cell] == 0) & (W0 > 0)
    for r in np.flatnonzero(zero_fit.any(axis=1)):
        keep = (W0[r] > 0) & ~zero_fit[r]
        df[r] = keep.sum() - (np.linalg.matrix_rank(X[keep]) if keep.any() else 0)
    return df


def _estimate_dispersion(X, Y, Off, W0, lam, params, rank):
    """Per-region dispersion: Cox-Reid profile likelihood shrunk toward an abundance trend.

    Returns the dispersion (R,), a method label per region and the prior df
    used (given, or estimated from the data).
    """
    n_regions = Y.shape[0]
    df = W0.sum(axis=1) - rank
    apl = np.empty((n_regions, _DISP_GRID.size))
    beta = _start(X, Y, Off, W0)
    for k, d in enumerate(_DISP_GRID):
        disp = np.full(n_regions, d)
        beta, mu, info, _ = _fit_nb(X, Y, Off, W0, disp, lam, beta, params.max_iter)
        logdet = np.linalg.slogdet(info)[1]
        apl[:, k] = _nb_loglik(Y, mu, disp, W0) - 0.5 * logdet
    method = np.where(df > 0, "negbin", "negbin-trend-dispersion").astype(object)
    has_df = df > 0
    if not has_df.any():
        logger.warning("No region has replicate mice to estimate dispersion; using Poisson.")
        return (np.full(n_regions, _DISP_GRID[0]), np.full(n_regions, "poisson-fallback", object),
                0.0, None)  # fmt: skip
    with np.errstate(divide="ignore"):
        abundance = np.log(np.sum(Y * W0, axis=1) / np.maximum(W0.sum(axis=1), 1) + 0.5)
    # trend: moving average of the profile curves of regions ranked by abundance
    contrib = np.flatnonzero(has_df)
    order = contrib[np.argsort(abundance[contrib], kind="stable")]
    n_c = order.size
    half = max(5, int(np.ceil(params.dispersion_trend_span * n_c / 2)))
    csum = np.vstack([np.zeros(_DISP_GRID.size), np.cumsum(apl[order], axis=0)])
    pos = np.searchsorted(abundance[order], abundance)
    lo = np.clip(pos - half, 0, max(n_c - 2 * half, 0))
    hi = np.minimum(lo + 2 * half, n_c)
    trend = (csum[hi] - csum[lo]) / (hi - lo)[:, None]
    prior_df, ql = params.dispersion_prior_df, None
    trend_disp = np.exp(_grid_max(trend))
    if prior_df is None or params.test == "ql-f":
        # the trend pools the curves of min(2 half, n_c) regions: it cannot carry more df
        cap = float(min(2 * half, n_c) * np.median(df[has_df]))
        prior_df, post, ql_df = _quasi_dispersion(X, Y, Off, W0, lam, trend_disp, abundance,
                                                  params, cap, rank)  # fmt: skip
        ql = (trend_disp, post, ql_df)
    prior_n = prior_df / np.maximum(df, 1e-9)
    # weighted likelihood; regions without residual df take the trend alone
    shrunk = np.where(has_df[:, None], apl + prior_n[:, None] * trend, trend)
    return np.exp(_grid_max(shrunk)), method, float(prior_df), ql


_MIN_REGIONS_PRIOR_DF = 20
_FALLBACK_PRIOR_DF = 10.0


def _quasi_dispersion(X, Y, Off, W0, lam, trend_disp, abundance, params, cap, rank):
    """Quasi-likelihood dispersions around the trend and their prior df (edgeR's estimateDisp).

    The model is fitted at the trended dispersion; each region's
    quasi-likelihood dispersion ``s2 = deviance / df`` is then ~ s0² F(df, d0)
    and ``d0`` is estimated by :func:`fit_f_prior_df` with abundance as
    covariate (unless ``params.dispersion_prior_df`` fixes it). Returns the
    prior df, the squeezed ``s2`` per region and the residual df per region.
    """
    beta = _start(X, Y, Off, W0)
    _, mu, _, _ = _fit_nb(X, Y, Off, W0, trend_disp, lam, beta, params.max_iter)
    _, cell = np.unique(X, axis=0, return_inverse=True)
    df = np.maximum(_residual_df(X, Y, W0, cell.ravel(), rank), 0)
    s2 = _nb_deviance(Y, mu, trend_disp, W0) / np.maximum(df, 1)
    use = (df > 0) & np.isfinite(s2)
    prior_df = params.dispersion_prior_df
    s0sq = np.ones(Y.shape[0])
    if use.sum() < _MIN_REGIONS_PRIOR_DF or np.median(s2[use]) <= 0:
        if prior_df is None:
            logger.info(
                "Only %d regions with residual df: dispersion prior df set to %g, not estimated.",
                int(use.sum()), _FALLBACK_PRIOR_DF,
            )  # fmt: skip
            prior_df = _FALLBACK_PRIOR_DF
    else:
        d0, s0u = fit_f_prior_df(s2[use], df[use], abundance[use], return_scale=True)
        order = np.argsort(abundance[use])
        s0sq = np.interp(abundance, abundance[use][order], s0u[order])
        s0sq[use] = s0u
        if prior_df is None:
            logger.info("Dispersion prior df estimated at %.3g (cap %.3g).", d0, cap)
            prior_df = float(min(d0, cap))
    with np.errstate(invalid="ignore"):
        post = np.where(use, (prior_df * s0sq + df * s2) / (prior_df + df), s0sq)
    post = np.where(np.isfinite(post) & (post > 0), post, 1.0)
    return float(prior_df), post, np.where(use, df, 0)


# --------------------------------------------------------------------------- inputs


def check_design(subjects, reference_group, covariates, *, need_dose: bool) -> None:
    """Check a subjects table for a group comparison; one sentence for the first problem.

    Shared by the count model and :func:`ketamap.stats.densities.compare_densities`:
    the columns (``subject``, ``group``, ``dose_mg_per_kg`` when ``need_dose``, the
    covariates), unique subjects, covariates that are neither model terms nor missing,
    at least two groups, and the reference group among them.
    """
    for c in ("subject", "group", *(("dose_mg_per_kg",) if need_dose else ()), *covariates):
        if c not in subjects.columns:
            near = did_you_mean(c, subjects.columns)
            raise InputError(f'The subjects table lacks column "{c}"{near}.')
    if subjects["subject"].duplicated().any():
        dup = subjects.loc[subjects["subject"].duplicated(), "subject"].iloc[0]
        raise InputError(f'Subject "{dup}" appears more than once in the subjects table.')
    for c in covariates:
        if c in ("group", "dose_mg_per_kg", "subject"):
            raise StatsError(f'"{c}" is part of the model already and cannot be a covariate.')
        if subjects[c].isna().any():
            raise InputError(f'Covariate "{c}" is missing for some subjects.')
    if need_dose and subjects["dose_mg_per_kg"].isna().any():
        raise InputError("dose_mg_per_kg is missing for some subjects.")
    groups = pd.unique(subjects["group"].astype(str))
    if len(groups) < 2:
        raise StatsError(f"Comparing groups needs at least two groups, got only {groups[0]!r}.")
    if reference_group not in groups:
        raise StatsError(
            f'Reference group "{reference_group}" is not among the groups '
            f"{', '.join(groups)}{did_you_mean(reference_group, groups)}."
        )


def _check_inputs(counts, subjects, reference_group, covariates):
    missing = [c for c in _COUNT_COLUMNS if c not in counts.columns]
    if missing:
        raise InputError(f"The counts table lacks column(s) {', '.join(missing)}.")
    check_design(subjects, reference_group, covariates, need_dose=True)
    unknown = sorted(set(counts["subject"].astype(str)) - set(subjects["subject"].astype(str)))
    if unknown:
        raise InputError(f"Subject(s) {', '.join(unknown[:5])} in counts are not in subjects.")
    if counts.duplicated(["subject", "region_id"]).any():
        raise InputError("The counts table has more than one row for some (subject, region_id).")
    cnt = counts["count"].to_numpy(dtype=float)
    if np.any(~np.isfinite(cnt) | (cnt < 0) | (cnt != np.round(cnt))):
        raise InputError("Counts must be whole numbers >= 0.")
    vol = counts["volume_mm3"].to_numpy(dtype=float)
    if np.any(~np.isfinite(vol) | (vol <= 0)):
        raise InputError(f"volume_mm3 must be > 0; {int(np.sum(~(vol > 0)))} row(s) are not.")


def _covariate_matrix(subjects, covariates):
    cols = []
    for c in covariates:
        s = subjects[c]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = s.to_numpy(dtype=float)
            if np.std(v) == 0:
                raise StatsError(f'Covariate "{c}" has the same value in every subject.')
            cols.append((v - v.mean()) / np.std(v))
        else:
            levels = sorted(s.astype(str).unique())
            if len(levels) < 2:
                raise StatsError(f'Covariate "{c}" has the same value in every subject.')
            cols += [(s.astype(str) == lev).to_numpy(dtype=float) for lev in levels[1:]]
    return np.column_stack(cols) if cols else np.empty((len(subjects), 0))


def _wide(counts, subject_ids):
    """Return counts, log-volumes and observed mask as (regions, subjects) arrays."""
    c = counts.copy()
    c["subject"] = c["subject"].astype(str)
    meta = c.groupby("region_id", sort=True)[["acronym", "level"]].first().reset_index()
    wide = {
        v: c.pivot(index="region_id", columns="subject", values=v).reindex(
            index=meta["region_id"], columns=subject_ids
        )
        for v in ("count", "volume_mm3")
    }
    ycnt, vol = wide["count"], wide["volume_mm3"]
    W0 = ycnt.notna().to_numpy().astype(float)
    Y = np.nan_to_num(ycnt.to_numpy(dtype=float))
    V = vol.to_numpy(dtype=float)
    Off = np.where(W0 > 0, np.log(np.where(W0 > 0, V, 1.0)), 0.0)
    return meta, Y, Off, W0, np.where(W0 > 0, Y / np.where(W0 > 0, V, 1.0), np.nan)


# --------------------------------------------------------------------------- checks


def _welch(dens, a, b):
    """Welch t-test p-values of density, group mask ``b`` vs ``a``, per region."""

    def moments(mask):
        x = np.where(mask[None, :] & ~np.isnan(dens), dens, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(x, 1), np.nanvar(x, 1, ddof=1), np.sum(~np.isnan(x), 1)

    (m0, v0, n0), (m1, v1, n1) = moments(a), moments(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        se2 = v0 / n0 + v1 / n1
        t = (m1 - m0) / np.sqrt(se2)
        dof = se2**2 / ((v0 / n0) ** 2 / (n0 - 1) + (v1 / n1) ** 2 / (n1 - 1))
        p = 2 * stats.t.sf(np.abs(t), dof)
    ok = (n0 >= 2) & (n1 >= 2) & (se2 > 0)
    return np.where(ok, p, np.nan), m0, m1, n0, n1


def _rank_test(dens, a=None, b=None, dose=None):
    """Per-region Mann-Whitney U (``b`` vs ``a``) or, given ``dose``, Spearman p-values.

    NaN where the data are all tied or too few; scipy's warnings stay inside.
    """
    out = np.full(dens.shape[0], np.nan)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for r, row in enumerate(dens):
            ok = ~np.isnan(row)
            if dose is not None:
                x, y = dose[ok], row[ok]
                if x.size >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
                    out[r] = stats.spearmanr(x, y).pvalue
            else:
                x, y = row[a & ok], row[b & ok]
                if x.size and y.size and np.ptp(np.r_[x, y]) > 0:
                    out[r] = stats.mannwhitneyu(x, y, alternative="two-sided").pvalue
    return out


# --------------------------------------------------------------------------- main


def compare_regions(
    counts: pd.DataFrame,
    subjects: pd.DataFrame,
    *,
    reference_group: str,
    covariates: tuple[str, ...] = (),
    params: StatsParams = StatsParams(),  # noqa: B008 (frozen, immutable default)
) -> pd.DataFrame:
    """Compare cell densities between groups in every region, with a dose trend.

    Per region, ``count ~ NB(mu, dispersion)`` with
    ``log mu = log(volume_mm3) + b0 + sum_g b_g [group == g] + covariates``;
    each non-reference group gives the contrast ``"{group}_vs_{reference}"``.
    A second model with dose as a number (scaled to
    ``dose_trend_unit_mg_per_kg``) gives the contrast ``"dose_trend"``.

    Parameters
    ----------
    counts : DataFrame
        One row per (subject, region): ``subject`` (str), ``region_id`` (int64),
        ``acronym``, ``level`` (0 = root), ``count`` (int >= 0) and
        ``volume_mm3`` (> 0). A missing row is missing data, not zero.
    subjects : DataFrame
        ``subject``, ``group``, ``dose_mg_per_kg`` and any covariate columns.
    reference_group : str
        The group every other group is compared with.
    covariates : tuple of str
        Subject columns added to both models; text/bool columns are
        categorical (first level as reference), numbers are standardised.
    params : StatsParams
        Model and testing parameters.

    Returns
    -------
    DataFrame
        One row per (region, contrast) with the columns in
        :data:`OUTPUT_COLUMNS`, sorted by contrast, level and p. ``p`` and
        ``q`` are NaN for untested rows, whose ``reason`` says why.

    Raises
    ------
    StatsError
        For a single group, an unknown reference group or a design that
        cannot be fitted (covariates confounded with group).
    InputError
        For missing columns, negative counts, non-positive volumes or subjects
        in ``counts`` absent from ``subjects``.

    Notes
    -----
    Dispersions are estimated by Cox-Reid adjusted profile likelihood with an
    abundance trend across regions (McCarthy et al. 2012,
    doi:10.1093/nar/gks042). By default (``test="ql-f"``) p-values come from
    quasi-likelihood F tests at the trended dispersion, with each region's
    quasi-likelihood dispersion squeezed toward its trend by empirical Bayes
    (Lund et al. 2012, doi:10.1515/1544-6115.1826); the prior df is
    estimated from the data unless ``params.dispersion_prior_df`` fixes it,
    and the value used is in ``result.attrs["dispersion_prior_df"]``; QL F
    p-values are no smaller than Poisson's (``params.poisson_bound``).
    Confidence intervals come from Wald standard errors.

    In a region where a group has data but no cells, the fits follow edgeR:
    the tests compare fits with that group at zero, and the fold change adds
    ``params.prior_count`` cells per mouse in proportion to volume, so that it
    stays finite, and is exactly 1 (p = 1) between two groups without cells.
    A group without data in a region has a NaN fold change and p, and
    ``reason`` says so.

    Examples
    --------
    >>> subjects = pd.DataFrame({"subject": list("abcd"), "group": ["s", "s", "k", "k"],
    ...                          "dose_mg_per_kg": [0.0, 0.0, 30.0, 30.0]})
    >>> counts = pd.DataFrame({"subject": list("abcd"), "region_id": 1, "acronym": "VTA",
    ...                        "level": 5, "count": [100, 110, 50, 55], "volume_mm3": 1.0})
    >>> res = compare_regions(counts, subjects, reference_group="s")
    >>> res.loc[res.contrast == "k_vs_s", "fold_change"].round(2).tolist()
    [0.5]
    """
    covariates = tuple(covariates)
    _check_inputs(counts, subjects, reference_group, covariates)
    sub = subjects.assign(subject=subjects["subject"].astype(str),
                          group=subjects["group"].astype(str))  # fmt: skip
    absent = sorted(set(sub["subject"]) - set(counts["subject"].astype(str)))
    if absent:
        logger.warning("Subjects without any counts (treated as missing): %s", ", ".join(absent))
    dose_by_group = sub.groupby("group")["dose_mg_per_kg"].mean()
    others = sorted((g for g in dose_by_group.index if g != reference_group),
                    key=lambda g: (dose_by_group[g], g))  # fmt: skip
    group = sub["group"].to_numpy()
    cov = _covariate_matrix(sub, covariates)
    n = len(sub)
    Xg = np.column_stack([np.ones(n)] + [(group == g).astype(float) for g in others] + [cov])
    if np.linalg.matrix_rank(Xg) < Xg.shape[1]:
        raise StatsError("The covariates are confounded with group, so the model cannot be fitted.")
    dose = sub["dose_mg_per_kg"].to_numpy(dtype=float)
    span = float(dose.max() - dose.min())
    unit = params.dose_trend_unit_mg_per_kg or span
    Xd = np.column_stack([np.ones(n), dose / (span or 1.0), cov])  # fitted per dose span
    dose_ok = span > 0 and np.linalg.matrix_rank(Xd) == Xd.shape[1]
    if not dose_ok:
        logger.info("No dose trend: doses do not vary independently of the covariates.")
    meta, Y, Off, W0, dens = _wide(counts, sub["subject"].tolist())
    total = np.sum(Y * W0, axis=1)
    reason = np.full(len(meta), "", dtype=object)
    reason[total < params.min_total_count] = f"total count below {params.min_total_count}"
    reason[total == 0] = "no cells in any subject"
    fm = _Fitter(Y, Off, W0, (total > 0) & (total >= params.min_total_count), params)
    fm.dispersion(Xg)
    ref = group == reference_group
    k = params.min_subjects_per_group
    n_obs = lambda m: (W0[:, m] > 0).sum(axis=1)  # noqa: E731
    tables = []
    for j, g in enumerate(others, start=1):
        gm = group == g
        low = np.minimum(n_obs(ref), n_obs(gm)) < k
        zeros = sum((np.sum(Y * W0 * m, axis=1) == 0) & (n_obs(m) > 0) for m in (ref, gm))
        est = fm.test(Xg, j)
        why = np.where(
            reason != "",
            reason,
            np.where(low, f"fewer than {k} subjects with data in '{reference_group}' or '{g}'", ""),
        )
        why = _join(why, _not_estimable(est, [(reference_group, n_obs(ref)), (g, n_obs(gm))]))
        notes = np.select(
            [zeros == 2, zeros == 1],
            ["both groups have only zeros: no change", "a group has only zeros: fold change "
             "bounded by the prior count"], "",
        )  # fmt: skip
        tab = _table(meta, f"{g}_vs_{reference_group}", est, why, notes, fm)
        welch_p, m0, m1, n0, n1 = _welch(dens, ref, gm)
        tab = tab.assign(mean_density_ref_per_mm3=m0, mean_density_group_per_mm3=m1,
                         n_ref=n0, n_group=n1, welch_p=welch_p,
                         mannwhitney_p=_rank_test(dens, ref, gm))  # fmt: skip
        tables.append(tab)
    if dose_ok:
        lo_m, hi_m = dose == dose.min(), dose == dose.max()
        n_dose = sum(n_obs(dose == u) >= k for u in np.unique(dose))  # doses with k+ mice
        why = np.where(
            reason != "",
            reason,
            np.where(n_dose < 2, f"fewer than two doses with {k}+ subjects", ""),
        )
        est = fm.test(Xd, 1)
        why = _join(why, _not_estimable(est, []))
        est["est"], est["se"] = est["est"] * unit / span, est["se"] * unit / span
        tab = _table(meta, "dose_trend", est, why, np.full(len(meta), ""), fm)
        _, m0, m1, n0, n1 = _welch(dens, lo_m, hi_m)
        tab = tab.assign(mean_density_ref_per_mm3=m0, mean_density_group_per_mm3=m1,
                         n_ref=n0, n_group=n1, spearman_p=_rank_test(dens, dose=dose),
                         dose_unit_mg_per_kg=float(unit))  # fmt: skip
        tables.append(tab)
    out = _add_q(pd.concat(tables, ignore_index=True), params.fdr_family)
    out = out.sort_values(["contrast", "level", "p", "region_id"], na_position="last")
    logger.info("Compared %d regions over %d contrasts.", len(meta), len(tables))
    out = out.reset_index(drop=True)[list(OUTPUT_COLUMNS)]
    out = out.astype({"n_ref": np.int64, "n_group": np.int64, "converged": bool})
    out.attrs["dispersion_prior_df"] = fm.prior_df
    return out


class _Fitter:
    """Fits of one cohort's regions: dispersions once, then one test per contrast.

    Where every design cell (mice with identical design rows) of a region has
    cells, the maximum-likelihood fit exists and is used, with a weak ridge on
    the non-intercept coefficients (``coef_prior_sd_log2``) that changes
    nothing visible. Where a cell has none, the fitted mean of that cell tends
    to zero and the ridge, tied to the reference group, would set it instead of
    the data. Those regions are fitted as edgeR does, with no ridge: every
    mouse with data gets ``k * volume / mean volume of the region`` cells
    added; the tests use ``k = _ZERO_FIT_COUNT``, so that the empty cell is
    fitted at (numerically) zero, the maximum-likelihood limit, and the
    estimate and its interval use ``k = params.prior_count`` (edgeR's
    ``prior.count``): finite for a group with only zeros, and exactly no change
    between two groups with only zeros, since both get the same cells per mm³.
    """

    def __init__(self, Y, Off, W0, fit_mask, params):
        self.idx = np.flatnonzero(fit_mask)
        self.n_regions = Y.shape[0]
        self.Y, self.Off, self.W0 = Y[self.idx], Off[self.idx], W0[self.idx]
        vol = np.exp(self.Off) * self.W0
        n_obs = np.maximum(self.W0.sum(axis=1, keepdims=True), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.where(self.W0 > 0, vol / (vol.sum(axis=1, keepdims=True) / n_obs), 0.0)
        self.Y_zero = self.Y + _ZERO_FIT_COUNT * rel
        self.Y_prior = self.Y + params.prior_count * rel
        self.params = params
        self.prior_prec = 1.0 / (params.coef_prior_sd_log2 * _LN2) ** 2
        self.disp = np.full(self.n_regions, np.nan)
        self.method = np.full(self.n_regions, "not-tested", dtype=object)
        self.prior_df = float("nan")

    def _lam(self, X):
        return np.r_[0.0, np.full(X.shape[1] - 1, self.prior_prec)]

    def _fit(self, X, disp):
        lam = self._lam(X)
        start = _start(X, self.Y, self.Off, self.W0)
        return _fit_nb(X, self.Y, self.Off, self.W0, disp, lam, start, self.params.max_iter)

    def _fit_at_zero(self, X, disp, rows, Y):
        """Fit regions ``rows`` to ``Y`` (counts plus a prior count) without the ridge."""
        return _fit_glm(X, Y[rows], self.Off[rows], self.W0[rows], disp[rows],
                        self.params.max_iter)  # fmt: skip

    def dispersion(self, X):
        """Estimate and store shrunk dispersions and the test's denominator df."""
        if not self.idx.size:
            return
        rank = _identifiable(X, self.W0).sum(axis=1)
        d, method, prior_df, ql = _estimate_dispersion(
            X, self.Y, self.Off, self.W0, self._lam(X), self.params, rank
        )
        self.prior_df = prior_df
        self.ql_scale = None
        if self.params.test == "ql-f" and ql is not None:
            d, self.ql_scale, ql_df = ql
            self.disp[self.idx], self.method[self.idx] = d, method
            self._d = d
            self.df_test = ql_df + prior_df
            return
        self.disp[self.idx], self.method[self.idx] = d, method
        self._d = d
        _, mu, _, _ = self._fit(X, d)
        mbar = np.sum(mu * self.W0, axis=1) / np.maximum(self.W0.sum(axis=1), 1)
        df = np.maximum(self.W0.sum(axis=1) - rank, 0) + prior_df
        share = d * mbar / (1 + d * mbar)  # share of the variance that is extra-Poisson
        with np.errstate(divide="ignore"):
            self.df_test = np.where((df > 0) & (method != "poisson-fallback"),
                                    df / share**2, np.inf)  # fmt: skip

    def test(self, X, j):
        """Estimate (log), SE, p and convergence of coefficient ``j`` for every fitted region.

        ``est`` and ``se`` are NaN where the mice with data do not identify the coefficient.
        """
        out = {k: np.full(self.n_regions, np.nan) for k in ("est", "se", "p", "df")}
        out["converged"] = np.zeros(self.n_regions, dtype=bool)
        out["estimable"] = np.zeros(self.n_regions, dtype=bool)
        out["fitted"] = np.zeros(self.n_regions, dtype=bool)
        if not self.idx.size:
            return out
        d = self._d
        estimable = _identifiable(X, self.W0)[:, j]
        empty = np.flatnonzero(_empty_cell(X, self.Y, self.W0))
        beta, mu, info, conv = self._fit(X, d)
        if empty.size:
            b0, _, info0, conv0 = self._fit_at_zero(X, d, empty, self.Y_prior)
            beta[empty], info[empty], conv[empty] = b0, info0, conv[empty] & conv0
        est = np.where(estimable, beta[:, j], np.nan)
        se = np.where(estimable, np.sqrt(np.linalg.inv(info)[:, j, j]), np.nan)
        test = self.params.test
        if test == "wald":
            with np.errstate(divide="ignore", invalid="ignore"):
                stat = (est / se) ** 2
        else:
            keep = [c for c in range(X.shape[1]) if c != j]
            _, mu_r, _, conv_r = self._fit(X[:, keep], d)
            Y = self.Y.copy()
            if empty.size:
                Y[empty] = self.Y_zero[empty]
                _, mu[empty], _, conv0 = self._fit_at_zero(X, d, empty, self.Y_zero)
                _, mu_r[empty], _, conv0_r = self._fit_at_zero(X[:, keep], d, empty, self.Y_zero)
                conv[empty] &= conv0 & conv0_r
            ll = _nb_loglik(Y, mu, d, self.W0)
            lr = 2 * (ll - _nb_loglik(Y, mu_r, d, self.W0))
            # below the precision of the fitted log-likelihoods the two models fit alike
            stat = np.where(lr > _LR_RESOLUTION * (1 + np.abs(ll)), lr, 0.0)
            conv = conv & conv_r
        if test == "ql-f" and self.ql_scale is not None:
            stat, se = stat / self.ql_scale, se * np.sqrt(self.ql_scale)
        df = self.df_test if test in ("lr-f", "ql-f") else np.full(self.idx.size, np.inf)
        with np.errstate(invalid="ignore"):
            p = np.where(np.isinf(df), stats.chi2.sf(stat, 1), stats.f.sf(stat, 1, df))
        if test == "ql-f" and self.ql_scale is not None and self.params.poisson_bound:
            p = np.maximum(p, self._poisson_bound(X, j, mu))
        values = (est, se, p, df, conv, estimable, True)
        for key, val in zip(("est", "se", "p", "df", "converged", "estimable", "fitted"), values):
            out[key][self.idx] = val
        return out

    def _poisson_bound(self, X, j, mu):
        """Return the Poisson LR p-value where the QL variance falls below Poisson, else 0.

        As edgeR's ``glmQLFTest(poisson.bound=TRUE)``: a region whose squeezed
        quasi-likelihood dispersion makes some mouse's variance
        ``s2_post * (mu + phi * mu^2)`` smaller than its Poisson variance ``mu``
        gets a p-value no smaller than the LR test with dispersion 0 and
        quasi-dispersion 1.
        """
        variance_ratio = self.ql_scale[:, None] * (1 + self._d[:, None] * mu)
        below = np.flatnonzero(np.any((self.W0 > 0) & (variance_ratio < 1), axis=1))
        bound = np.zeros(self.idx.size)
        if not below.size:
            return bound
        poisson = np.zeros(self.idx.size)
        keep = [c for c in range(X.shape[1]) if c != j]
        mu_f = self._fit_at_zero(X, poisson, below, self.Y_zero)[1]
        mu_r = self._fit_at_zero(X[:, keep], poisson, below, self.Y_zero)[1]
        Y, W0 = self.Y_zero[below], self.W0[below]
        lr = 2 * (_poisson_loglik(Y, mu_f, W0) - _poisson_loglik(Y, mu_r, W0))
        bound[below] = stats.chi2.sf(np.maximum(lr, 0.0), 1)
        return bound


def _not_estimable(est, groups):
    """Say why a fitted coefficient is not estimable: the groups without data, or confounding.

    ``groups``: (name, mice with data per region) of the groups that the contrast compares.
    """
    out = np.full(est["fitted"].shape, "", dtype=object)
    for r in np.flatnonzero(est["fitted"] & ~est["estimable"]):
        none = [f"'{g}'" for g, n in groups if n[r] == 0]
        out[r] = (f"no subject with data in {' or '.join(none)}: no fold change" if none
                  else "not estimable from the subjects with data")  # fmt: skip
    return out


def _join(*parts):
    """Join per-row texts with '; ', skipping empty ones."""
    return np.array(["; ".join(t for t in row if t) for row in zip(*parts)], dtype=object)


def _table(meta, contrast, est, why, notes, fm):
    """Return the model columns of one contrast; the caller adds the descriptive ones."""
    lfc, se = est["est"] / _LN2, est["se"] / _LN2
    crit = stats.t.ppf(0.975, est["df"])  # the normal quantile where df is infinite
    p = np.where(why == "", est["p"], np.nan)
    return pd.DataFrame({
        "region_id": meta["region_id"].to_numpy(np.int64),
        "acronym": meta["acronym"].astype(str).to_numpy(),
        "level": meta["level"].to_numpy(np.int64),
        "contrast": contrast,
        "log2_fold_change": lfc,
        "ci_low_log2": lfc - crit * se,
        "ci_high_log2": lfc + crit * se,
        "fold_change": np.exp2(lfc),
        "p": p,
        "q": np.nan,
        "welch_p": np.nan,
        "mannwhitney_p": np.nan,
        "spearman_p": np.nan,
        "dose_unit_mg_per_kg": np.nan,
        "dispersion": fm.disp,
        "method": fm.method,
        "converged": est["converged"],
        "reason": np.where(why != "", why, notes).astype(object),
    })  # fmt: skip


def _add_q(out, family):
    keys = {"contrast_level": ["contrast", "level"], "contrast": ["contrast"], "all": None}[family]
    if keys is None:
        out["q"] = benjamini_hochberg(out["p"].to_numpy())
    else:
        out["q"] = out.groupby(keys, sort=False)["p"].transform(
            lambda s: pd.Series(benjamini_hochberg(s.to_numpy()), index=s.index)
        )
    return out
