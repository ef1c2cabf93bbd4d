"""Fixtures shared by the detection tests: a simulated light-sheet volume and cell matching."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.special import erf


def profile(n: int, centre: float, sigma: float) -> np.ndarray:
    """Gaussian of unit peak integrated over each voxel [i - 0.5, i + 0.5]."""
    edges = np.arange(n + 1) - 0.5 - centre
    s = sigma * np.sqrt(2.0)
    return (erf(edges[1:] / s) - erf(edges[:-1] / s)) * 0.5 * sigma * np.sqrt(2 * np.pi)


def simulate(
    shape,
    voxel_um,
    *,
    density_per_mm3=200.0,
    snr=(6.5, 15.0),  # the default threshold is 5.5 noise SDs
    diameter_um=(12.0, 20.0),
    psf_sigma_um=(10.0, 8.0, 8.0),
    tissue=300.0,
    read_noise=3.0,
    stripes=0.10,
    stripe_um=50.0,
    extent=1.0,
    seed=0,
):
    """A light-sheet-like volume: smooth autofluorescent tissue (ellipsoid), stripes along x,
    an illumination gradient, somata as voxel-integrated Gaussian blobs, Poisson + read noise.

    Returns (signal uint16, background uint16, truth (n, 3) voxel coordinates).
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    vs = np.asarray(voxel_um, dtype=float)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (zz / 0.95) ** 2 + (yy / 0.9) ** 2 + (xx / 0.9) ** 2 <= extent**2
    # autofluorescence varying over ~500 µm, whatever the voxel size
    coarse = rng.normal(size=tuple(int(np.ceil(n * v / 500.0)) + 3 for n, v in zip(shape, vs)))
    grid = np.meshgrid(*[np.arange(n) * v / 500.0 for n, v in zip(shape, vs)], indexing="ij")
    field = ndi.map_coordinates(coarse, grid, order=3, mode="nearest")
    smooth = np.clip(1 + 0.3 * field, 0.3, None)
    edge_sigma = np.maximum(20.0 / vs, 0.5)
    auto = tissue * ndi.gaussian_filter(inside.astype(float), edge_sigma) * smooth + 20.0
    stripe = ndi.gaussian_filter1d(rng.normal(size=shape[1]), stripe_um / vs[1])
    stripe = 1 + stripes * stripe / stripe.std()
    illumination = np.linspace(0.7, 1.3, shape[2])
    light = stripe[None, :, None] * illumination[None, None, :]
    auto = auto * light

    # cells: a Poisson number inside the tissue, away from nothing in particular
    volume_mm3 = inside.sum() * np.prod(vs) * 1e-9
    n = rng.poisson(density_per_mm3 * volume_mm3)
    cand = np.argwhere(inside)
    truth = cand[rng.choice(len(cand), n, replace=False)] + rng.uniform(-0.5, 0.5, (n, 3))
    cells = np.zeros(shape)
    for c in truth:
        d = rng.uniform(*diameter_um)
        sig = np.sqrt((d / 4) ** 2 + np.asarray(psf_sigma_um) ** 2) / vs
        lo = np.maximum(np.floor(c - 4 * sig).astype(int), 0)
        hi = np.minimum(np.ceil(c + 4 * sig).astype(int) + 1, shape)
        prof = [
            profile(hi[a] - lo[a], c[a] - lo[a], sig[a]) / np.sqrt(2 * np.pi) / sig[a]
            for a in range(3)
        ]
        blob = prof[0][:, None, None] * prof[1][None, :, None] * prof[2][None, None, :]
        blob /= blob.max()
        ci = tuple(np.clip(np.round(c).astype(int), 0, np.asarray(shape) - 1))
        noise_sd = np.sqrt(auto[ci] + read_noise**2)
        amp = rng.uniform(*snr) * noise_sd
        cells[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += amp * blob
    signal = rng.poisson(auto + cells) + rng.normal(0, read_noise, shape)
    background = rng.poisson(0.8 * auto) + rng.normal(0, read_noise, shape)
    to16 = lambda a: np.clip(np.round(a), 0, 65535).astype(np.uint16)  # noqa: E731
    return to16(signal), to16(background), truth


def match(found: np.ndarray, truth: np.ndarray, tol: float, scale=(1.0, 1.0, 1.0)):
    """One-to-one matching (Hungarian on pairs within tol); returns (recall, precision)."""
    if len(found) == 0 or len(truth) == 0:
        return (0.0 if len(truth) else 1.0), (0.0 if len(found) else 1.0)
    s = np.asarray(scale)
    tf, tt = cKDTree(found * s), cKDTree(truth * s)
    pairs = tf.sparse_distance_matrix(tt, tol, output_type="coo_matrix")
    cost = np.full((len(found), len(truth)), 1e6)
    cost[pairs.row, pairs.col] = pairs.data
    rows, cols = linear_sum_assignment(cost)
    hits = int((cost[rows, cols] <= tol).sum())
    return hits / len(truth), hits / len(found)


@pytest.fixture(scope="session")
def simulate_volume():
    """``simulate(shape, voxel_um, **kwargs) -> (signal, background, truth)``."""
    return simulate


@pytest.fixture(scope="session")
def match_cells():
    """``match(found, truth, tol, scale) -> (recall, precision)``, one-to-one."""
    return match


@pytest.fixture(scope="session")
def voxel_profile():
    """``profile(n, centre, sigma)``: a unit-peak Gaussian integrated over each voxel."""
    return profile
