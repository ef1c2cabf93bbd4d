"""Simulated longitudinal two-photon imaging of dendritic spines, with ground truth.

Each dendrite is a gently curved shaft in a 2D field (a maximum projection) or
a 3D stack, carrying spines: a thin, dim neck and a Gaussian head whose centre
lies 0.5–2 µm (``spine_length_um``) from the shaft surface, with head
diameters of 0.5–1.2 µm; some spines are dim, some thin. Every session sees
the same dendrite through a new rigid drift (translation, rotation) and a
small smooth deformation, plus out-of-focus haze, background, shot noise and
read noise.

Spines are born and die following a scenario schedule (one birth and one
death fraction per interval):

``stress-ketamine``
    ``baseline-1`` → ``baseline-2`` (stable turnover) → ``stress`` (elimination
    rises, formation falls) → ``ketamine-24h`` (formation rises; a share
    ``return_share`` of the new spines forms within ``return_jitter_um`` of a
    site where a spine was eliminated earlier).
``no-return``
    The same schedule, but new spines are placed uniformly along the free
    stretches of the dendrite: the control of the return-to-lost-sites test.

:func:`simulate_dendrite` is the pure core (geometry and images of one
dendrite in every session, truth table); :func:`simulate_spine_study` writes a
study folder that ``ketamap spines`` reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ketamap.errors import ParameterError
from ketamap.io.atomic import atomic_dir, write_json, write_table
from ketamap.params import bounds, did_you_mean, to_dict, validate

__all__ = [
    "SPINE_SCENARIOS",
    "SpineSimParams",
    "SimulatedDendrite",
    "simulate_dendrite",
    "truth_rates",
    "truth_pooled_rates",
    "simulate_spine_study",
]

log = logging.getLogger(__name__)

#: scenario -> sessions as (label, time_h, formation fraction, elimination fraction, returns)
#: where the fractions apply to the interval ending at that session.
SPINE_SCENARIOS: dict[str, list[tuple[str, float, float, float, bool]]] = {
    "stress-ketamine": [
        ("baseline-1", 0.0, 0.0, 0.0, False),
        ("baseline-2", 72.0, 0.06, 0.06, False),
        ("stress", 576.0, 0.03, 0.25, False),
        ("ketamine-24h", 600.0, 0.25, 0.05, True),
    ],
    "no-return": [
        ("baseline-1", 0.0, 0.0, 0.0, False),
        ("baseline-2", 72.0, 0.06, 0.06, False),
        ("stress", 576.0, 0.03, 0.25, False),
        ("ketamine-24h", 600.0, 0.25, 0.05, False),
    ],
}


@dataclass(frozen=True)
class SpineSimParams:
    """Parameters of the spine simulator (units in the names)."""

    pixel_size_um: float = field(default=0.15, metadata=bounds(ge=0.05, le=0.5))
    image_shape_px: tuple[int, int] = field(default=(240, 440), metadata=bounds(ge=32))
    n_z: int = field(default=1, metadata=bounds(ge=1, doc="planes; 1 writes 2D projections"))
    z_step_um: float = field(default=0.5, metadata=bounds(gt=0))
    axial_sigma_um: float = field(default=0.8, metadata=bounds(gt=0))
    dendrite_length_um: float = field(default=50.0, metadata=bounds(ge=10))
    shaft_radius_um: float = field(default=0.5, metadata=bounds(gt=0, doc="surface radius"))
    shaft_sigma_um: float = field(default=0.35, metadata=bounds(gt=0, doc="shaft profile"))
    psf_sigma_um: float = field(default=0.18, metadata=bounds(gt=0))
    spine_density_per_um: float = field(default=0.4, metadata=bounds(gt=0, le=1.5))
    min_spacing_um: float = field(default=1.2, metadata=bounds(gt=0, doc="same side"))
    end_margin_um: float = field(default=3.0, metadata=bounds(ge=0))
    spine_length_um: tuple[float, float] = field(default=(0.5, 2.0), metadata=bounds(gt=0))
    head_diameter_um: tuple[float, float] = field(default=(0.5, 1.2), metadata=bounds(gt=0))
    dim_fraction: float = field(default=0.25, metadata=bounds(ge=0, le=1))
    dim_brightness: tuple[float, float] = field(default=(0.45, 0.65), metadata=bounds(gt=0))
    snr: float = field(default=10.0, metadata=bounds(gt=0, doc="unit head peak / bg noise SD"))
    background_photons: float = field(default=20.0, metadata=bounds(ge=0))
    read_noise_photons: float = field(default=2.0, metadata=bounds(ge=0))
    out_of_focus: float = field(default=0.3, metadata=bounds(ge=0))
    drift_um: float = field(default=2.0, metadata=bounds(ge=0, doc="SD of translation"))
    rotation_deg: float = field(default=1.0, metadata=bounds(ge=0, le=10, doc="SD"))
    deformation_um: float = field(default=0.2, metadata=bounds(ge=0))
    return_share: float = field(default=0.6, metadata=bounds(ge=0, le=1))
    return_jitter_um: float = field(default=0.3, metadata=bounds(ge=0))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class SimulatedDendrite:
    """One simulated dendrite across sessions.

    Attributes
    ----------
    images : list of ndarray
        One uint16 image per session, (y, x) or (z, y, x).
    spines : DataFrame
        One row per spine and session where it is present (see
        :func:`simulate_dendrite`).
    transforms : DataFrame
        ``session, rotation_deg, shift_y_um, shift_x_um`` per session.
    lifetimes : DataFrame
        One row per spine ever simulated: ``spine_id, born, died``, the
        session where the spine is first present (the first session for the
        spines already there) and the first session where it is gone (None
        for a spine present in the last session). The simulator's own record
        of births and deaths, from which :func:`truth_rates` counts.
    """

    images: list
    spines: pd.DataFrame
    transforms: pd.DataFrame
    lifetimes: pd.DataFrame | None = None


def _centreline(length_um: float, rng: np.random.Generator, step_um: float = 0.05):
    """Draw a gently curved centreline in world µm (y, x), resampled every ``step_um``."""
    u = np.linspace(0, length_um * 1.2, 4000)
    amp, lam, phase = rng.uniform(1.0, 3.0), rng.uniform(25, 60), rng.uniform(0, 2 * np.pi)
    y = amp * np.sin(2 * np.pi * u / lam + phase)
    pts = np.column_stack([y, u])
    seg = np.hypot(*np.diff(pts, axis=0).T)
    s = np.concatenate([[0], np.cumsum(seg)])
    grid = np.arange(0, length_um + step_um / 2, step_um)
    line = np.column_stack([np.interp(grid, s, pts[:, 0]), np.interp(grid, s, pts[:, 1])])
    tang = np.gradient(line, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    normal = np.column_stack([tang[:, 1], -tang[:, 0]])  # (y, x) rotated by -90°
    return grid, line, normal


def _new_spine(s_um, side, p, rng, *, returned=False):
    dim = rng.random() < p.dim_fraction
    return {
        "s_um": float(s_um),
        "side": int(side),
        "angle_deg": float(rng.uniform(-25, 25)),
        "length_um": float(rng.uniform(*p.spine_length_um)),
        "head_diameter_um": float(rng.uniform(*p.head_diameter_um)),
        "brightness": float(rng.uniform(*p.dim_brightness) if dim else rng.uniform(0.8, 1.2)),
        "z_offset_um": float(rng.normal(0, 0.6)),
        "returned": bool(returned),
    }


def _head_xy(sp, grid, line, normal, p):
    i = int(np.clip(np.searchsorted(grid, sp["s_um"]), 0, len(grid) - 1))
    a = np.deg2rad(sp["angle_deg"])
    n = normal[i] * sp["side"]
    t = np.array([-n[1], n[0]])
    direction = np.cos(a) * n + np.sin(a) * t
    base = line[i] + n * p.shaft_radius_um
    head = line[i] + direction * (p.shaft_radius_um + sp["length_um"])
    return base, head


def _fits(s_um, side, head, spines, heads, p) -> bool:
    for sp, h in zip(spines, heads, strict=True):
        if sp["side"] == side and abs(sp["s_um"] - s_um) < p.min_spacing_um:
            return False
        if np.hypot(*(h - head)) < p.min_spacing_um:
            return False
    return True


def _place(spines, heads, p, rng, grid, line, normal, *, near=None, returned=False):
    """Add one spine at a free site (near one of ``near`` = [(s, side)] if given)."""
    lo, hi = p.end_margin_um, p.dendrite_length_um - p.end_margin_um
    for _ in range(400):
        if near:
            s0, side = near[rng.integers(len(near))]
            s = float(np.clip(s0 + rng.uniform(-p.return_jitter_um, p.return_jitter_um), lo, hi))
        else:
            s, side = float(rng.uniform(lo, hi)), int(rng.choice([-1, 1]))
        sp = _new_spine(s, side, p, rng, returned=returned)
        _, head = _head_xy(sp, grid, line, normal, p)
        if _fits(s, side, head, spines, heads, p):
            return sp, head
    return None, None


def _render_line(shape, pts_px, weight, sigma_px):
    """Blurred polyline: ``pts_px`` (n, 2) dense samples, ``weight`` per sample."""
    img = np.zeros(shape, np.float64)
    y, x = pts_px[:, 0], pts_px[:, 1]
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (1, 0, fy * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < shape[0]) & (xx >= 0) & (xx < shape[1])
        np.add.at(img, (yy[ok], xx[ok]), (w * weight)[ok])
    return ndi.gaussian_filter(img, sigma_px)


def _gauss_spot(img, centre_px, sigma_px, amp):
    r = int(np.ceil(4 * sigma_px))
    cy, cx = int(round(centre_px[0])), int(round(centre_px[1]))
    y0, y1 = max(cy - r, 0), min(cy + r + 1, img.shape[-2])
    x0, x1 = max(cx - r, 0), min(cx + r + 1, img.shape[-1])
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    spot = amp * np.exp(-((yy - centre_px[0]) ** 2 + (xx - centre_px[1]) ** 2) / (2 * sigma_px**2))
    return (slice(y0, y1), slice(x0, x1)), spot


def _deform(pts, coef, amp):
    """Smooth displacement field (µm) applied to world points (n, 2)."""
    k1, k2, ph = coef
    dy = amp * np.sin(k1 * pts[:, 1] + ph[0]) * np.cos(k2 * pts[:, 0] + ph[1])
    dx = amp * np.cos(k1 * pts[:, 0] + ph[2]) * np.sin(k2 * pts[:, 1] + ph[3])
    return pts + np.column_stack([dy, dx])


def _render_session(present, grid, line, normal, p, rng, centre_um, world_to_px, haze):
    shape = tuple(p.image_shape_px)
    px = p.pixel_size_um
    unit = p.snr * np.sqrt(p.background_photons + p.read_noise_photons**2)
    dense = world_to_px(line)
    step_px = np.hypot(*np.diff(dense, axis=0).T).mean()
    sig_shaft = np.hypot(p.shaft_sigma_um, p.psf_sigma_um) / px
    shaft_amp = 1.0 * (1 + 0.15 * np.sin(grid / 7.0))
    shaft = _render_line(
        shape, dense, shaft_amp * step_px * np.sqrt(2 * np.pi) * sig_shaft, sig_shaft
    )
    necks = np.zeros(shape)
    heads = []
    rows = []
    for sp in present:
        base, head = _head_xy(sp, grid, line, normal, p)
        seg = np.linspace(base, head, 40)
        seg_px = world_to_px(seg)
        sig_neck = p.psf_sigma_um / px
        w = 0.15 * sp["brightness"] * np.hypot(*(seg_px[-1] - seg_px[0])) / 40
        necks += _render_line(
            shape, seg_px, np.full(40, w * np.sqrt(2 * np.pi) * sig_neck), sig_neck
        )
        hsig = np.hypot(sp["head_diameter_um"] / 2.5, p.psf_sigma_um) / px
        head_px, base_px = world_to_px(head[None])[0], world_to_px(base[None])[0]
        heads.append((head_px, hsig, 0.8 * sp["brightness"], sp["z_offset_um"]))
        rows.append(
            {
                **sp,
                "head_y_px": head_px[0],
                "head_x_px": head_px[1],
                "base_y_px": base_px[0],
                "base_x_px": base_px[1],
            }
        )
    if p.n_z == 1:
        signal = shaft + necks
        for c, s, a, _ in heads:
            spot = _gauss_spot(signal, c, s, a)
            if spot is not None:
                signal[spot[0]] += spot[1]
        signal = signal + p.out_of_focus * ndi.gaussian_filter(signal, 3.0 / px) * 4 + haze
    else:
        z = (np.arange(p.n_z) - (p.n_z - 1) / 2) * p.z_step_um
        prof = np.exp(-(z**2) / (2 * p.axial_sigma_um**2))
        signal = (shaft + necks)[None] * prof[:, None, None]
        for c, s, a, dz in heads:
            spot = _gauss_spot(signal, c, s, a)
            if spot is not None:
                pz = np.exp(-((z - dz) ** 2) / (2 * p.axial_sigma_um**2))
                signal[(slice(None), *spot[0])] += pz[:, None, None] * spot[1][None]
        blur = ndi.gaussian_filter(signal.max(axis=0), 3.0 / px) * 4
        signal = signal + p.out_of_focus * blur[None] + haze[None]
    photons = p.background_photons + unit * signal
    img = rng.poisson(np.clip(photons, 0, None)) + rng.normal(
        0, p.read_noise_photons, photons.shape
    )
    return np.clip(np.round(100 + 4 * img), 0, 65535).astype(np.uint16), rows


def simulate_dendrite(
    *,
    scenario: str = "stress-ketamine",
    params: SpineSimParams | None = None,
    seed: int = 0,
) -> SimulatedDendrite:
    """Simulate one dendrite imaged in every session of a scenario (pure).

    Parameters
    ----------
    scenario : str
        A key of :data:`SPINE_SCENARIOS`.
    params : SpineSimParams, optional
        Defaults to ``SpineSimParams()``.
    seed : int
        Seed of every random draw.

    Returns
    -------
    SimulatedDendrite
        ``images`` (uint16, one per session); ``spines`` with columns
        ``session, spine_id, side, s_um, angle_deg, length_um,
        head_diameter_um, brightness, returned, born, head_y_px, head_x_px,
        base_y_px, base_x_px`` (pixel positions in that session's image;
        ``s_um`` is the base position along the true centreline);
        ``transforms``; and ``lifetimes`` (``spine_id, born, died``).

    Raises
    ------
    ParameterError
        For an unknown scenario.
    """
    if scenario not in SPINE_SCENARIOS:
        raise ParameterError(
            f"unknown spine scenario {scenario!r}{did_you_mean(scenario, SPINE_SCENARIOS)}; "
            f"choose one of {', '.join(SPINE_SCENARIOS)}."
        )
    p = SpineSimParams() if params is None else params
    rng = np.random.default_rng(seed)
    grid, line, normal = _centreline(p.dendrite_length_um, rng)
    line = line - line.mean(axis=0)
    shape_um = np.array(p.image_shape_px) * p.pixel_size_um
    centre_um = shape_um / 2
    # initial spines
    spines, heads = [], []
    n0 = int(round(p.spine_density_per_um * (p.dendrite_length_um - 2 * p.end_margin_um)))
    for _ in range(n0):
        sp, h = _place(spines, heads, p, rng, grid, line, normal)
        if sp is not None:
            spines.append(sp)
            heads.append(h)
    ids = list(range(len(spines)))
    born = {i: SPINE_SCENARIOS[scenario][0][0] for i in ids}
    died: dict[int, str] = {}
    next_id = len(spines)
    lost_sites: list[tuple[float, int]] = []
    sessions = SPINE_SCENARIOS[scenario]
    images, rows, tf_rows = [], [], []
    haze_base = ndi.gaussian_filter(rng.normal(size=tuple(p.image_shape_px)), 4.0 / p.pixel_size_um)
    haze_base = 0.1 * haze_base / (haze_base.std() + 1e-12)
    for k, (label, _, form, elim, returns) in enumerate(sessions):
        if k > 0:
            n_prev = len(spines)
            n_elim = int(rng.binomial(n_prev, elim))
            gone = set(rng.choice(n_prev, size=n_elim, replace=False).tolist()) if n_elim else set()
            lost_now = [(spines[i]["s_um"], spines[i]["side"]) for i in sorted(gone)]
            died.update({ids[i]: label for i in gone})
            keep = [i for i in range(n_prev) if i not in gone]
            # a spine born where one died in the same interval cannot be told apart from it:
            # the vacated sites stay blocked until the next interval
            gone_sp, gone_h = [spines[i] for i in sorted(gone)], [heads[i] for i in sorted(gone)]
            spines = [spines[i] for i in keep]
            heads = [heads[i] for i in keep]
            ids = [ids[i] for i in keep]
            n_new = int(rng.binomial(n_prev, form))
            n_ret = int(round(p.return_share * n_new)) if returns else 0
            for j in range(n_new):
                near = lost_sites if (j < n_ret and lost_sites) else None
                occupied, occupied_h = spines + gone_sp, heads + gone_h
                sp, h = _place(
                    occupied,
                    occupied_h,
                    p,
                    rng,
                    grid,
                    line,
                    normal,
                    near=near,
                    returned=near is not None,
                )
                if sp is None and near is not None:  # lost sites all taken: anywhere
                    sp, h = _place(occupied, occupied_h, p, rng, grid, line, normal)
                if sp is None:
                    continue
                spines.append(sp)
                heads.append(h)
                ids.append(next_id)
                born[next_id] = label
                next_id += 1
            lost_sites += lost_now
        # session transform: deformation, rotation about the field centre, translation
        theta = np.deg2rad(rng.normal(0, p.rotation_deg))
        shift = rng.normal(0, p.drift_um, 2)
        coef = (rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15), rng.uniform(0, 2 * np.pi, 4))
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])

        def world_to_px(pts, rot=rot, shift=shift, coef=coef):
            q = _deform(pts, coef, p.deformation_um) @ rot.T + centre_um + shift
            return q / p.pixel_size_um

        haze = haze_base + 0.03 * rng.normal(size=haze_base.shape)
        img, srows = _render_session(
            spines,
            grid,
            line,
            normal,
            p,
            rng,
            centre_um,
            world_to_px,
            ndi.gaussian_filter(haze, 1.0),
        )
        images.append(img)
        for i, r in zip(ids, srows, strict=True):
            rows.append({"session": label, "spine_id": i, "born": born[i], **r})
        tf_rows.append(
            {
                "session": label,
                "rotation_deg": float(np.rad2deg(theta)),
                "shift_y_um": float(shift[0]),
                "shift_x_um": float(shift[1]),
            }
        )
    cols = [
        "session",
        "spine_id",
        "side",
        "s_um",
        "angle_deg",
        "length_um",
        "head_diameter_um",
        "brightness",
        "z_offset_um",
        "returned",
        "born",
        "head_y_px",
        "head_x_px",
        "base_y_px",
        "base_x_px",
    ]
    table = pd.DataFrame(rows, columns=cols)
    lifetimes = pd.DataFrame(
        {
            "spine_id": list(born),
            "born": list(born.values()),
            "died": [died.get(i) for i in born],
        }
    )
    return SimulatedDendrite(images, table, pd.DataFrame(tf_rows), lifetimes)


_RATE_COLUMNS = [
    "dendrite",
    "interval",
    "session_a",
    "session_b",
    "n_a",
    "n_b",
    "formed",
    "eliminated",
    "formation_rate",
    "elimination_rate",
    "turnover_ratio",
    "survival_fraction",
    "density_a_per_10um",
    "density_b_per_10um",
]


def _ratio(num: float, den: float) -> float:
    return num / den if den else np.nan


def truth_rates(
    lifetimes: pd.DataFrame, session_labels: list[str], *, length_um: float | None = None
) -> pd.DataFrame:
    """Count the true formation and elimination per interval from spine births and deaths.

    Computed from the simulator's record of each spine's life (the session
    where it is born and the one where it is gone), with no use of the
    analysis: a spine is present in session ``k`` when ``born <= k < died``.
    For the interval from session ``a`` to the next session ``b``, ``n_a``
    and ``n_b`` count the spines present in each, ``formed`` those born in
    ``b`` and ``eliminated`` those that died in ``b``; the rates follow
    ``docs/spines.md``: formation and elimination rate = formed or eliminated
    / ``n_a``, turnover ratio = (formed + eliminated) / (``n_a`` + ``n_b``),
    survival fraction = spines born in the first session and alive in ``b`` /
    spines of the first session, density = spines per 10 µm of ``length_um``.

    Parameters
    ----------
    lifetimes : DataFrame
        ``dendrite, spine_id, born, died``: one row per spine, ``born`` and
        ``died`` session labels (``died`` None or NaN for a spine present in
        the last session); see :class:`SimulatedDendrite`.
    session_labels : list of str
        Sessions in time order.
    length_um : float, optional
        Dendrite length over which spines are counted, for densities (NaN
        without it).

    Returns
    -------
    DataFrame
        ``dendrite, interval, session_a, session_b, n_a, n_b, formed,
        eliminated, formation_rate, elimination_rate, turnover_ratio,
        survival_fraction, density_a_per_10um, density_b_per_10um``, one row
        per dendrite (sorted) and interval (``"<a>-><b>"``); rates are
        fractions, NaN when ``n_a`` is 0.

    Raises
    ------
    ParameterError
        For a missing column, an unknown session label or a spine that dies
        no later than it is born.
    """
    missing = {"dendrite", "born", "died"} - set(lifetimes.columns)
    if missing:
        raise ParameterError(
            f"truth_rates needs the columns dendrite, born and died; {', '.join(sorted(missing))} "
            "is missing."
        )
    index = {label: k for k, label in enumerate(session_labels)}
    n_sessions = len(session_labels)

    def to_index(values, column, absent):
        out = np.empty(len(values), np.int64)
        for j, v in enumerate(values):
            if v is None or pd.isna(v):
                out[j] = absent
            elif v in index:
                out[j] = index[v]
            else:
                raise ParameterError(f"truth_rates: {column} session {v!r} is not a session label.")
        return out

    length = np.nan if length_um is None else float(length_um)
    rows = []
    for dend, g in lifetimes.groupby("dendrite", sort=True):
        born = to_index(g["born"].tolist(), "born", -1)
        died = to_index(g["died"].tolist(), "died", n_sessions)
        if (born < 0).any() or (died <= born).any():
            raise ParameterError(
                f"truth_rates: a spine of dendrite {dend!r} has no birth or dies no later than it "
                "is born."
            )
        n_first = int((born == 0).sum())
        for k in range(1, n_sessions):
            n_a = int(((born <= k - 1) & (died > k - 1)).sum())
            n_b = int(((born <= k) & (died > k)).sum())
            formed, elim = int((born == k).sum()), int((died == k).sum())
            rows.append(
                {
                    "dendrite": dend,
                    "interval": f"{session_labels[k - 1]}->{session_labels[k]}",
                    "session_a": session_labels[k - 1],
                    "session_b": session_labels[k],
                    "n_a": n_a,
                    "n_b": n_b,
                    "formed": formed,
                    "eliminated": elim,
                    "formation_rate": _ratio(formed, n_a),
                    "elimination_rate": _ratio(elim, n_a),
                    "turnover_ratio": _ratio(formed + elim, n_a + n_b),
                    "survival_fraction": _ratio(int(((born == 0) & (died > k)).sum()), n_first),
                    "density_a_per_10um": 10 * n_a / length,
                    "density_b_per_10um": 10 * n_b / length,
                }
            )
    return pd.DataFrame(rows, columns=_RATE_COLUMNS)


def truth_pooled_rates(rates: pd.DataFrame) -> pd.DataFrame:
    """Pool true rates over dendrites per interval: counts summed, then the same ratios.

    Parameters
    ----------
    rates : DataFrame
        From :func:`truth_rates`.

    Returns
    -------
    DataFrame
        ``interval, session_a, session_b, n_dendrites, n_a, n_b, formed,
        eliminated, formation_rate, elimination_rate, turnover_ratio``, the
        intervals in their order in ``rates``.
    """
    rows = []
    for interval in dict.fromkeys(rates["interval"]):
        g = rates[rates["interval"] == interval]
        n_a, n_b = int(g["n_a"].sum()), int(g["n_b"].sum())
        formed, elim = int(g["formed"].sum()), int(g["eliminated"].sum())
        rows.append(
            {
                "interval": interval,
                "session_a": g["session_a"].iloc[0],
                "session_b": g["session_b"].iloc[0],
                "n_dendrites": len(g),
                "n_a": n_a,
                "n_b": n_b,
                "formed": formed,
                "eliminated": elim,
                "formation_rate": _ratio(formed, n_a),
                "elimination_rate": _ratio(elim, n_a),
                "turnover_ratio": _ratio(formed + elim, n_a + n_b),
            }
        )
    cols = ["interval", "session_a", "session_b", "n_dendrites", "n_a", "n_b", "formed",
            "eliminated", "formation_rate", "elimination_rate", "turnover_ratio"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def simulate_spine_study(
    out_dir: str | Path,
    *,
    scenario: str = "stress-ketamine",
    seed: int = 0,
    n_mice: int = 3,
    dendrites_per_mouse: int = 2,
    params: SpineSimParams | None = None,
) -> Path:
    """Write a simulated longitudinal spine-imaging study and its ground truth.

    Parameters
    ----------
    out_dir : path-like
        Folder to create (replaced atomically if it exists).
    scenario : str
        ``"stress-ketamine"`` or ``"no-return"`` (see :data:`SPINE_SCENARIOS`).
    seed : int
        Seed; dendrite ``i`` uses ``seed * 1000 + i``.
    n_mice, dendrites_per_mouse : int
        Design of the study.
    params : SpineSimParams, optional
        Imaging and biology parameters.

    Returns
    -------
    Path
        ``out_dir / "sessions.toml"``. Beside it: ``images/*.tif`` and
        ``ground_truth/`` with ``spines.parquet/.csv`` (every spine's position
        and identity per session), ``rates.csv`` (per dendrite and interval),
        ``rates_pooled.csv``, ``transforms.csv`` and ``scenario.json``.

    Raises
    ------
    ParameterError
        For an unknown scenario or a design with no dendrite.
    """
    import tifffile

    p = SpineSimParams() if params is None else params
    if scenario not in SPINE_SCENARIOS:
        raise ParameterError(
            f"unknown spine scenario {scenario!r}{did_you_mean(scenario, SPINE_SCENARIOS)}; "
            f"choose one of {', '.join(SPINE_SCENARIOS)}."
        )
    if n_mice < 1 or dendrites_per_mouse < 1:
        raise ParameterError("n_mice and dendrites_per_mouse must be at least 1.")
    sessions = SPINE_SCENARIOS[scenario]
    labels = [s[0] for s in sessions]
    out_dir = Path(out_dir)
    toml = [f'name = "simulated-{scenario}"', f"pixel_size_um = {p.pixel_size_um}", ""]
    for label, time_h, *_ in sessions:
        toml += ["[[sessions]]", f'label = "{label}"', f"time_h = {time_h}", ""]
    truth, lives, tfs = [], [], []
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "ground_truth").mkdir()
        i = 0
        for m in range(n_mice):
            for d in range(dendrites_per_mouse):
                name, mouse = f"m{m + 1}-d{d + 1}", f"m{m + 1}"
                sim = simulate_dendrite(scenario=scenario, params=p, seed=seed * 1000 + i)
                i += 1
                imgs = {}
                for label, img in zip(labels, sim.images, strict=True):
                    rel = f"images/{name}_{label}.tif"
                    tifffile.imwrite(tmp / rel, img)
                    imgs[label] = rel
                truth.append(sim.spines.assign(dendrite=name, mouse=mouse))
                lives.append(sim.lifetimes.assign(dendrite=name))
                tfs.append(sim.transforms.assign(dendrite=name))
                toml += [
                    "[[dendrites]]",
                    f'name = "{name}"',
                    f'mouse = "{mouse}"',
                    "images = { " + ", ".join(f'"{k}" = "{v}"' for k, v in imgs.items()) + " }",
                    "",
                ]
        spines = pd.concat(truth, ignore_index=True)
        spines = spines[
            ["dendrite", "mouse"] + [c for c in spines if c not in ("dendrite", "mouse")]
        ]
        write_table(spines, tmp / "ground_truth" / "spines.parquet")
        # the true rates come from the simulated births and deaths, not from the analysis'
        # own measures, so that a test can hold the analysis to them
        length = p.dendrite_length_um - 2 * p.end_margin_um
        rates = truth_rates(pd.concat(lives, ignore_index=True), labels, length_um=length)
        rates.to_csv(tmp / "ground_truth" / "rates.csv", index=False)
        truth_pooled_rates(rates).to_csv(tmp / "ground_truth" / "rates_pooled.csv", index=False)
        pd.concat(tfs, ignore_index=True).to_csv(
            tmp / "ground_truth" / "transforms.csv", index=False
        )
        new = spines[(spines.born == labels[-1]) & (spines.session == labels[-1])]
        write_json(
            {
                "scenario": scenario,
                "seed": seed,
                "n_mice": n_mice,
                "dendrites_per_mouse": dendrites_per_mouse,
                "params": to_dict(p),
                "sessions": [list(s) for s in sessions],
                "new_spines_last_session": int(len(new)),
                "planted_returns": int(new["returned"].sum()),
            },
            tmp / "ground_truth" / "scenario.json",
        )
        (tmp / "sessions.toml").write_text("\n".join(toml))
    log.info("simulated spine study %r in %s", scenario, out_dir)
    return out_dir / "sessions.toml"
