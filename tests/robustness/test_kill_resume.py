"""A run killed with SIGKILL at any point resumes with `ketamap run` and ends identical."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ketamap.simulate import BrainParams, simulate_census

KETAMAP = [sys.executable, "-c", "from ketamap.cli import main; main()"]
# the files whose content must not depend on interruptions
COMPARED = (
    "detect/cells.csv",
    "register/volumes.csv",
    "quantify/regions.csv",
    "quantify/cells_atlas.csv",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill") / "study"
    manifest = simulate_census(
        root,
        atlas="phantom:100",
        n_per_group=2,
        seed=5,
        params=BrainParams(voxel_size_um=(60.0, 60.0, 60.0)),
    )
    # one ITK thread makes registration bit-for-bit reproducible
    manifest.write_text(manifest.read_text() + "\n[registration]\nn_threads = 1\n")
    return root


def run(manifest: Path, *, kill_after_s: float | None = None) -> int:
    proc = subprocess.Popen(
        [*KETAMAP, "run", str(manifest)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if kill_after_s is None:
        return proc.wait(timeout=900)
    time.sleep(kill_after_s)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def outputs(root: Path) -> dict[str, str]:
    found = {}
    for sub in sorted((root / "subjects").iterdir()):
        for rel in COMPARED:
            found[f"{sub.name}/{rel}"] = (sub / rel).read_text()
    found["stats/regions.csv"] = (root / "stats" / "regions.csv").read_text()
    return found


@pytest.fixture(scope="module")
def reference(study, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "study"
    shutil.copytree(study, ref)
    t0 = time.perf_counter()
    assert run(ref / "study.toml") == 0
    return outputs(ref), time.perf_counter() - t0


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_outputs(study, reference, tmp_path):
    expected, full_s = reference
    fractions = (0.15, 0.45, 0.8)
    for i, fraction in enumerate(fractions):
        work = tmp_path / f"run{i}"
        shutil.copytree(study, work)
        run(work / "study.toml", kill_after_s=fraction * full_s)
        leftovers = [p for p in work.rglob("*.part")]
        assert run(work / "study.toml") == 0, f"resume after a kill at {fraction:.0%} failed"
        assert outputs(work) == expected, f"outputs differ after a kill at {fraction:.0%}"
        assert not list(work.rglob("*.part")), leftovers
        assert not [p for p in work.rglob(".*.part*")]
