"""The session comparison of coactive bins: calibrated on autocorrelated nulls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sstats

from ketamap.invivo.ensembles.assemblies import block_permutation_test


def _markov(rng, n, rate, stay):
    """0/1 series with stationary rate ``rate`` and P(on -> on) = ``stay`` (bursts)."""
    p01 = rate * (1 - stay) / (1 - rate)
    u = rng.random(n)
    x = np.zeros(n, dtype=bool)
    x[0] = u[0] < rate
    for t in range(1, n):
        x[t] = u[t] < (stay if x[t - 1] else p01)
    return x


def _z_test(a, b):
    p1, p2, n1, n2 = a.mean(), b.mean(), len(a), len(b)
    pool = (p1 * n1 + p2 * n2) / (n1 + n2)
    return 2 * sstats.norm.sf(abs(p2 - p1) / np.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2)))


@pytest.mark.parametrize("stay", [0.5, 0.8])
def test_block_test_is_calibrated_where_the_bin_test_is_not(stay):
    """Two sessions of 6,000 bins with the same bursty coactivity (5 % of bins): the block
    permutation test keeps its false-positive rate, the per-bin z-test does not."""
    rng = np.random.default_rng(int(stay * 10))
    p_block, p_z = [], []
    for i in range(300):
        a, b = _markov(rng, 6000, 0.05, stay), _markov(rng, 6000, 0.05, stay)
        p_block.append(block_permutation_test(a, b, n_permutations=999, seed=i)["p_value"])
        p_z.append(_z_test(a, b))
    fpr_block = float(np.mean(np.asarray(p_block) < 0.05))
    fpr_z = float(np.mean(np.asarray(p_z) < 0.05))
    assert 0.02 <= fpr_block <= 0.08, fpr_block
    assert fpr_z >= 0.15, fpr_z  # what the pseudo-replicated test reported


def test_block_test_detects_a_real_change():
    rng = np.random.default_rng(3)
    hits = [
        block_permutation_test(
            _markov(rng, 6000, 0.05, 0.5), _markov(rng, 6000, 0.08, 0.5), n_permutations=999
        )["p_value"]
        < 0.05
        for _ in range(100)
    ]
    assert np.mean(hits) >= 0.8
