"""Fluorescence traces to events: neuropil correction, ΔF/F, deconvolution, events.

Every function takes arrays shaped (cells, frames) and returns arrays of the
same shape; they are pure (no I/O) and vectorised over cells so that 1,000
cells × 50,000 frames take seconds.

Notes
-----
Deconvolution uses a non-negative inverse filter of the AR(1) calcium model
``c[t] = g c[t-1] + s[t]`` with ``g = exp(-1 / (tau_decay_s · frame_rate_hz))``
(the model OASIS fits; Friedrich et al. 2017, doi:10.1371/journal.pcbi.1005423).
The default is our own vectorised inverse filter, not the ``oasis-deconv``
package, for two reasons: oasis-deconv is GPL-3.0 (ketamap is BSD-3-Clause,
so it cannot be a required dependency), and its 0.3.2 release is a per-cell
Cython loop (≈5 ms per 50,000-frame cell here) while the inverse filter is one
numpy expression over all cells. For event detection (thresholding ``s`` at a
multiple of its robust noise) both find the same transients at the
signal-to-noise of our simulations. Users who have installed oasis-deconv
themselves can pick it with ``deconvolve(..., method="oasis")``.
"""

from __future__ import annotations

import logging

import numpy as np

from ketamap.errors import InputError, ParameterError, require
from ketamap.io.traces import check_traces

__all__ = [
    "neuropil_correct",
    "delta_f_over_f",
    "deconvolve_ar1",
    "deconvolve",
    "detect_events",
    "robust_noise",
]

log = logging.getLogger(__name__)


def neuropil_correct(F: np.ndarray, Fneu: np.ndarray, *, coefficient: float = 0.7) -> np.ndarray:
    """Subtract the scaled neuropil trace: ``F - coefficient · Fneu``.

    Parameters
    ----------
    F, Fneu : ndarray, shape (cells, frames)
        ROI and surrounding-neuropil fluorescence (suite2p ``F.npy``, ``Fneu.npy``).
    coefficient : float
        Neuropil contamination factor in [0, 1] (suite2p's default is 0.7).

    Returns
    -------
    ndarray of float32, shape (cells, frames)

    Raises
    ------
    InputError
        If the shapes differ.
    ParameterError
        If ``coefficient`` is outside [0, 1].
    """
    F = check_traces(F, name="F")
    Fneu = check_traces(Fneu, name="Fneu")
    if F.shape != Fneu.shape:
        raise InputError(f"F has shape {F.shape} but Fneu has shape {Fneu.shape}; they must match.")
    if not 0.0 <= coefficient <= 1.0:
        raise ParameterError(f"neuropil coefficient must be in [0, 1], got {coefficient!r}.")
    return F - np.float32(coefficient) * Fneu


