"""``ketamap demo``: simulate the ketamine 10-day study and run the whole census on it.

The demo writes a study folder (default ``ketamap-demo/``) with the simulated
volumes, the ground truth, every stage's outputs, ``stats/regions.csv`` and
``report.html``, scores the run against the truth (``evaluation.json``) and
returns the numbers that :func:`print_summary` shows.

It also measures TH+ fibres (:func:`run_fibre_demo`): fibres need micrometre
voxels, which a whole simulated brain at 40 µm does not have, so every mouse of
the study gets one fine light-sheet crop (4 × 2 × 2 µm voxels) across nine
cortical and striatal regions with planted group effects, segmented and
measured per region, and the groups compared (``fibres/``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ketamap.io.atomic import write_json

__all__ = ["run_demo", "run_fibre_demo", "print_summary"]

#: Fibre length density (mm per mm³) of the demo's regions in saline mice: dense in
#: the striatum, moderate in prefrontal cortex, sparse in sensory and motor cortex.
FIBRE_DENSITIES = {
    "CP": 1500.0, "ACB": 1200.0, "PL": 600.0, "ILA": 500.0, "ORB": 500.0,
    "MOp": 300.0, "SSp": 150.0, "AUD": 150.0, "VIS": 150.0,
}  # fmt: skip
#: Planted fibre effects per group (fold change of the density; directions illustrative:
#: the study reports changes in prefrontal cortex, striatum and sensory areas).
FIBRE_EFFECTS = {
    "ket30": {"PL": 0.75},
    "ket100": {"PL": 0.6, "CP": 0.7, "SSp": 1.6},
}
#: Between-mouse variation of a region's fibre density (coefficient of variation).
FIBRE_MOUSE_CV = 0.15
#: The length is scored this many voxels in from the crop's faces, as in the accuracy
#: benchmark: a fibre cut by a face loses length there, and a whole brain's faces lie
#: in the void (measured: 6.5-7.7 % median error over the whole crop, 2.8-3.8 % inside).
FIBRE_SCORE_MARGIN_VOX = 3


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
        count per group in the key regions), ``called`` (regions called per
        contrast) and ``fibres`` (see :func:`run_fibre_demo`).
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
    with bar(n_subjects, "fibres") as b:
        fibres = run_fibre_demo(out / "fibres", pd.read_parquet(out / "stats" / "subjects.parquet"),
                                seed=seed, tick=cb(b))  # fmt: skip

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
        "fibres": fibres,
    }


def _fibre_mouse(out: Path, subject: str, group: str, seed: int) -> dict:
    """Simulate one mouse's fibre crop, segment it and write its per-region table."""
    import numpy as np

    from ketamap.atlas import make_phantom
    from ketamap.engine.stage import run_stage
    from ketamap.io.atomic import write_table
    from ketamap.simulate.fibres import region_slabs, simulate_fibres, true_length_table
    from ketamap.wholebrain.fibres import (
        FibreParams,
        fibre_length_table,
        segment_fibres,
        skeleton_lengths,
    )

    def compute(tmp: Path) -> dict:
        onto = make_phantom(resolution_um=200).ontology
        ids = [onto.lookup(a) for a in FIBRE_DENSITIES]
        labels, hemi = region_slabs((40, 9 * 100, 320), ids)
        rng = np.random.default_rng(seed)
        effect = FIBRE_EFFECTS.get(group, {})
        density = {
            onto.lookup(a): d * effect.get(a, 1.0) * rng.lognormal(-0.5 * np.log1p(
                FIBRE_MOUSE_CV**2), np.sqrt(np.log1p(FIBRE_MOUSE_CV**2)))
            for a, d in FIBRE_DENSITIES.items()
        }  # fmt: skip
        sim = simulate_fibres(labels, densities_mm_per_mm3=density, hemispheres=hemi, seed=seed)
        params = FibreParams(tissue_mask=False)  # the crop lies inside the brain
        mask, skeleton, _ = segment_fibres(sim.signal, voxel_size_um=sim.voxel_size_um,
                                           params=params, background=sim.background)  # fmt: skip
        table = fibre_length_table(
            skeleton, labels, hemi, sim.voxel_size_um, onto, mask=mask, intensity=sim.signal,
            smoothing=params.length_smoothing,
        )  # fmt: skip
        write_table(table.assign(subject=subject), tmp / "fibre_regions.parquet")
        truth = sim.lengths.groupby("region_id", as_index=False)[["length_um", "volume_mm3"]].sum()
        truth["density_mm_per_mm3"] = truth["length_um"] / 1000.0 / truth["volume_mm3"]
        # the true and measured length in the crop's interior, for the evaluation
        m = FIBRE_SCORE_MARGIN_VOX
        inner = np.zeros(labels.shape, dtype=bool)
        inner[m:-m, m:-m, m:-m] = True
        lab = np.where(inner, labels, 0)
        true_inner = true_length_table(sim.points, lab, None, sim.voxel_size_um)
        lengths = skeleton_lengths(skeleton, sim.voxel_size_um, smoothing=params.length_smoothing)
        measured = np.bincount(lab.ravel(), weights=lengths.ravel(), minlength=lab.max() + 1)
        truth = truth.merge(
            true_inner[["region_id", "length_um"]].rename(columns={"length_um": "inner_length_um"})
        )
        truth["inner_measured_um"] = measured[truth["region_id"].to_numpy()]
        write_table(truth.assign(subject=subject), tmp / "truth.parquet")
        return {"subject": subject, "group": group}

    material = {"subject": subject, "group": group, "seed": seed, "densities": FIBRE_DENSITIES,
                "effects": FIBRE_EFFECTS, "cv": FIBRE_MOUSE_CV,
                "score_margin_vox": FIBRE_SCORE_MARGIN_VOX}  # fmt: skip
    return run_stage(out / "subjects" / subject, f"fibres {subject}", material, compute).result


