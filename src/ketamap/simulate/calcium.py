"""Simulate calcium imaging of one field of view over several sessions, with planted ensembles.

``simulate_calcium_study(out_dir, ...)`` writes::

    out_dir/
      sessions.toml                         the sessions file (see ketamap.manifest.ensembles)
      <label>/suite2p/plane0/F.npy          ROI fluorescence (ROIs, frames), float32
      <label>/suite2p/plane0/Fneu.npy       neuropil fluorescence
      <label>/suite2p/plane0/iscell.npy     (ROIs, 2) label and probability
      <label>/suite2p/plane0/stat.npy       one dict per ROI (ypix, xpix, lam, med, npix)
      <label>/suite2p/plane0/ops.npy        dict with fs, nframes, Ly, Lx, meanImg, tau
      ground_truth/ensembles.csv            session, ensemble, cell, global_cell (planted members)
      ground_truth/cell_map.csv             session, cell, global_cell (true identity of each ROI)
      ground_truth/drift.csv                session, rotation_deg, shift_y_px, shift_x_px, n_rois
      ground_truth/spikes/<label>.npy       true spike counts (ROIs, frames), uint8
      ground_truth/scenario.json            scenario, parameters and seed

Model: every cell fires as an independent Poisson process; each ensemble has
activation times (Poisson) at which each member fires with probability
``coordination`` (the session's coordination strength). Background firing is
raised by the spikes that coordination removes, so every session has the same
mean event rate and only coordination changes. Spikes are convolved with a
GCaMP-like double-exponential kernel; the ROI trace is ``F0 (1 + ΔF/F)`` plus
Gaussian noise plus ``0.7 ×`` a slowly drifting neuropil trace.

Imaging geometry: cells sit on a jittered grid in a 256 × 256 px field with
Gaussian-weighted disk footprints (radius 3.5–5 px). The mean image shows a
smooth tissue texture, dark blood vessels and every cell body. With
``drift=True`` (default) every session after the first sees the tissue
rotated (≤ 2.5°), shifted (≤ 8 px per axis) and warped non-rigidly (1.5 px
sine); each ROI's centre jitters by 0.4 px SD and its radius by ±15 % (the
segmentation differs between sessions); each cell's ROI is missed
with probability 0.05 per session, cells pushed off the field are missed too,
and the ROI order is shuffled. ``cell`` in every file is the ROI's index in
that session's input; ``global_cell`` is the true identity.
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

__all__ = [
    "CALCIUM_SCENARIOS",
    "simulate_calcium_traces",
    "simulate_calcium_study",
    "simulate_calcium_cohort",
]

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


def simulate_calcium_cohort(
    n_mice: int,
    *,
    sessions: tuple[str, ...] = ("baseline", "later"),
    effect: dict | None = None,
    n_cells: int = 80,
    n_ensembles: int = 3,
    ensemble_size: int = 12,
    duration_s: float = 300.0,
    frame_rate_hz: float = 15.0,
    coordination: float = 0.6,
    mouse_sd: float = 0.15,
    session_sd: float = 0.08,
    noise_sd: float = 0.1,
    seed: int = 0,
):
    """Simulate one field of view per mouse in several sessions, mice differing (pure).

    Every mouse has its own cells, ensembles and coordination: its coordination is
    ``coordination + N(0, mouse_sd)``; in each session it moves by ``effect[session]``
    (0 by default: the null) plus ``N(0, session_sd)``, the day-to-day variation that
    all cells of that mouse share. The mouse's background firing rate varies by a
    log-normal factor (SD 0.2) and each session's ΔF/F noise by one of SD 0.15 (imaging
    quality from day to day). Coordination is clipped to [0.02, 0.98].

    Parameters
    ----------
    n_mice : int
        Mice (one field of view each).
    sessions : tuple of str
        Session labels in time order.
    effect : dict, optional
        Session label -> change of coordination (e.g. ``{"later": -0.2}``).
    n_cells, n_ensembles, ensemble_size : int
        Cells per field, planted ensembles and members per ensemble.
    duration_s, frame_rate_hz : float
        Length and rate of every session.
    coordination, mouse_sd, session_sd : float
        Mean coordination, its SD across mice and within a mouse across sessions.
    noise_sd : float
        Mean ΔF/F noise SD (spike amplitude 1).
    seed : int
        Seed of every draw.

    Yields
    ------
    dict
        One per mouse and session: ``mouse``, ``session``, ``coordination`` (the
        planted value) and ``traces`` (``F``, ``Fneu``, ``spikes``; see
        :func:`simulate_calcium_traces`).

    Raises
    ------
    ParameterError
        If ``n_mice < 1``, a session is listed twice or ``effect`` names an unknown
        session.
    """
    if n_mice < 1:
        raise ParameterError(f"n_mice must be at least 1, got {n_mice!r}.")
    if len(set(sessions)) != len(sessions) or not sessions:
        raise ParameterError(f"sessions must be distinct labels, got {list(sessions)}.")
    effect = dict(effect or {})
    unknown = set(effect) - set(sessions)
    if unknown:
        raise ParameterError(
            f"effect names unknown session(s) {', '.join(sorted(map(str, unknown)))}"
            f"{did_you_mean(str(next(iter(unknown))), list(sessions))}."
        )
    n_frames = int(round(duration_s * frame_rate_hz))
    for m in range(n_mice):
        rng = np.random.default_rng([seed, m])
        perm = rng.permutation(n_cells)
        ensembles = [perm[i * ensemble_size : (i + 1) * ensemble_size] for i in range(n_ensembles)]
        base = coordination + rng.normal(0.0, mouse_sd)
        rate = 0.05 * rng.lognormal(0.0, 0.2)
        for j, label in enumerate(sessions):
            coord = float(np.clip(base + effect.get(label, 0.0) + rng.normal(0, session_sd),
                                  0.02, 0.98))  # fmt: skip
            traces = simulate_calcium_traces(
                n_cells,
                n_frames,
                frame_rate_hz=frame_rate_hz,
                ensembles=ensembles,
                coordination=coord,
                background_rate_hz=rate,
                noise_sd=noise_sd * float(rng.lognormal(0.0, 0.15)),
                seed=int(rng.integers(2**31)) + j,
            )
            yield {"mouse": f"m{m + 1}", "session": label, "coordination": coord,
                   "traces": traces}  # fmt: skip


def _layout(n_cells: int, rng: np.random.Generator, size_px: int = 256) -> np.ndarray:
    """World (y, x) centroids of every cell on a grid-jittered layout."""
    side = int(np.ceil(np.sqrt(n_cells)))
    pitch = size_px / side
    i = np.arange(n_cells)
    cy = (i // side + 0.5) * pitch + rng.uniform(-1.5, 1.5, n_cells)
    cx = (i % side + 0.5) * pitch + rng.uniform(-1.5, 1.5, n_cells)
    return np.column_stack([cy, cx])


def _world_image(
    centroids: np.ndarray, radii: np.ndarray, rng: np.random.Generator, size_px: int, margin_px: int
) -> np.ndarray:
    """Tissue seen by the mean image, on a canvas ``margin_px`` wider on every side.

    Smooth background texture, a few dark blood vessels and every cell body
    (detected or not) as a bright blob.
    """
    from scipy import ndimage

    n = size_px + 2 * margin_px
    tex = ndimage.gaussian_filter(rng.normal(0, 1, (n, n)), 4.0)
    img = 100.0 + 20.0 * tex / tex.std()
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    for _ in range(3):  # vessels: dark curved bands
        y0, slope, bend = rng.uniform(0, n), rng.uniform(-1, 1), rng.uniform(-0.004, 0.004)
        d = np.abs(yy - (y0 + slope * (xx - n / 2) + bend * (xx - n / 2) ** 2))
        img -= 40.0 * np.exp(-(d**2) / (2 * rng.uniform(1.5, 3.0) ** 2))
    cells = np.zeros((n, n), np.float32)
    brightness = rng.uniform(80, 200, len(centroids))
    for (cy, cx), r, b in zip(centroids + margin_px, radii, brightness, strict=True):
        y0, y1 = int(max(cy - 2 * r, 0)), int(min(cy + 2 * r + 1, n))
        x0, x1 = int(max(cx - 2 * r, 0)), int(min(cx + 2 * r + 1, n))
        d2 = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        cells[y0:y1, x0:x1] += b * np.exp(-d2 / (2 * (0.6 * r) ** 2))
    return (img + cells).astype(np.float32)


def _session_transform(
    drift: bool, max_shift_px: float, max_rotation_deg: float, rng: np.random.Generator, first: bool
) -> tuple[float, np.ndarray]:
    if not drift or first:
        return 0.0, np.zeros(2)
    return (
        float(rng.uniform(-max_rotation_deg, max_rotation_deg)),
        rng.uniform(-max_shift_px, max_shift_px, 2),
    )


def _session_view(
    world: np.ndarray,
    margin_px: int,
    size_px: int,
    theta_deg: float,
    shift: np.ndarray,
    rng: np.random.Generator,
    warp_px: float = 0.0,
):
    """Mean image of one session and the map world (y, x) -> session (y, x).

    The map is a rotation about the field's centre, a shift and a smooth
    non-rigid warp of amplitude ``warp_px`` (one sine period over the field).
    """
    from scipy import ndimage

    t = np.deg2rad(theta_deg)
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.full(2, (size_px - 1) / 2)
    phase = rng.uniform(0, 2 * np.pi, 2)

    def warp(q):  # displacement at session coordinates q, shape (n, 2)
        k = 2 * np.pi / size_px
        return warp_px * np.column_stack(
            [np.sin(k * q[:, 1] + phase[0]), np.sin(k * q[:, 0] + phase[1])]
        )

    def to_session(p):
        rigid = (np.asarray(p, float) - c) @ R.T + c + shift
        q = rigid.copy()
        for _ in range(5):  # q = rigid(p) + warp(q), by fixed-point iteration
            q = rigid + warp(q)
        return q

    # session pixel q shows world point R^-1 (q - warp(q) - c - shift) + c (+ margin)
    qy, qx = np.mgrid[0:size_px, 0:size_px]
    q = np.column_stack([qy.ravel(), qx.ravel()]).astype(float)
    w = (q - warp(q) - c - shift) @ R + c + margin_px
    img = ndimage.map_coordinates(world, w.T, order=1, mode="nearest").reshape(size_px, size_px)
    img = img + rng.normal(0, 3.0, img.shape)
    return img.astype(np.float32), to_session


def _footprint(center: np.ndarray, radius: float, size_px: int, rng: np.random.Generator):
    """suite2p-style ``stat`` entry of a disk ROI at a sub-pixel centre, or None if off-field."""
    cy, cx = center
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[
        int(np.floor(cy)) - r : int(np.floor(cy)) + r + 2,
        int(np.floor(cx)) - r : int(np.floor(cx)) + r + 2,
    ]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    inside = d2 <= radius**2
    total = int(inside.sum())
    inside &= (yy >= 0) & (yy < size_px) & (xx >= 0) & (xx < size_px)
    if inside.sum() < 0.6 * total:  # mostly outside the field of view: not detected
        return None
    lam = np.exp(-d2[inside] / (2 * (0.6 * radius) ** 2)) * rng.lognormal(0, 0.15, inside.sum())
    ypix, xpix = yy[inside], xx[inside]
    return {
        "ypix": ypix.astype(np.int32),
        "xpix": xpix.astype(np.int32),
        "lam": (lam / lam.sum()).astype(np.float32),
        "med": [int(np.median(ypix)), int(np.median(xpix))],
        "npix": int(inside.sum()),
        "radius": float(radius),
    }


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
    drift: bool = True,
    max_shift_px: float = 8.0,
    max_rotation_deg: float = 2.5,
    fraction_lost: float = 0.05,
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
    drift : bool
        Move the field of view between sessions (every session after the first
        is rotated by up to ``max_rotation_deg`` and shifted by up to
        ``max_shift_px`` per axis), drop each cell's ROI with probability
        ``fraction_lost`` per session (it is then "gained" in the others) and
        shuffle the ROI order of every session. False keeps one ROI set, in
        one order, in every session.
    max_shift_px, max_rotation_deg, fraction_lost : float
        Size of the drift.

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
    if not (0 <= fraction_lost < 1 and max_shift_px >= 0 and max_rotation_deg >= 0):
        raise ParameterError(
            "fraction_lost must be in [0, 1) and max_shift_px, max_rotation_deg >= 0."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_cells)
    ensembles = (
        [np.sort(perm[i * ensemble_size : (i + 1) * ensemble_size]) for i in range(n_ensembles)]
        if planted
        else []
    )
    n_frames = int(round(duration_s * frame_rate_hz))
    size_px, margin_px = 256, 32
    centroids = _layout(n_cells, rng, size_px)
    radii = rng.uniform(3.5, 5.0, n_cells)
    world = _world_image(centroids, radii, rng, size_px, margin_px)
    out_dir = Path(out_dir)
    truth_rows, map_rows, drift_rows = [], [], []
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
            srng = np.random.default_rng([seed, i, 7])
            theta, shift = _session_transform(drift, max_shift_px, max_rotation_deg, srng, i == 0)
            mean_img, to_session = _session_view(
                world, margin_px, size_px, theta, shift, srng, warp_px=1.5 if drift and i else 0.0
            )
            centers = to_session(centroids)
            if drift:  # segmentation differs a little from session to session
                centers = centers + srng.normal(0, 0.4, centers.shape)
                scale = srng.uniform(0.85, 1.15, n_cells)
            else:
                scale = np.ones(n_cells)
            stat, present = [], []
            for c in range(n_cells):
                if drift and srng.random() < fraction_lost:
                    continue
                st = _footprint(centers[c], radii[c] * scale[c], size_px, srng)
                if st is not None:
                    stat.append(st)
                    present.append(c)
            present = np.asarray(present, dtype=int)
            order = srng.permutation(len(present)) if drift else np.arange(len(present))
            world_ids = present[order]  # world cell of each ROI, in ROI order
            stat = [stat[j] for j in order]
            n_roi = len(world_ids)
            plane = tmp / label / "suite2p" / "plane0"
            plane.mkdir(parents=True)
            np.save(plane / "F.npy", tr.F[world_ids])
            np.save(plane / "Fneu.npy", tr.Fneu[world_ids])
            np.save(plane / "iscell.npy", np.column_stack([np.ones(n_roi), np.full(n_roi, 0.95)]))
            np.save(plane / "stat.npy", np.array(stat, dtype=object), allow_pickle=True)
            ops = {
                "fs": frame_rate_hz,
                "nframes": n_frames,
                "Ly": size_px,
                "Lx": size_px,
                "meanImg": mean_img,
                "tau": 1.0,
                "neucoeff": 0.7,
            }
            np.save(plane / "ops.npy", ops, allow_pickle=True)
            np.save(tmp / "ground_truth" / "spikes" / f"{label}.npy", tr.spikes[world_ids])
            roi_of = {int(w): r for r, w in enumerate(world_ids)}
            map_rows += [
                {"session": label, "cell": r, "global_cell": int(w)}
                for r, w in enumerate(world_ids)
            ]
            drift_rows.append(
                {
                    "session": label,
                    "rotation_deg": theta,
                    "shift_y_px": float(shift[0]),
                    "shift_x_px": float(shift[1]),
                    "n_rois": n_roi,
                }
            )
            if coord > 0:
                for e, members in enumerate(ensembles):
                    truth_rows += [
                        {
                            "session": label,
                            "ensemble": e,
                            "cell": roi_of[int(c)],
                            "global_cell": int(c),
                            "coordination": coord,
                        }
                        for c in members
                        if int(c) in roi_of
                    ]
            toml += [
                "[[sessions]]",
                f'label = "{label}"',
                f"time_h = {time_h}",
                f'data = "{label}/suite2p/plane0"',
                "",
            ]
        truth = pd.DataFrame(
            truth_rows, columns=["session", "ensemble", "cell", "global_cell", "coordination"]
        )
        truth.to_csv(tmp / "ground_truth" / "ensembles.csv", index=False)
        pd.DataFrame(map_rows, columns=["session", "cell", "global_cell"]).to_csv(
            tmp / "ground_truth" / "cell_map.csv", index=False
        )
        pd.DataFrame(drift_rows).to_csv(tmp / "ground_truth" / "drift.csv", index=False)
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
                "drift": drift,
                "max_shift_px": max_shift_px,
                "max_rotation_deg": max_rotation_deg,
                "fraction_lost": fraction_lost,
                "sessions": [list(s) for s in CALCIUM_SCENARIOS[scenario]],
            },
            tmp / "ground_truth" / "scenario.json",
        )
        with atomic_path(tmp / "sessions.toml") as p:
            p.write_text("\n".join(toml))
    log.info("simulated calcium study %r in %s", scenario, out_dir)
    return out_dir / "sessions.toml"
