"""Coactivity and ensembles from event trains (cells, frames).

* :func:`bin_activity` sums events in time bins (cells, bins).
* :func:`coactivity_matrix` – pairwise Pearson correlations of binned activity.
* :func:`coactive_bins` – bins where more cells fire together than under a
  circular-shift null (each cell's train rotated by an independent random lag).
* :func:`detect_assemblies` – cell assemblies by the PCA/ICA method of
  Lopes-dos-Santos, Ribeiro & Tort (2013), doi:10.1016/j.jneumeth.2013.04.010,
  with the number of assemblies set by the Marchenko–Pastur bound.
* :func:`activation_strength` – each assembly's activation time course.
* :func:`match_assemblies` – Jaccard of member sets across sessions.

Notes
-----
Circular-shift null, computed exactly: rotating every cell by an independent
uniform lag makes each cell active in a given bin with probability ``k_i / T``
(its fraction of active bins), independently of the others, so the number of
coactive cells per bin follows a Poisson-binomial law. We compute that law
exactly by convolution instead of drawing shuffles; it equals the limit of
infinitely many circular shuffles.

Marchenko–Pastur significance: Lopes-dos-Santos et al. keep the principal
components of the cell correlation matrix whose eigenvalue exceeds
``λ+ = (1 + √(N/T))²``. For finite N and T the largest null eigenvalue
fluctuates around λ+ (Tracy–Widom), so this bound alone yields a false
assembly in a sizeable fraction of null recordings. By default we add the
Tracy–Widom 99.9th-percentile margin (Johnstone 2001, doi:10.1214/aos/1009210544);
``tracy_widom=False`` gives the original bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ketamap.errors import ParameterError

__all__ = [
    "bin_activity",
    "zscore_rows",
    "coactivity_matrix",
    "coactive_bins",
    "block_permutation_test",
    "poisson_binomial_sf",
    "marchenko_pastur_threshold",
    "Assemblies",
    "detect_assemblies",
    "activation_strength",
    "jaccard_matrix",
    "match_assemblies",
]

log = logging.getLogger(__name__)

#: 99.9th percentile of the Tracy–Widom (β = 1) law. Binned event counts are
#: sparse and heavier-tailed than Gaussian data, so the 99th percentile (2.02)
#: still gave 4 % false assemblies in 200 null simulations (100 cells, 5 min).
_TW1_Q999 = 3.27


def bin_activity(events: np.ndarray, *, bin_frames: int = 1) -> np.ndarray:
    """Sum events in consecutive bins of ``bin_frames`` frames.

    Parameters
    ----------
    events : ndarray, shape (cells, frames)
        Binary events or spike estimates.
    bin_frames : int
        Frames per bin; trailing frames that do not fill a bin are dropped.

    Returns
    -------
    ndarray of float32, shape (cells, frames // bin_frames)
    """
    if bin_frames < 1:
        raise ParameterError(f"bin_frames must be at least 1, got {bin_frames!r}.")
    events = np.asarray(events)
    n_cells, n_frames = events.shape
    nb = n_frames // bin_frames
    used = events[:, : nb * bin_frames].astype(np.float32, copy=False)
    return used.reshape(n_cells, nb, bin_frames).sum(axis=2, dtype=np.float32)


def zscore_rows(x: np.ndarray) -> np.ndarray:
    """Z-score each row; constant rows become zeros.

    Returns
    -------
    ndarray of float32, same shape as ``x``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] == 0:
        return x.copy()
    mu = x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    return np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1), 0).astype(np.float32)


def coactivity_matrix(activity: np.ndarray) -> np.ndarray:
    """Pearson correlation between every pair of cells (silent cells give 0).

    Parameters
    ----------
    activity : ndarray, shape (cells, bins)

    Returns
    -------
    ndarray of float32, shape (cells, cells)
        Diagonal is 1 for active cells, 0 for silent ones.
    """
    z = zscore_rows(activity)
    t = max(z.shape[1], 1)
    return (z @ z.T / np.float32(t)).astype(np.float32)