def run_fibre_demo(
    out_dir: str | os.PathLike, subjects: pd.DataFrame, *, seed: int = 0, tick=None
) -> dict:
    """Measure fibres in one simulated crop per mouse and compare the groups.

    Parameters
    ----------
    out_dir : path-like
        Folder to write into (``subjects/<id>/fibre_regions``, ``fibres.csv`` with the
        statistics, ``evaluation.json``); mice already measured are skipped.
    subjects : DataFrame
        ``subject``, ``group``, ``dose_mg_per_kg`` (the census' ``stats/subjects``).
    seed : int
        Simulation seed (mouse ``i`` uses ``seed * 1000 + i``).
    tick : callable, optional
        Called with the subject id after each mouse.

    Returns
    -------
    dict
        ``planted`` (per planted region and contrast: true and estimated fold change,
        q, called), ``null_called`` / ``null_tests`` (region tests without an effect
        called at q < 0.05), ``length_error`` (median and largest relative error of
        the measured length density against the truth, regions above 100 mm/mm³, in the
        crop's interior: ``FIBRE_SCORE_MARGIN_VOX`` voxels from its faces).
    """
    import numpy as np

    from ketamap.io.atomic import write_table
    from ketamap.stats.densities import compare_densities

    out = Path(out_dir)
    frames, truths = [], []
    for i, row in enumerate(subjects.itertuples()):
        _fibre_mouse(out, row.subject, row.group, seed * 1000 + i)
        frames.append(pd.read_parquet(out / "subjects" / row.subject / "fibre_regions.parquet"))
        truths.append(pd.read_parquet(out / "subjects" / row.subject / "truth.parquet"))
        if tick:
            tick(row.subject)
    table = pd.concat(frames, ignore_index=True)
    table = table[table["volume_mm3"] > 0]
    reference = str(subjects["group"].iloc[0])
    found = compare_densities(table, subjects, reference_group=reference)
    write_table(found, out / "fibres.parquet")
    leaves = set(FIBRE_DENSITIES)
    planted, null = [], []
    tested = found[found["acronym"].isin(leaves) & (found["contrast"] != "dose_trend")]
    for r in tested.itertuples():
        group = r.contrast.split("_vs_")[0]
        fold = FIBRE_EFFECTS.get(group, {}).get(r.acronym)
        called = bool(r.q < 0.05)
        if fold is None:
            null.append(called)
            continue
        planted.append({"acronym": r.acronym, "contrast": r.contrast, "true_fold_change": fold,
                        "fold_change": float(r.fold_change), "q": float(r.q), "called": called,
                        "right_direction": bool(np.sign(r.log2_fold_change)
                                                == np.sign(np.log(fold)))})  # fmt: skip
    truth = pd.concat(truths, ignore_index=True)
    scored = truth[truth["density_mm_per_mm3"] > 100]
    error = (scored["inner_measured_um"] / scored["inner_length_um"] - 1).abs()
    evaluation = {
        "planted": planted,
        "null_called": int(sum(null)),
        "null_tests": len(null),
        "length_error": {"median": float(error.median()), "max": float(error.max())},
    }
    write_json(evaluation, out / "evaluation.json")
    return evaluation


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
    fib = result.get("fibres")
    if fib:
        f = Table(title="TH+ fibres: planted vs recovered (q < 0.05)", title_justify="left")
        for col in ("region", "contrast", "true fold", "estimated fold", "q", "called"):
            f.add_column(col, justify="right" if "fold" in col or col == "q" else "left")
        for r in fib["planted"]:
            ok = r["called"] and r["right_direction"]
            f.add_row(r["acronym"], r["contrast"], f"{r['true_fold_change']:.2f}",
                      f"{r['fold_change']:.2f}", f"{r['q']:.2g}",
                      "[green]yes[/]" if ok else "[red]no[/]")  # fmt: skip
        console.print(f)
        e = fib["length_error"]
        console.print(
            f"fibres vs truth: length density within {100 * e['median']:.1f}% (median; worst "
            f"{100 * e['max']:.1f}%; the crops' interiors); {fib['null_called']} of "
            f"{fib['null_tests']} no-effect region tests called "
            f"({Path(result['study_dir']) / 'fibres'})"
        )
    console.print(f"report: {Path(result['study_dir']) / 'report.html'}")
