"""Fixtures shared by the detection tests: the simulated light-sheet volume and cell matching.

The helpers are defined once, in ``test_detect.py`` (whose own tests use them directly);
other test modules take them as fixtures instead of importing that module by path.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def simulate_volume():
    """``simulate(shape, voxel_um, **kwargs) -> (signal, background, truth)`` of test_detect."""
    from test_detect import simulate

    return simulate


@pytest.fixture(scope="session")
def match_cells():
    """``match(found, truth, tol, scale) -> (recall, precision)`` of test_detect."""
    from test_detect import match

    return match