def poisson_binomial_sf(p: np.ndarray) -> np.ndarray:
    """Survival function ``P(X ≥ c)`` for ``c = 0..N`` of a sum of independent Bernoullis.

    Parameters
    ----------
    p : ndarray, shape (N,)
        Success probability of each Bernoulli.

    Returns
    -------
    ndarray of float64, shape (N + 2,)
        ``sf[c] = P(X ≥ c)``; ``sf[N + 1] = 0``.
    """
    pmf = np.zeros(len(p) + 1)
    pmf[0] = 1.0
    for i, pi in enumerate(np.asarray(p, dtype=np.float64)):
        pmf[1 : i + 2] = pmf[1 : i + 2] * (1 - pi) + pmf[: i + 1] * pi
        pmf[0] *= 1 - pi
    sf = np.concatenate([np.cumsum(pmf[::-1])[::-1], [0.0]])
    return np.clip(sf, 0.0, 1.0)


#: block length of the block permutation test, in decorrelation lags (autocorrelation
#: below 0.05): the covariance between neighbouring blocks, which exchanging blocks
#: ignores, is then small (null calibration in docs/ensembles.md)
_BLOCK_LAGS = 4


def _decorrelation_lag(x: np.ndarray, limit: int) -> int:
    """First lag at which the autocorrelation of ``x`` falls below 0.05 (at most ``limit``)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    var = float(x @ x)
    if var == 0:
        return 1
    n = len(x)
    spec = np.fft.rfft(x, 2 * n)
    acf = np.fft.irfft(spec * np.conj(spec))[: min(limit, n - 1) + 1] / var
    below = np.nonzero(acf[1:] < 0.05)[0]
    return int(below[0] + 1) if len(below) else int(limit)


def block_permutation_test(
    a: np.ndarray,
    b: np.ndarray,
    *,
    block: int | None = None,
    n_permutations: int = 9999,
    seed: int = 0,
) -> dict:
    """Test whether the mean of series ``b`` differs from that of ``a``, autocorrelation kept.

    Both series are cut into consecutive blocks of ``block`` samples; the blocks of the
    two are pooled and dealt back at random, as many to each as it had, and the
    difference of means is recomputed. Neighbouring samples of a time series are not
    independent (a significant bin of coactivity is followed by more), so a test that
    treats each bin as a sample (a two-proportion z-test) is far too confident;
    exchanging whole blocks keeps the dependence within a block.

    Parameters
    ----------
    a, b : array_like, shape (n,) and (m,)
        The two series (e.g. 0/1 per time bin).
    block : int, optional
        Block length in samples. By default twice the longer of the two series'
        decorrelation lags (autocorrelation below 0.05), at least ``n^(1/3)`` and at
        most a tenth of the shorter series.
    n_permutations : int
    seed : int

    Returns
    -------
    dict
        ``difference`` (mean b - mean a), ``p_value`` (two-sided, (1 + #) / (1 + n)),
        ``block`` (samples) and ``n_blocks`` (a, b).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r = block_permutation_test(rng.random(600) < 0.1, rng.random(600) < 0.1, seed=1)
    >>> r["p_value"] > 0.05
    True
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    out = {"difference": float(b.mean() - a.mean()) if len(a) and len(b) else np.nan,
           "p_value": np.nan, "block": 0, "n_blocks": (0, 0)}  # fmt: skip
    shortest = min(len(a), len(b))
    if shortest < 20:
        return out
    if block is None:
        limit = max(1, shortest // 10)
        lag = max(_decorrelation_lag(a, limit), _decorrelation_lag(b, limit))
        block = int(min(max(_BLOCK_LAGS * lag, np.ceil(max(len(a), len(b)) ** (1 / 3))), limit))
    block = max(1, int(block))
    ka, kb = len(a) // block, len(b) // block
    if ka < 2 or kb < 2:
        return out | {"block": block, "n_blocks": (ka, kb)}

    # block sums and sizes (the remainder of each series is its own, shorter block)
    def blocks(x, k):
        sums = x[: k * block].reshape(k, block).sum(axis=1)
        sizes = np.full(k, block, dtype=np.float64)
        if len(x) > k * block:
            sums = np.append(sums, x[k * block :].sum())
            sizes = np.append(sizes, len(x) - k * block)
        return sums, sizes

    sa, na = blocks(a, ka)
    sb, nb = blocks(b, kb)
    sums, sizes = np.concatenate([sa, sb]), np.concatenate([na, nb])
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((n_permutations, len(sums))), axis=1)
    to_a = order[:, : len(sa)]
    mean_a = sums[to_a].sum(axis=1) / sizes[to_a].sum(axis=1)
    mean_b = (sums.sum() - sums[to_a].sum(axis=1)) / (sizes.sum() - sizes[to_a].sum(axis=1))
    null = mean_b - mean_a
    obs = out["difference"]
    out["p_value"] = float((1 + np.sum(np.abs(null) >= abs(obs) - 1e-12)) / (1 + n_permutations))
    out["block"], out["n_blocks"] = block, (len(sa), len(sb))
    return out


def coactive_bins(active: np.ndarray, *, alpha: float = 0.01) -> dict:
    """Bins in which more cells are active together than under a circular-shift null.

    Parameters
    ----------
    active : ndarray of bool, shape (cells, bins)
        Whether each cell has at least one event in each bin.
    alpha : float
        Per-bin false-positive rate of the null.

    Returns
    -------
    dict
        ``threshold`` (minimum number of coactive cells that is significant),
        ``significant`` (bool array, shape (bins,)), ``fraction`` (fraction of
        significant bins), ``expected_fraction`` (the null's fraction at that
        threshold, ≤ ``alpha``), ``n_active`` (int array, shape (bins,)).
    """
    if not 0 < alpha < 1:
        raise ParameterError(f"alpha must be in (0, 1), got {alpha!r}.")
    active = np.asarray(active, dtype=bool)
    n_cells, n_bins = active.shape
    n_active = active.sum(axis=0).astype(np.int64)
    if n_bins == 0 or n_cells == 0:
        return {
            "threshold": n_cells + 1,
            "significant": np.zeros(n_bins, dtype=bool),
            "fraction": 0.0,
            "expected_fraction": 0.0,
            "n_active": n_active,
        }
    p = active.mean(axis=1)
    sf = poisson_binomial_sf(p)
    # smallest c >= 2 (a pair at least) with P(X >= c) <= alpha
    ok = np.nonzero(sf <= alpha)[0]
    threshold = int(max(2, ok[0])) if len(ok) else n_cells + 1
    significant = n_active >= threshold
    return {
        "threshold": threshold,
        "significant": significant,
        "fraction": float(significant.mean()),
        "expected_fraction": float(sf[min(threshold, n_cells + 1)]),
        "n_active": n_active,
    }


def marchenko_pastur_threshold(n_cells: int, n_bins: int, *, tracy_widom: bool = True) -> float:
    """Eigenvalue above which a component of a cell correlation matrix is significant.

    Parameters
    ----------
    n_cells, n_bins : int
        Matrix size and number of samples.
    tracy_widom : bool
        Add the 99.9th-percentile Tracy–Widom margin for finite sizes.

    Returns
    -------
    float
        ``(1 + √(N/T))²`` (plus ``3.27 σ_TW`` with Johnstone's scaling).
    """
    q = n_cells / n_bins
    lam = (1.0 + np.sqrt(q)) ** 2
    if tracy_widom:
        a, b = np.sqrt(n_bins - 1.0), np.sqrt(float(n_cells))
        sigma = (a + b) / n_bins * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)
        lam = (a + b) ** 2 / n_bins + _TW1_Q999 * sigma
    return float(lam)


@dataclass(frozen=True)
class Assemblies:
    """Assemblies found in one recording.

    Attributes
    ----------
    patterns : ndarray of float32, shape (assemblies, cells)
        Unit-norm weight vectors, signed so that the largest weight is positive.
    members : list of ndarray of int
        Member cells of each assembly (weight > mean + ``member_sd`` · SD).
    eigenvalues : ndarray of float64, shape (cells,)
        Eigenvalues of the correlation matrix, descending.
    threshold : float
        The Marchenko–Pastur (± Tracy–Widom) eigenvalue bound used.
    """

    patterns: np.ndarray
    members: list = field(default_factory=list)
    eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0))
    threshold: float = float("nan")

    @property
    def n(self) -> int:
        """Number of assemblies."""
        return len(self.members)


