"""Ensembles and spines: a run killed with SIGKILL resumes and ends identical; a re-run skips."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ketamap.pipelines import run_ensembles, run_spines
from ketamap.simulate.calcium import simulate_calcium_study
from ketamap.simulate.spines import simulate_spine_study

KETAMAP = [sys.executable, "-c", "from ketamap.cli import main; main()"]


def _simulate(kind: str, root: Path) -> Path:
    if kind == "ensembles":
        return simulate_calcium_study(root, seed=3, n_cells=80, n_ensembles=2, ensemble_size=8,
                                      duration_s=300.0)  # fmt: skip
    return simulate_spine_study(root, seed=3, n_mice=2, dendrites_per_mouse=2)


def _run(kind: str, sessions: Path, out: Path, *, kill_after_s: float | None = None,
         force: bool = False) -> int:  # fmt: skip
    flags = ["--force"] if force else []
    proc = subprocess.Popen([*KETAMAP, kind, str(sessions), "--out", str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    if kill_after_s is None:
        return proc.wait(timeout=600)
    time.sleep(kill_after_s)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60)


def _tables(out: Path) -> dict[str, bytes]:
    """Every table and the summary: what must not depend on interruptions."""
    found = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*.csv")}
    found["summary.json"] = (out / "summary.json").read_bytes()
    return found


@pytest.fixture(scope="module", params=["ensembles", "spines"])
def analysed(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    sessions = _simulate(kind, root / "study")
    t0 = time.perf_counter()
    assert _run(kind, sessions, root / "reference") == 0
    return kind, sessions, root / "reference", time.perf_counter() - t0


def test_rerun_skips_and_changes_nothing(analysed):
    kind, sessions, reference, _ = analysed
    run = run_ensembles if kind == "ensembles" else run_spines
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    result = run(sessions, reference)
    assert result["ran"] is False
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before
    # the skipped run returns what the full run returned
    assert result["files"] and all(Path(f).exists() for f in result["files"])
    key = "sessions" if kind == "ensembles" else "pooled"
    assert result[key]
    # --force recomputes, into identical tables (in a fresh process, as the reference: the
    # thread pools of this one may differ)
    tables = _tables(reference)
    before = (reference / "provenance.json").stat().st_mtime_ns
    assert _run(kind, sessions, reference, force=True) == 0
    assert (reference / "provenance.json").stat().st_mtime_ns != before
    again = _tables(reference)
    assert [k for k in tables if again.get(k) != tables[k]] == []


def test_edited_sessions_file_recomputes(analysed, tmp_path):
    kind, sessions, reference, _ = analysed
    text = sessions.read_text()
    changed = sessions.with_name("changed.toml")  # beside the original: same data paths
    changed.write_text(text)
    run = run_ensembles if kind == "ensembles" else run_spines
    out = tmp_path / "out"
    assert run(changed, out)["ran"] is True
    assert run(changed, out)["ran"] is False
    changed.write_text(text + "\n")  # any edit of the sessions file is a new input
    assert run(changed, out)["ran"] is True


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_outputs(analysed, tmp_path):
    kind, sessions, reference, full_s = analysed
    expected = _tables(reference)
    for i, fraction in enumerate((0.3, 0.6, 0.9)):
        out = tmp_path / f"run{i}"
        _run(kind, sessions, out, kill_after_s=fraction * full_s)
        assert _run(kind, sessions, out) == 0, f"resume after a kill at {fraction:.0%} failed"
        assert _tables(out) == expected, f"outputs differ after a kill at {fraction:.0%}"
        assert not [p for p in tmp_path.rglob(".*.part")]
        assert not [p for p in tmp_path.rglob(".*.old")]
