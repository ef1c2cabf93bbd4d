"""``ketamap demo``: simulate the ketamine 10-day study and run the whole census on it.

The demo writes a study folder (default ``ketamap-demo/``) with the simulated
volumes, the ground truth, every stage's outputs, ``stats/regions.csv`` and
``report.html``, scores the run against the truth (``evaluation.json``) and
returns the numbers that :func:`print_summary` shows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ketamap.io.atomic import write_json

__all__ = ["run_demo", "print_summary"]


def _demo_params(artefacts: bool = False):
    """Return the demo's brain parameters; ``artefacts`` adds the realistic imaging artefacts."""
    from ketamap.simulate import BrainParams

    # 40 µm voxels over the whole brain keep the demo within about two minutes on
    # two cores; the raw volumes are written in the orientation of the shared
    # real brain ("psl") so that reorientation is exercised end to end.
    params = BrainParams(voxel_size_um=(40.0, 40.0, 40.0), orientation="psl")
    # Hot pixels (1e-6 per voxel, 50-2000 counts), 2 mm stitched tiles with 10 % gain CV
    # and a 100-photon, 40 µm bright rim under the surface: ``REALISTIC_ARTEFACTS``.
    return params.with_artefacts() if artefacts else params


def run_demo(
    out_dir: str | os.PathLike = "ketamap-demo",
    *,
    atlas: str = "phantom",
    n_per_group: int = 4,
    n_jobs: int = 2,
    seed: int = 0,
    progress_factory: Callable | None = None,
    tick: Callable | None = None,
    artefacts: bool = True,
) -> dict:
    """Simulate ``ketamine-10day``, run every stage and score the run.

    Parameters
    ----------
    out_dir : path-like
        Study folder; an earlier demo there is resumed (up-to-date stages skip).
    atlas : str
        ``"phantom"`` or an atlas specification (e.g. the Allen files folder).
    n_per_group : int
        Mice per group.
    n_jobs : int
        Brains processed in parallel.
    seed : int
        Simulation seed.
    progress_factory, tick : callable, optional
        ``progress_factory(total, label)`` returns a context manager progress
        bar and ``tick(bar)`` a callback advancing it (the CLI passes rich bars).
    artefacts : bool
        Image the brains with realistic light-sheet artefacts (hot pixels, stitched
        tiles with uneven gains, a bright rim under the brain surface; see
        :data:`ketamap.simulate.brain.REALISTIC_ARTEFACTS`). On by default: the demo
        shows the detector on what real tissue does to it.

    Returns
    -------
    dict
        ``study_dir``, ``evaluation`` (see
        :func:`ketamap.simulate.evaluate.evaluate_census`), ``counts`` (mean
        count per group in the key regions) and ``called`` (regions called per
        contrast).
    """
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import run_study
    from ketamap.simulate import simulate_census
    from ketamap.simulate.evaluate import evaluate_census

    out = Path(out_dir)
    n_subjects = 3 * n_per_group

    def bar(total, label):
        return progress_factory(total, label) if progress_factory else contextlib.nullcontext()

    def cb(b):
        return tick(b) if tick and b is not None else None

    with bar(n_subjects, "simulate") as b:
        manifest = simulate_census(
            out,
            atlas=atlas,
            scenario="ketamine-10day",
            n_per_group=n_per_group,
            params=_demo_params(artefacts),
            seed=seed,
            n_jobs=n_jobs,
            progress=cb(b),
        )
    with bar(n_subjects + 2, "census") as b:
        run_study(manifest, n_jobs=n_jobs, progress=cb(b))
    evaluation = evaluate_census(out)
    write_json(evaluation, out / "evaluation.json")

    counts = pd.read_parquet(out / "stats" / "counts.parquet")
    subjects = pd.read_parquet(out / "stats" / "subjects.parquet")
    key_regions = load_study(manifest).key_regions
    key = counts[counts["acronym"].isin(key_regions)].merge(subjects[["subject", "group"]])
    table = key.pivot_table(index="acronym", columns="group", values="count", aggfunc="mean")
    order = [g for g in subjects["group"].drop_duplicates()]
    table = table.reindex(index=[a for a in key_regions if a in table.index], columns=order)
    regions = pd.read_csv(out / "stats" / "regions.csv")
    called = regions[regions["q"] < 0.05]
    return {
        "study_dir": str(out),
        "evaluation": evaluation,
        "counts": table,
        "called": called,
        "groups": order,
    }


def print_summary(result: dict, console) -> None:
    """Print the demo's short summary on a rich console."""
    from rich.table import Table

    ev = result["evaluation"]
    t = Table(title="Mean TH+ count per mouse in key regions", title_justify="left")
    t.add_column("region")
    for g in result["groups"]:
        t.add_column(g, justify="right")
    for acronym, row in result["counts"].iterrows():
        t.add_row(acronym, *[f"{v:.0f}" for v in row.to_numpy()])
    console.print(t)

    p = Table(title="Planted vs recovered (q < 0.05)", title_justify="left")
    for col in ("region", "contrast", "true fold", "estimated fold", "q", "called"):
        p.add_column(col, justify="right" if "fold" in col or col == "q" else "left")
    for r in ev["planted"]:
        ok = r["called"] and r["right_direction"]
        p.add_row(
            r["acronym"],
            r["contrast"],
            f"{r['true_fold_change']:.2f}",
            f"{r['fold_change']:.2f}",
            f"{r['q']:.2g}",
            "[green]yes[/]" if ok else "[red]no[/]",
        )
    console.print(p)

    called = result["called"]
    for contrast, grp in called.groupby("contrast"):
        names = grp.sort_values("p")["acronym"].tolist()
        shown = ", ".join(names[:15]) + (f" … (+{len(names) - 15})" if len(names) > 15 else "")
        console.print(f"[bold]{contrast}[/]: {len(names)} regions changed: {shown}")
    d, r, s = ev["detection"], ev["registration"], ev["statistics"]
    console.print(
        f"detection vs truth: recall {d['recall_mean']:.3f}, precision {d['precision_mean']:.3f} "
        f"(worst mouse {d['recall_min']:.3f} / {d['precision_min']:.3f})"
    )
    console.print(
        f"registration vs truth: median error {r['median_error_atlas_vox']:.2f} atlas voxels, "
        f"{100 * r['fraction_true_region']:.1f}% of cells in their true region"
    )
    console.print(
        f"statistics vs truth: {s['n_planted_found']}/{s['n_planted']} planted effects called "
        f"in the right direction; {100 * s['fraction_null_not_called']:.1f}% of "
        f"{s['n_null']} no-effect region tests not called"
    )
    console.print(f"report: {Path(result['study_dir']) / 'report.html'}")
