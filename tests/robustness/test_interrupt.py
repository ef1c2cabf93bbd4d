"""Ctrl-C and SIGTERM stop a run loudly: "aborted", a non-zero exit, no worker left behind.

A run with two worker processes is interrupted while its workers compute. The command
must print "aborted" and exit 130 (SIGINT) or 143 (SIGTERM), every worker must be gone,
and a second `ketamap run` must finish the study (checked after SIGTERM only: the command
line unwinds both signals through one handler, so both leave the same state behind).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ketamap.simulate import BrainParams, simulate_census

KETAMAP = [sys.executable, "-c", "from ketamap.cli import main; main()"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads child processes from /proc"
)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt") / "study"
    manifest = simulate_census(
        root,
        atlas="phantom:100",
        n_per_group=2,
        seed=7,
        params=BrainParams(voxel_size_um=(60.0, 60.0, 60.0)),
    )
    # an affine registration: the test is about stopping and resuming, and at 60 µm the
    # B-spline stage doubles each subject's registration (12 s with it, 6 s without)
    manifest.write_text(manifest.read_text() + "\n[registration]\ndeformable = false\n")
    return manifest


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.update(int(c) for c in text.split())
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_run_stops_its_workers_and_says_so(study, sig, code, tmp_path):
    manifest = study
    proc = subprocess.Popen(
        [*KETAMAP, "run", str(manifest), "--jobs", "2", "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a signal to this test's group never reaches the run
    )
    try:
        workers: set[int] = set()
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the run never started its two workers"
        time.sleep(1.0)  # let them get into their subjects
        os.kill(proc.pid, sig)  # the parent only, as a scheduler or `kill` does
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr[-2000:]
    assert "aborted" in stderr
    assert "Traceback" not in stderr, stderr[-2000:]
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "worker processes outlived the run"
    if sig != signal.SIGTERM:  # finishing the study after an interruption: checked once
        return
    again = subprocess.run(
        [*KETAMAP, "run", str(manifest)], capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (manifest.parent / "stats" / "regions.csv").exists()
