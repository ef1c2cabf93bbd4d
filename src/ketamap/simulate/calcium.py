"""Simulate calcium imaging of one field of view over several sessions, with planted ensembles.

``simulate_calcium_study(out_dir, ...)`` writes::

    out_dir/
      sessions.toml                         the sessions file (see ketamap.invivo.sessions)
      <label>/suite2p/plane0/F.npy          ROI fluorescence (ROIs, frames), float32
      <label>/suite2p/plane0/Fneu.npy       neuropil fluorescence
      <label>/suite2p/plane0/iscell.npy     (ROIs, 2) label and probability
      <label>/suite2p/plane0/stat.npy       one dict per ROI (ypix, xpix, lam, med, npix)
      <label>/suite2p/plane0/ops.npy        dict with fs, nframes, Ly, Lx, meanImg, tau
      ground_truth/ensembles.csv            session, ensemble, cell (planted members)
      ground_truth/spikes/<label>.npy       true spike counts (cells, frames), uint8
      ground_truth/scenario.json            scenario, parameters and seed

Model: every cell fires as an independent Poisson process; each ensemble has
activation times (Poisson) at which each member fires with probability
``coordination`` (the session's coordination strength). Background firing is
raised by the spikes that coordination removes, so every session has the same
mean event rate and only coordination changes. Spikes are convolved with a
GCaMP-like double-exponential kernel; the ROI trace is ``F0 (1 + ΔF/F)`` plus
Gaussian noise plus ``0.7 ×`` a slowly drifting neuropil trace.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import fftconvolve

from ketamap.errors import ParameterError
from ketamap.io.atomic import atomic_dir, atomic_path, write_json
from ketamap.params import did_you_mean

__all__ = ["CALCIUM_SCENARIOS", "simulate_calcium_traces", "simulate_calcium_study"]

log = logging.getLogger(__name__)

#: scenario -> ((label, time_h, coordination), ...); coordination 0 means no ensembles.
CALCIUM_SCENARIOS: dict[str, tuple[tuple[str, float, float], ...]] = {
    "stress-ketamine": (
        ("baseline", 0.0, 0.9),
        ("stress", 168.0, 0.3),
        ("ketamine-3h", 171.0, 0.75),
        ("ketamine-24h", 192.0, 0.85),
    ),
    "null": (("baseline", 0.0, 0.0), ("later", 24.0, 0.0)),
}


@dataclass(frozen=True)
class _Traces:
    F: np.ndarray
    Fneu: np.ndarray
    spikes: np.ndarray


def _kernel(frame_rate_hz: float, tau_rise_s: float, tau_decay_s: float) -> np.ndarray:
    t = np.arange(int(np.ceil(6 * tau_decay_s * frame_rate_hz)) + 1) / frame_rate_hz
    k = np.exp(-t / tau_decay_s) - np.exp(-t / tau_rise_s)
    return (k / k.max()).astype(np.float32)


def simulate_calcium_traces(
    n_cells: int,
    n_frames: int,
    *,
    frame_rate_hz: float = 15.0,
    ensembles: list | tuple = (),
    coordination: float = 0.9,
    ensemble_rate_hz: float = 0.05,
    background_rate_hz: float = 0.05,
    amplitude: float = 1.0,
    noise_sd: float = 0.1,
    tau_rise_s: float = 0.07,
    tau_decay_s: float = 1.0,
    neuropil_coefficient: float = 0.7,
    seed: int = 0,
) -> _Traces:
    """Simulate ROI and neuropil traces of one session (pure; no I/O).

    Parameters
    ----------
    n_cells, n_frames : int
        Array size.
    frame_rate_hz : float
        Imaging rate.
    ensembles : sequence of array of int
        Member cells of each planted ensemble.
    coordination : float
        Probability that a member fires at an ensemble activation (0–1).
    ensemble_rate_hz : float
        Activation rate of each ensemble.
    background_rate_hz : float
        Independent firing rate of every cell.
    amplitude : float
        Peak ΔF/F of one spike (log-normal jitter of 20 %).
    noise_sd : float
        SD of the ΔF/F noise per frame (signal-to-noise = amplitude / noise_sd).
    tau_rise_s, tau_decay_s : float
        Indicator kinetics (GCaMP6s-like by default).
    neuropil_coefficient : float
        Fraction of the neuropil added to each ROI.
    seed : int
        Seed of every draw.

    Returns
    -------
    _Traces
        ``F``, ``Fneu`` float32 (cells, frames) and ``spikes`` uint8 (cells, frames).
    """
    if not 0 <= coordination <= 1:
        raise ParameterError(f"coordination must be in [0, 1], got {coordination!r}.")
    rng = np.random.default_rng(seed)
    dt = 1.0 / frame_rate_hz
    spikes = (rng.random((n_cells, n_frames)) < background_rate_hz * dt).astype(np.uint8)
    for members in ensembles:
        members = np.asarray(members, dtype=int)
        act = np.nonzero(rng.random(n_frames) < ensemble_rate_hz * dt)[0]
        fire = rng.random((len(members), len(act))) < coordination
        # jitter of 0-1 frame around each activation
        jit = np.minimum(act[None, :] + rng.integers(0, 2, size=fire.shape), n_frames - 1)
        rows = np.broadcast_to(members[:, None], fire.shape)
        spikes[rows[fire], jit[fire]] = 1
        # spikes removed by weaker coordination come back as independent firing
        extra = ensemble_rate_hz * (1.0 - coordination) * dt
        spikes[members] |= (rng.random((len(members), n_frames)) < extra).astype(np.uint8)
    kernel = _kernel(frame_rate_hz, tau_rise_s, tau_decay_s)
    amp = amplitude * rng.lognormal(0.0, 0.2, size=(n_cells, n_frames)).astype(np.float32)
    dff = fftconvolve(spikes * amp, kernel[None, :], axes=1)[:, :n_frames].astype(np.float32)
    t = np.arange(n_frames) * dt
    f0 = rng.uniform(200, 600, size=(n_cells, 1)).astype(np.float32)
    bleach = np.exp(-t / (20 * max(t[-1], dt) + 1.0)).astype(np.float32)[None, :]
    drift = 1.0 + 0.1 * np.sin(2 * np.pi * t / 97.0 + rng.uniform(0, 2 * np.pi, (n_cells, 1)))
    n0 = rng.uniform(100, 300, size=(n_cells, 1)).astype(np.float32)
    Fneu = (n0 * drift + rng.normal(0, 2.0, (n_cells, n_frames))).astype(np.float32)
    F = f0 * bleach * (1 + dff + rng.normal(0, noise_sd, (n_cells, n_frames)).astype(np.float32))
    F = (F + neuropil_coefficient * Fneu).astype(np.float32)
    return _Traces(F, Fneu, spikes)


def _stat(n_cells: int, rng: np.random.Generator, size_px: int = 256) -> tuple[np.ndarray, list]:
    """Disk ROIs on a grid-jittered layout, suite2p ``stat`` style."""
    side = int(np.ceil(np.sqrt(n_cells)))
    pitch = size_px / side
    stat = []
    yy, xx = np.mgrid[-4:5, -4:5]
    disk = yy**2 + xx**2 <= 16
    mean_img = np.full((size_px, size_px), 100.0, dtype=np.float32)
    for i in range(n_cells):
        cy = int((i // side + 0.5) * pitch + rng.uniform(-1, 1))
        cx = int((i % side + 0.5) * pitch + rng.uniform(-1, 1))
        ypix = np.clip(cy + yy[disk], 0, size_px - 1)
        xpix = np.clip(cx + xx[disk], 0, size_px - 1)
        lam = np.exp(-(yy[disk] ** 2 + xx[disk] ** 2) / 8.0).astype(np.float32)
        stat.append(
            {
                "ypix": ypix,
                "xpix": xpix,
                "lam": lam / lam.sum(),
                "med": [cy, cx],
                "npix": int(disk.sum()),
                "radius": 4.0,
            }
        )
        mean_img[ypix, xpix] += 200 * lam
    return mean_img, stat


def simulate_calcium_study(
    out_dir: str | Path,
    *,
    scenario: str = "stress-ketamine",
    seed: int = 0,
    n_cells: int = 200,
    n_ensembles: int = 4,
    ensemble_size: int = 12,
    duration_s: float = 600.0,
    frame_rate_hz: float = 15.0,
    noise_sd: float = 0.1,
) -> Path:
    """Write a simulated multi-session calcium study with planted ensembles and its truth.

    Parameters
    ----------
    out_dir : path-like
        Folder to create (replaced atomically if it exists).
    scenario : str
        A key of :data:`CALCIUM_SCENARIOS`: ``"stress-ketamine"`` (baseline →
        stress, coordination falls → ketamine +3 h and +24 h, it recovers) or
        ``"null"`` (independent cells, no ensembles).
    seed : int
        Seed of every draw (sessions use ``seed + i``).
    n_cells, n_ensembles, ensemble_size : int
        Population and planted ensembles (disjoint member sets, the same in every session).
    duration_s, frame_rate_hz : float
        Length and rate of each session.
    noise_sd : float
        ΔF/F noise per frame (spike amplitude is 1).

    Returns
    -------
    Path
        ``out_dir / "sessions.toml"``.

    Raises
    ------
    ParameterError
        For an unknown scenario or ensembles that do not fit in ``n_cells``.
    """
    if scenario not in CALCIUM_SCENARIOS:
        raise ParameterError(
            f"unknown calcium scenario {scenario!r}{did_you_mean(scenario, CALCIUM_SCENARIOS)}; "
            f"choose one of {', '.join(CALCIUM_SCENARIOS)}."
        )
    planted = scenario != "null"
    if planted and n_ensembles * ensemble_size > n_cells:
        raise ParameterError(
            f"{n_ensembles} ensembles of {ensemble_size} cells do not fit in {n_cells} cells."
        )
    if not (duration_s > 0 and frame_rate_hz > 0 and noise_sd >= 0):
        raise ParameterError("duration_s and frame_rate_hz must be > 0 and noise_sd >= 0.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_cells)
    ensembles = (
        [np.sort(perm[i * ensemble_size : (i + 1) * ensemble_size]) for i in range(n_ensembles)]
        if planted
        else []
    )
    n_frames = int(round(duration_s * frame_rate_hz))
    mean_img, stat = _stat(n_cells, rng)
    out_dir = Path(out_dir)
    truth_rows = []
    toml = ["[field_of_view]", f'name = "simulated-{scenario}"', ""]
    with atomic_dir(out_dir) as tmp:
        (tmp / "ground_truth" / "spikes").mkdir(parents=True)
        for i, (label, time_h, coord) in enumerate(CALCIUM_SCENARIOS[scenario]):
            tr = simulate_calcium_traces(
                n_cells,
                n_frames,
                frame_rate_hz=frame_rate_hz,
                ensembles=ensembles,
                coordination=coord if planted else 0.0,
                noise_sd=noise_sd,
                seed=seed + 1000 * (i + 1),
            )
            plane = tmp / label / "suite2p" / "plane0"
            plane.mkdir(parents=True)
            np.save(plane / "F.npy", tr.F)
            np.save(plane / "Fneu.npy", tr.Fneu)
            np.save(
                plane / "iscell.npy", np.column_stack([np.ones(n_cells), np.full(n_cells, 0.95)])
            )
            np.save(plane / "stat.npy", np.array(stat, dtype=object), allow_pickle=True)
            ops = {
                "fs": frame_rate_hz,
                "nframes": n_frames,
                "Ly": mean_img.shape[0],
                "Lx": mean_img.shape[1],
                "meanImg": mean_img,
                "tau": 1.0,
                "neucoeff": 0.7,
            }
            np.save(plane / "ops.npy", ops, allow_pickle=True)
            np.save(tmp / "ground_truth" / "spikes" / f"{label}.npy", tr.spikes)
            if coord > 0:
                for e, members in enumerate(ensembles):
                    truth_rows += [
                        {"session": label, "ensemble": e, "cell": int(c), "coordination": coord}
                        for c in members
                    ]
            toml += [
                "[[sessions]]",
                f'label = "{label}"',
                f"time_h = {time_h}",
                f'data = "{label}/suite2p/plane0"',
                "",
            ]
        truth = pd.DataFrame(truth_rows, columns=["session", "ensemble", "cell", "coordination"])
        truth.to_csv(tmp / "ground_truth" / "ensembles.csv", index=False)
        write_json(
            {
                "scenario": scenario,
                "seed": seed,
                "n_cells": n_cells,
                "n_ensembles": n_ensembles if planted else 0,
                "ensemble_size": ensemble_size,
                "duration_s": duration_s,
                "frame_rate_hz": frame_rate_hz,
                "noise_sd": noise_sd,
                "sessions": [list(s) for s in CALCIUM_SCENARIOS[scenario]],
            },
            tmp / "ground_truth" / "scenario.json",
        )
        with atomic_path(tmp / "sessions.toml") as p:
            p.write_text("\n".join(toml))
    log.info("simulated calcium study %r in %s", scenario, out_dir)
    return out_dir / "sessions.toml"
