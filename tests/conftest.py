"""Shared fixtures: the real reference data beside the project, isolated user folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require_shared() -> bool:
    return os.environ.get("KETAMAP_REQUIRE_SHARED", "") not in ("", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder ``../shared/data``; skips when absent, fails if CI requires it."""
    if not SHARED_DATA.is_dir():
        msg = f"real reference data not found at {SHARED_DATA}"
        if _require_shared():
            pytest.fail(msg + " and KETAMAP_REQUIRE_SHARED is set")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test away from the user's home folder (e.g. ~/.brainglobe)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture
def run_cli(monkeypatch):
    """Run ``ketamap ARGS...`` in-process and return its exit status."""
    import sys

    from ketamap import cli

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["ketamap", *map(str, args)])
        try:
            cli.main()
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    return run