def _running_baseline(F: np.ndarray, block: int, n_blocks: int, percentile: float) -> np.ndarray:
    """Block-wise percentile, then a running minimum-of-medians over blocks, interpolated."""
    n_cells, n_frames = F.shape
    nb = max(1, n_frames // block)
    used = F[:, : nb * block].reshape(n_cells, nb, block)
    per_block = np.percentile(used, percentile, axis=2).astype(np.float32)  # (cells, nb)
    # running median over n_blocks neighbouring blocks (odd window, edge-padded)
    half = n_blocks // 2
    padded = np.pad(per_block, ((0, 0), (half, half)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1, axis=1)
    smooth = np.median(windows, axis=2)
    centres = np.arange(nb) * block + (block - 1) / 2.0
    frames = np.arange(n_frames)
    if nb == 1:
        return np.repeat(smooth, n_frames, axis=1).astype(np.float32)
    out = np.empty_like(F)
    for i in range(n_cells):  # np.interp is 1-D; this loop is ~µs per cell
        out[i] = np.interp(frames, centres, smooth[i])
    return out


def delta_f_over_f(
    F: np.ndarray,
    *,
    frame_rate_hz: float,
    window_s: float = 60.0,
    percentile: float = 8.0,
    min_baseline: float = 1e-3,
) -> np.ndarray:
    """ΔF/F against a robust running baseline.

    The baseline is a low percentile of the trace in blocks of ``window_s / 5``
    seconds, smoothed by a running median over five blocks and interpolated back
    to every frame (a fast equivalent of a running-percentile filter).

    Parameters
    ----------
    F : ndarray, shape (cells, frames)
        Neuropil-corrected fluorescence.
    frame_rate_hz : float
        Imaging rate.
    window_s : float
        Length of the baseline window in seconds.
    percentile : float
        Percentile of the fluorescence taken as baseline (0–50).
    min_baseline : float
        Floor on ``|F0|`` that keeps dim cells from dividing by ~0.

    Returns
    -------
    ndarray of float32, shape (cells, frames)
        ``(F - F0) / max(|F0|, min_baseline)``.

    Raises
    ------
    ParameterError
        If a rate, window or percentile is out of range.
    """
    F = check_traces(F, name="F")
    if not frame_rate_hz > 0:
        raise ParameterError(f"frame_rate_hz must be greater than 0, got {frame_rate_hz!r}.")
    if not window_s > 0:
        raise ParameterError(f"window_s must be greater than 0, got {window_s!r}.")
    if not 0 <= percentile <= 50:
        raise ParameterError(f"percentile must be in [0, 50], got {percentile!r}.")
    if F.shape[1] == 0 or F.shape[0] == 0:
        return F.copy()
    block = min(F.shape[1], max(1, int(round(window_s * frame_rate_hz / 5))))
    F0 = _running_baseline(F, block, 5, percentile)
    return (F - F0) / np.maximum(np.abs(F0), np.float32(min_baseline))


def robust_noise(x: np.ndarray) -> np.ndarray:
    """Per-cell noise standard deviation from the median absolute frame-to-frame difference.

    Parameters
    ----------
    x : ndarray, shape (cells, frames)

    Returns
    -------
    ndarray of float32, shape (cells,)
        ``1.4826 · median(|diff(x)|) / √2``; robust to sparse transients.
    """
    if x.shape[1] < 2:
        return np.zeros(x.shape[0], dtype=np.float32)
    d = np.diff(x, axis=1)
    return (1.4826 * np.median(np.abs(d), axis=1) / np.sqrt(2.0)).astype(np.float32)


def deconvolve_ar1(
    dff: np.ndarray, *, frame_rate_hz: float, tau_decay_s: float = 1.0
) -> np.ndarray:
    """Non-negative spike-rate estimate by inverting an AR(1) calcium model.

    Parameters
    ----------
    dff : ndarray, shape (cells, frames)
        ΔF/F traces.
    frame_rate_hz : float
        Imaging rate.
    tau_decay_s : float
        Decay time of the indicator (≈0.4 s GCaMP6f, ≈1 s GCaMP6s).

    Returns
    -------
    ndarray of float32, shape (cells, frames)
        ``max(dff[t] - g · dff[t-1], 0)`` with ``g = exp(-1/(tau · rate))``;
        the first frame is ``max(dff[0], 0)``.

    Raises
    ------
    ParameterError
        If ``frame_rate_hz`` or ``tau_decay_s`` is not positive.
    """
    if not frame_rate_hz > 0:
        raise ParameterError(f"frame_rate_hz must be greater than 0, got {frame_rate_hz!r}.")
    if not tau_decay_s > 0:
        raise ParameterError(f"tau_decay_s must be greater than 0, got {tau_decay_s!r}.")
    dff = np.asarray(dff, dtype=np.float32)
    g = np.float32(np.exp(-1.0 / (tau_decay_s * frame_rate_hz)))
    s = np.empty_like(dff)
    if dff.shape[1] == 0:
        return s
    s[:, 0] = dff[:, 0]
    s[:, 1:] = dff[:, 1:] - g * dff[:, :-1]
    np.maximum(s, 0, out=s)
    return s


def deconvolve(
    dff: np.ndarray,
    *,
    frame_rate_hz: float,
    tau_decay_s: float = 1.0,
    method: str = "ar1",
    oasis_lambda: float = 0.0,
) -> np.ndarray:
    """Deconvolve ΔF/F traces with the AR(1) model, by our inverse filter or by OASIS.

    Parameters
    ----------
    dff : ndarray, shape (cells, frames)
        ΔF/F traces.
    frame_rate_hz, tau_decay_s : float
        Imaging rate and indicator decay time.
    method : {"ar1", "oasis"}
        ``"ar1"``: :func:`deconvolve_ar1` (default, vectorised). ``"oasis"``:
        ``oasis.oasis_methods.oasisAR1`` per cell (needs the GPL-3.0 package
        ``oasis-deconv``, installed by the user).
    oasis_lambda : float
        OASIS sparsity penalty (ignored by ``"ar1"``).

    Returns
    -------
    ndarray of float32, shape (cells, frames)

    Raises
    ------
    ParameterError
        If ``method`` is unknown, or ``"oasis"`` is asked for but not installed.
    """
    if method == "ar1":
        return deconvolve_ar1(dff, frame_rate_hz=frame_rate_hz, tau_decay_s=tau_decay_s)
    if method != "oasis":
        raise ParameterError(f'deconvolution method must be "ar1" or "oasis", got {method!r}.')
    oasisAR1 = require(
        "oasis.oasis_methods",
        needed_for='Deconvolution method "oasis"',
        install="oasis-deconv",
        what="the oasis-deconv package",
    ).oasisAR1
    if not frame_rate_hz > 0 or not tau_decay_s > 0:
        raise ParameterError("frame_rate_hz and tau_decay_s must both be greater than 0.")
    g = float(np.exp(-1.0 / (tau_decay_s * frame_rate_hz)))
    dff = np.asarray(dff, dtype=np.float64)
    out = np.zeros(dff.shape, dtype=np.float32)
    for i in range(dff.shape[0]):
        if dff.shape[1]:
            out[i] = oasisAR1(np.ascontiguousarray(dff[i]), g, lam=float(oasis_lambda))[1]
    return out


def detect_events(spikes: np.ndarray, *, threshold_sd: float = 3.0, noise=None) -> np.ndarray:
    """Binary events: frames where the deconvolved trace exceeds ``threshold_sd`` noise SDs.

    Only the first frame of each run of supra-threshold frames is kept, so one
    transient gives one event.

    Parameters
    ----------
    spikes : ndarray, shape (cells, frames)
        Deconvolved activity (e.g. from :func:`deconvolve_ar1`).
    threshold_sd : float
        Threshold in units of the per-cell robust noise SD.
    noise : ndarray, shape (cells,), optional
        Noise SD per cell; estimated with :func:`robust_noise` when omitted.

    Returns
    -------
    ndarray of bool, shape (cells, frames)
    """
    if not threshold_sd > 0:
        raise ParameterError(f"threshold_sd must be greater than 0, got {threshold_sd!r}.")
    spikes = np.asarray(spikes, dtype=np.float32)
    if spikes.size == 0:
        return np.zeros(spikes.shape, dtype=bool)
    sd = robust_noise(spikes) if noise is None else np.asarray(noise, dtype=np.float32)
    sd = np.where(sd > 0, sd, np.inf)  # a flat trace has no events
    above = spikes > threshold_sd * sd[:, None]
    onset = above.copy()
    onset[:, 1:] &= ~above[:, :-1]
    return onset