def _fastica(x: np.ndarray, rng: np.random.Generator, max_iter: int = 500, tol: float = 1e-7):
    """Symmetric FastICA (log-cosh) on whitened rows ``x`` (k, T); returns unmixing (k, k)."""
    k, t = x.shape
    w = rng.standard_normal((k, k))

    def _decorrelate(m):
        s, u = np.linalg.eigh(m @ m.T)
        s = np.maximum(s, 1e-12)
        return u @ np.diag(1.0 / np.sqrt(s)) @ u.T @ m

    w = _decorrelate(w)
    for _ in range(max_iter):
        y = np.tanh(w @ x)
        w_new = y @ x.T / t - np.diag((1 - y**2).mean(axis=1)) @ w
        w_new = _decorrelate(w_new)
        change = np.max(np.abs(np.abs(np.einsum("ij,ij->i", w_new, w)) - 1))
        w = w_new
        if change < tol:
            break
    return w


def detect_assemblies(
    activity: np.ndarray,
    *,
    member_sd: float = 2.0,
    min_members: int = 2,
    tracy_widom: bool = True,
    seed: int = 0,
) -> Assemblies:
    """Cell assemblies by PCA/ICA with Marchenko–Pastur significance.

    Parameters
    ----------
    activity : ndarray, shape (cells, bins)
        Binned activity (e.g. event counts per bin).
    member_sd : float
        A cell is a member when its weight exceeds the pattern's mean weight by
        this many SDs (Lopes-dos-Santos et al. 2013 use 2).
    min_members : int
        Assemblies with fewer members are dropped.
    tracy_widom : bool
        See :func:`marchenko_pastur_threshold`.
    seed : int
        Seed of the ICA initialisation.

    Returns
    -------
    Assemblies
        Possibly empty (``n == 0``) with ``patterns`` of shape (0, cells).
    """
    z = zscore_rows(activity).astype(np.float64)
    n_cells, n_bins = z.shape
    empty = Assemblies(np.zeros((0, n_cells), np.float32), [], np.zeros(n_cells), float("nan"))
    if n_cells < 2 or n_bins < 2:
        return empty
    live = z.std(axis=1) > 0
    n_live = int(live.sum())
    if n_live < 2:
        return empty
    zl = z[live]
    corr = zl @ zl.T / n_bins
    evals, evecs = np.linalg.eigh(corr)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    thr = marchenko_pastur_threshold(n_live, n_bins, tracy_widom=tracy_widom)
    k = int(np.sum(evals > thr))
    all_evals = np.zeros(n_cells)
    all_evals[:n_live] = evals
    if k == 0:
        return Assemblies(empty.patterns, [], all_evals, thr)
    pcs = evecs[:, :k]
    proj = pcs.T @ zl / np.sqrt(evals[:k])[:, None]  # whitened (k, bins)
    w = _fastica(proj, np.random.default_rng(seed))
    pat_live = (pcs @ w.T).T  # (k, live cells)
    pat_live /= np.linalg.norm(pat_live, axis=1, keepdims=True)
    flip = np.sign(pat_live[np.arange(k), np.argmax(np.abs(pat_live), axis=1)])
    pat_live *= flip[:, None]
    patterns = np.zeros((k, n_cells))
    patterns[:, live] = pat_live
    live_idx = np.nonzero(live)[0]
    keep, members = [], []
    for i in range(k):
        wts = pat_live[i]
        m = live_idx[wts > wts.mean() + member_sd * wts.std()]
        if len(m) >= min_members:
            keep.append(i)
            members.append(np.sort(m))
    log.debug("assemblies: %d components above %.3f, %d kept", k, thr, len(keep))
    return Assemblies(patterns[keep].astype(np.float32), members, all_evals, thr)


