import numpy as np
import pytest

from ketamap.invivo.ensembles.assemblies import (
    activation_strength,
    bin_activity,
    coactive_bins,
    coactivity_matrix,
    detect_assemblies,
    jaccard_matrix,
    marchenko_pastur_threshold,
    match_assemblies,
    poisson_binomial_sf,
)
from ketamap.invivo.ensembles.session import EnsembleParams, analyse_session
from ketamap.simulate.calcium import simulate_calcium_traces


def _planted(n_cells=120, size=10, k=3, seed=0):
    perm = np.random.default_rng(seed).permutation(n_cells)
    return [np.sort(perm[i * size : (i + 1) * size]) for i in range(k)]


def test_poisson_binomial_matches_binomial():
    from scipy.stats import binom

    sf = poisson_binomial_sf(np.full(30, 0.1))
    np.testing.assert_allclose(sf[:31], binom.sf(np.arange(31) - 1, 30, 0.1), atol=1e-12)


def test_coactive_bins_null_rate_below_alpha():
    rng = np.random.default_rng(1)
    active = rng.random((80, 20000)) < rng.uniform(0.01, 0.1, (80, 1))
    co = coactive_bins(active, alpha=0.01)
    assert co["expected_fraction"] <= 0.01
    assert co["fraction"] <= 0.015


def test_coactive_bins_detect_synchrony():
    rng = np.random.default_rng(2)
    active = rng.random((50, 5000)) < 0.03
    sync = rng.random(5000) < 0.05
    active[:15, sync] = True
    co = coactive_bins(active, alpha=0.01)
    assert co["fraction"] > 0.04
    assert co["significant"][sync].mean() > 0.9


def test_assemblies_recover_planted_members_from_spikes():
    ens = _planted()
    tr = simulate_calcium_traces(120, 9000, ensembles=ens, coordination=0.9, seed=5)
    asm = detect_assemblies(bin_activity(tr.spikes, bin_frames=3))
    assert asm.n == 3
    assert match_assemblies(ens, asm.members).min() >= 0.8
    act = activation_strength(bin_activity(tr.spikes, bin_frames=3), asm.patterns)
    assert act.shape == (3, 3000) and act.dtype == np.float32


def test_planted_ensembles_recovered_from_fluorescence_default_snr():
    """Issue 7: best-match Jaccard >= 0.8 at the default signal-to-noise (noise_sd 0.1)."""
    ens = _planted(200, 12, 4, seed=7)
    tr = simulate_calcium_traces(200, 9000, ensembles=ens, coordination=0.9, seed=8)
    res = analyse_session(tr.F, tr.Fneu, frame_rate_hz=15.0)
    best = match_assemblies(ens, res.assemblies.members)
    assert res.assemblies.n == 4
    assert best.min() >= 0.8, best


def test_null_false_ensemble_rate_at_most_5_percent():
    """Issue 7: under the null, a false ensemble in <= 5 % of 40 simulated runs.

    100 cells, 5 min at 15 Hz. Shorter, smaller recordings are worse: 60 cells for
    2.5 min gave 4-5.5 % over 200 runs (see docs/ensembles.md).
    """
    params = EnsembleParams()
    false = 0
    for seed in range(40):
        tr = simulate_calcium_traces(100, 4500, ensembles=[], seed=100 + seed)
        res = analyse_session(tr.F, tr.Fneu, frame_rate_hz=15.0, params=params)
        false += res.assemblies.n > 0
    assert false <= 2, f"{false} of 40 null runs had a false ensemble"


def test_mp_threshold_and_tracy_widom_margin():
    assert marchenko_pastur_threshold(100, 10000, tracy_widom=False) == pytest.approx(1.21)
    assert marchenko_pastur_threshold(100, 10000) > 1.21


def test_jaccard():
    jm = jaccard_matrix([np.array([1, 2, 3])], [np.array([2, 3, 4]), np.array([9])])
    np.testing.assert_allclose(jm, [[0.5, 0.0]])
    assert match_assemblies([np.array([1])], []).tolist() == [0.0]


@pytest.mark.parametrize("n_cells", [0, 1])
def test_empty_and_single_cell_inputs(n_cells):
    F = np.full((n_cells, 600), 100.0, np.float32) + np.random.default_rng(0).normal(
        0, 1, (n_cells, 600)
    ).astype(np.float32)
    res = analyse_session(F, None, frame_rate_hz=10.0)
    assert res.assemblies.n == 0
    assert res.assemblies.patterns.shape == (0, n_cells)
    assert res.summary["n_cells"] == n_cells
    assert len(res.per_cell) == n_cells
    assert coactivity_matrix(np.zeros((n_cells, 10))).shape == (n_cells, n_cells)
