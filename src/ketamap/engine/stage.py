"""The one stage runner: provenance, skip what is up to date, atomic outputs, resume.

A *stage* computes one output folder from inputs it can name. :func:`run_stage`
fingerprints those inputs (file names, sizes and modification times, the
stage's parameters, the versions of the packages that shape its results) into a
key, and

- skips the stage when the folder's ``provenance.json`` holds the same key;
- otherwise computes into a temporary folder beside the output and replaces the
  output only when the stage is complete, with ``provenance.json`` recording the
  key, the inputs, the versions, the time taken and the stage's result;
- removes what a killed run left behind (``.NAME.*.part``, ``.NAME.old``) first, so
  a run interrupted at any point, even by SIGKILL, is resumed by running it
  again and ends with the same outputs.

Every analysis (census, ensembles, spines) and the census simulator run their
stages through this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ketamap.io.atomic import atomic_dir, write_json

__all__ = ["StageRun", "run_stage", "stage_key", "stage_result", "fingerprint", "versions"]

log = logging.getLogger(__name__)

#: Packages whose versions enter every stage's key: a new release of any of them
#: may change results, so outputs made with another version are recomputed.
PACKAGES = (
    "ketamap",
    "numpy",
    "scipy",
    "scikit-image",
    "dask",
    "pandas",
    "SimpleITK",
    "statsmodels",
    "brainglobe-space",
    "brainglobe-atlasapi",
)


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of ketamap and the packages whose behaviour shapes its results."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint(paths: Iterable[str | Path | None]) -> str:
    """Hash the names, sizes and modification times of files (folders walked).

    Parameters
    ----------
    paths : iterable of path-like or None
        Files or folders; ``None`` stands for an absent optional input.

    Returns
    -------
    str
        A SHA-256 hex digest; it changes when a file is added, removed, resized
        or touched.
    """
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            h.update(b"<none>")
            continue
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p.parent)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _plain(obj):
    """``obj`` as plain JSON types (NumPy scalars and arrays become numbers and lists)."""

    def default(o):
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _key(material: dict) -> str:
    blob = json.dumps(material | {"versions": versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _provenance(out: Path) -> dict | None:
    try:
        found = json.loads((Path(out) / "provenance.json").read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def stage_key(out: str | Path) -> str | None:
    """Return the key recorded in ``out/provenance.json``, or None if there is none."""
    return (_provenance(Path(out)) or {}).get("key")


def stage_result(out: str | Path) -> dict:
    """Return the result a stage recorded in ``out/provenance.json`` (empty if none)."""
    return (_provenance(Path(out)) or {}).get("result", {})


def remove_stale_temporaries(out: Path) -> None:
    """Delete what a killed run left of its temporary outputs.

    That is ``.NAME.*.part`` (a stage killed while computing) and ``.NAME.old``
    (killed between moving the previous output aside and putting the new one in
    place; the stage is then recomputed, as its output is missing).
    """
    if not out.parent.is_dir():
        return
    stale_paths = [*out.parent.glob(f".{out.name}.*.part"), out.parent / f".{out.name}.old"]
    for stale in (p for p in stale_paths if p.exists()):
        log.info("removing %s left by an interrupted run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@dataclass(frozen=True)
class StageRun:
    """What :func:`run_stage` did.

    Attributes
    ----------
    ran : bool
        True if the stage was computed, False if it was up to date and skipped.
    key : str
        The key of its inputs (recorded in ``provenance.json``).
    result : dict
        What the stage's compute function returned, as plain JSON types (read
        back from ``provenance.json`` when the stage was skipped, so that a run
        and a skip return the same).
    """

    ran: bool
    key: str
    result: dict


def run_stage(
    out: str | Path,
    name: str,
    material: dict,
    compute: Callable[[Path], dict | None],
    *,
    force: bool = False,
) -> StageRun:
    """Run ``compute(tmp_dir)`` unless ``out`` already holds its result for the same inputs.

    Parameters
    ----------
    out : path-like
        The stage's output folder, replaced as a whole when the stage completes.
    name : str
        The stage's name, for the log and the provenance.
    material : dict
        Everything the output depends on, JSON-serialisable: input fingerprints
        (:func:`fingerprint`), parameters (``params.to_dict``), keys of upstream
        stages (:func:`stage_key`). Package versions are added here.
    compute : callable
        Writes the stage's files into the temporary folder it is given and
        returns a JSON-serialisable dict of headline results (or None).
    force : bool
        Recompute even when the output is up to date.

    Returns
    -------
    StageRun
        Whether it ran, its key and its result.
    """
    out = Path(out)
    key = _key(material)
    remove_stale_temporaries(out)
    if not force and stage_key(out) == key:
        log.info("%s: up to date, skipped (%s)", name, out)
        return StageRun(False, key, stage_result(out))
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        result = _plain(compute(tmp) or {})
        write_json(
            {
                "stage": name,
                "key": key,
                "inputs": material,
                "versions": versions(),
                "seconds": round(time.perf_counter() - t0, 3),
                "result": result,
            },
            tmp / "provenance.json",
        )
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)
    return StageRun(True, key, result)