def activation_strength(activity: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Activation time course of each assembly: ``z_tᵀ P z_t`` with P's diagonal removed.

    Parameters
    ----------
    activity : ndarray, shape (cells, bins)
    patterns : ndarray, shape (assemblies, cells)

    Returns
    -------
    ndarray of float32, shape (assemblies, bins)
    """
    z = zscore_rows(activity)
    p = np.asarray(patterns, dtype=np.float32)
    return ((p @ z) ** 2 - (p**2) @ (z**2)).astype(np.float32)


def jaccard_matrix(members_a: list, members_b: list) -> np.ndarray:
    """Jaccard index between every member set of ``a`` and every member set of ``b``.

    Returns
    -------
    ndarray of float64, shape (len(a), len(b))
    """
    out = np.zeros((len(members_a), len(members_b)))
    for i, a in enumerate(members_a):
        sa = set(np.asarray(a).tolist())
        for j, b in enumerate(members_b):
            sb = set(np.asarray(b).tolist())
            union = len(sa | sb)
            out[i, j] = len(sa & sb) / union if union else 0.0
    return out


def match_assemblies(members_a: list, members_b: list) -> np.ndarray:
    """Best-match Jaccard of each set in ``a`` against the sets in ``b`` (0 when ``b`` is empty).

    Returns
    -------
    ndarray of float64, shape (len(a),)
    """
    jm = jaccard_matrix(members_a, members_b)
    if jm.shape[1] == 0:
        return np.zeros(len(members_a))
    return jm.max(axis=1)
