import numpy as np
import pytest

from ketamap.errors import InputError, KetamapError, ParameterError
from ketamap.invivo.ensembles.traces import (
    check_traces,
    deconvolve,
    deconvolve_ar1,
    delta_f_over_f,
    detect_events,
    neuropil_correct,
    robust_noise,
)
from ketamap.simulate.calcium import simulate_calcium_traces


def test_neuropil_correction_removes_contamination():
    rng = np.random.default_rng(0)
    cell = rng.uniform(100, 200, (3, 50)).astype(np.float32)
    neu = rng.uniform(50, 80, (3, 50)).astype(np.float32)
    out = neuropil_correct(cell + 0.7 * neu, neu, coefficient=0.7)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, cell, rtol=1e-5)


def test_dff_baseline_follows_bleaching_and_is_zero_at_rest():
    t = np.arange(20000) / 15.0
    f0 = 300 * np.exp(-t / 2000.0)
    F = np.vstack([f0, 2 * f0]).astype(np.float32)
    dff = delta_f_over_f(F, frame_rate_hz=15.0, window_s=60.0, percentile=8.0)
    assert dff.shape == F.shape and dff.dtype == np.float32
    assert np.abs(dff).max() < 0.02


def test_events_recover_true_spikes():
    tr = simulate_calcium_traces(20, 6000, background_rate_hz=0.1, seed=3)
    dff = delta_f_over_f(neuropil_correct(tr.F, tr.Fneu), frame_rate_hz=15.0)
    s = deconvolve_ar1(dff, frame_rate_hz=15.0, tau_decay_s=1.0)
    g = np.exp(-1 / 15.0)
    ev = detect_events(s, threshold_sd=3.0, noise=robust_noise(dff) * np.sqrt(1 + g * g))
    true = tr.spikes.astype(bool)
    # an event within one frame of a true spike counts as a hit
    near = true | np.roll(true, 1, axis=1) | np.roll(true, 2, axis=1)
    hits = (ev & near).sum() / ev.sum()
    recall = (true & (ev | np.roll(ev, -1, axis=1) | np.roll(ev, -2, axis=1))).sum() / true.sum()
    assert hits > 0.7
    assert recall > 0.85


def test_deconvolve_method_checked():
    x = np.zeros((2, 10), np.float32)
    with pytest.raises(ParameterError, match="ar1"):
        deconvolve(x, frame_rate_hz=10.0, method="foopsi")


def test_oasis_backend_agrees_on_events():
    pytest.importorskip("oasis")
    tr = simulate_calcium_traces(5, 3000, background_rate_hz=0.1, seed=4)
    dff = delta_f_over_f(neuropil_correct(tr.F, tr.Fneu), frame_rate_hz=15.0)
    a = deconvolve(dff, frame_rate_hz=15.0, method="ar1")
    b = deconvolve(dff, frame_rate_hz=15.0, method="oasis")
    assert a.shape == b.shape
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros(5), "2-D"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([["a", "b"]]), "numeric"),
    ],
)
def test_bad_arrays_one_sentence(bad, words):
    with pytest.raises(InputError, match=words) as e:
        check_traces(bad)
    assert isinstance(e.value, KetamapError)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_shape_mismatch_and_bad_parameters():
    with pytest.raises(InputError, match="must match"):
        neuropil_correct(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ParameterError):
        delta_f_over_f(np.zeros((2, 5)), frame_rate_hz=0)
    with pytest.raises(ParameterError):
        detect_events(np.zeros((2, 5)), threshold_sd=-1)


def test_empty_and_single_cell():
    empty = np.zeros((0, 100), np.float32)
    assert delta_f_over_f(empty, frame_rate_hz=10.0).shape == (0, 100)
    assert detect_events(empty).shape == (0, 100)
    one = np.full((1, 300), 100.0, np.float32)
    d = delta_f_over_f(one, frame_rate_hz=10.0)
    assert detect_events(deconvolve_ar1(d, frame_rate_hz=10.0)).sum() == 0
