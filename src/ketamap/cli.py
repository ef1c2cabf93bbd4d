"""The ``ketamap`` command line: each subcommand parses, calls one library function, prints.

Errors a user can act on (:class:`~ketamap.errors.KetamapError`) are printed as
one sentence without a traceback and the command exits with status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ketamap.errors import KetamapError

app = typer.Typer(
    name="ketamap",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Measure how a drug remodels the mouse brain: whole-brain cell census and more.",
)
simulate_app = typer.Typer(no_args_is_help=True, help="Simulate studies with known ground truth.")
atlas_app = typer.Typer(no_args_is_help=True, help="Build and inspect atlases.")
app.add_typer(simulate_app, name="simulate")
app.add_typer(atlas_app, name="atlas")

out = Console()
err = Console(stderr=True)

VoxelSize = Annotated[
    tuple[float, float, float],
    typer.Option("--voxel-size", help="Voxel size z y x in µm.", show_default=False),
]


def _progress(total: int, label: str) -> Progress:
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal,
    )
    bar.add_task("", total=total)
    return bar


def _tick(bar: Progress):
    def advance(name: str) -> None:
        bar.update(bar.task_ids[0], advance=1, description=name)
        if not err.is_terminal:
            err.print(f"  done: {name}")

    return advance


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")] = False,
):
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# --------------------------------------------------------------------------- study


@app.command()
def validate(manifest: Annotated[Path, typer.Argument(help="Study manifest (TOML).")]):
    """Check a study manifest and print what it declares."""
    from ketamap.pipeline import stage_params
    from ketamap.study import load_study

    study = load_study(manifest)
    stage_params(study)
    out.print(
        f'[green]ok[/]: study "{study.name}", atlas {study.atlas}, marker {study.marker}, '
        f"{len(study.groups)} groups, {len(study.subjects)} subjects"
    )
    for g in study.groups:
        n = sum(s.group == g.name for s in study.subjects)
        out.print(
            f"  {g.name}: {g.dose_mg_per_kg:g} mg/kg, {g.schedule} for {g.duration_days} d, n={n}"
        )


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="Study manifest (TOML).")],
    stage: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stage", help="Run only these stages (detect, register, quantify, stats, report)."
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Subjects in parallel.")] = 1,
    force: Annotated[bool, typer.Option(help="Recompute outputs that are up to date.")] = False,
):
    """Run (or resume) every stage of a study; up-to-date stages are skipped."""
    from ketamap.pipeline import run_study
    from ketamap.study import load_study

    study = load_study(manifest)
    with _progress(len(study.subjects) + 2, "census") as bar:
        summary = run_study(manifest, stages=stage, n_jobs=jobs, force=force, progress=_tick(bar))
    ran = sum(v is True for r in summary.subjects for v in r.values())
    out.print(
        f"{study.name}: {len(study.subjects)} subjects, {ran} subject stages run, "
        f"outputs in {study.root} ({summary.seconds:.0f} s)"
    )


@app.command()
def stats(
    manifest: Annotated[Path, typer.Argument(help="Study manifest (TOML).")],
    force: Annotated[bool, typer.Option(help="Recompute.")] = False,
):
    """Compare groups per region (needs quantified subjects)."""
    from ketamap.pipeline import check_outputs_exist, run_stats
    from ketamap.study import load_study

    study = load_study(manifest)
    check_outputs_exist(study, "stats")
    run_stats(study, force=force)
    out.print(f"wrote {study.root / 'stats' / 'regions.csv'}")


@app.command()
def report(
    manifest: Annotated[Path, typer.Argument(help="Study manifest (TOML).")],
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date.")] = False,
):
    """Rebuild the HTML report from a study's outputs."""
    from ketamap.pipeline import check_outputs_exist, run_report
    from ketamap.study import load_study

    study = load_study(manifest)
    check_outputs_exist(study, "report")
    if not (study.root / "stats" / "regions.parquet").exists():
        raise KetamapError('No statistics yet; run "ketamap stats" or "ketamap run" first.')
    run_report(study, force=force)
    out.print(f"wrote {study.root / 'report.html'}")


# --------------------------------------------------------------------------- single stages


@app.command()
def detect(
    signal: Annotated[Path, typer.Argument(help="TIFF planes folder, multipage TIFF or OME-Zarr.")],
    voxel_size: VoxelSize,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    background: Annotated[Optional[Path], typer.Option(help="Autofluorescence channel.")] = None,
    soma_diameter: Annotated[float, typer.Option("--soma-diameter", help="µm.")] = 15.0,
    classifier: Annotated[Optional[Path], typer.Option(
        help="A trained candidate classifier (JSON) applied as a second pass.")] = None,
):
    """Detect labelled somata; writes cells.parquet, cells.csv and cells.xml."""
    import contextlib

    import dask
    from dask.diagnostics import ProgressBar

    from ketamap.io.atomic import atomic_dir
    from ketamap.io.points import write_cells
    from ketamap.io.volumes import open_volume
    from ketamap.params import from_mapping
    from ketamap.wholebrain.classify import classify_cells, load_classifier
    from ketamap.wholebrain.detect import DetectionParams, detect_cells

    params = from_mapping(
        DetectionParams, {"soma_diameter_um": soma_diameter}, where="--soma-diameter"
    )
    model = load_classifier(classifier) if classifier is not None else None  # fail early
    vol = open_volume(signal)
    bg = open_volume(background) if background else None
    bar = ProgressBar(out=sys.stderr) if err.is_terminal else contextlib.nullcontext()
    with bar, dask.config.set(scheduler="threads"):
        cells = detect_cells(vol, voxel_size_um=voxel_size, params=params, background=bg)
    if model is not None:
        cells = classify_cells(cells, model)
    with atomic_dir(out_dir) as tmp:
        write_cells(cells, tmp)
    out.print(
        f"{len(cells)} cells in {vol.shape} voxels -> {out_dir}/cells.parquet, cells.csv, cells.xml"
    )


@app.command()
def register(
    brain: Annotated[Path, typer.Argument(help="TIFF planes folder, multipage TIFF or OME-Zarr.")],
    voxel_size: VoxelSize,
    orientation: Annotated[str, typer.Option(help="BrainGlobe orientation code, e.g. psl.")],
    atlas: Annotated[str, typer.Option(help="Atlas: phantom, a BrainGlobe name or folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
):
    """Register a brain to an atlas; writes the transform, QC numbers, QC image and volumes."""
    from ketamap.atlas import load_atlas
    from ketamap.io.atomic import atomic_dir
    from ketamap.io.volumes import open_volume
    from ketamap.pipeline import write_registration
    from ketamap.space import check_orientation
    from ketamap.wholebrain.register import register_to_atlas

    orientation = check_orientation(orientation, where="--orientation")
    at = load_atlas(atlas)
    image = open_volume(brain)
    reg = register_to_atlas(
        image,
        at.reference,
        voxel_size_um=voxel_size,
        orientation=orientation,
        atlas_resolution_um=at.resolution_um,
        atlas_orientation=at.orientation,
        atlas_mask=at.annotation > 0,
    )
    with atomic_dir(out_dir) as tmp:
        write_registration(
            tmp, reg, at, image, voxel_size_um=voxel_size, orientation=orientation, title=brain.name
        )
    flag = (
        "[red]FLAGGED[/]: " + "; ".join(reg.qc.get("reasons", []))
        if reg.qc.get("flagged")
        else "[green]ok[/]"
    )
    out.print(
        f"registration {flag}; correlation {reg.qc.get('correlation_after', float('nan')):.3f}"
        f" -> {out_dir}"
    )


@app.command()
def quantify(
    cells: Annotated[Path, typer.Option(help="cells.parquet/.csv/.xml from detect.")],
    registration: Annotated[Path, typer.Option(help="Output folder of register.")],
    atlas: Annotated[str, typer.Option(help="The atlas used for registration.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
):
    """Map cells to the atlas and count them per region at every level."""
    import pandas as pd

    from ketamap.atlas import load_atlas
    from ketamap.io.atomic import atomic_dir, write_json, write_table
    from ketamap.io.points import read_points
    from ketamap.pipeline import quantify_cells
    from ketamap.wholebrain.register import load_registration

    at = load_atlas(atlas)
    volumes_file = registration / "volumes_by_label.parquet"
    if not volumes_file.exists():
        raise KetamapError(f'"{registration}" is not an output folder of "ketamap register".')
    cells_atlas, regions, summary = quantify_cells(
        read_points(cells), load_registration(registration), at, pd.read_parquet(volumes_file)
    )
    with atomic_dir(out_dir) as tmp:
        write_table(cells_atlas, tmp / "cells_atlas.parquet")
        write_table(regions, tmp / "regions.parquet")
        write_json(summary, tmp / "summary.json")
    out.print(
        f"{summary['n_in_regions']} of {summary['n_cells']} cells in regions "
        f"({summary['n_outside_volume']} outside the atlas, {summary['n_unlabelled']} unlabelled)"
        f" -> {out_dir}/regions.csv"
    )


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="TIFF planes folder, multipage TIFF or .npy.")],
    voxel_size: VoxelSize,
    out_path: Annotated[Path, typer.Option("--out", help="OME-Zarr folder to write.")],
):
    """Convert a volume to OME-Zarr, streaming chunk by chunk (bounded memory)."""
    import contextlib

    from dask.diagnostics import ProgressBar

    from ketamap.io.volumes import open_volume, write_ome_zarr

    volume = open_volume(source)
    bar = ProgressBar(out=sys.stderr) if err.is_terminal else contextlib.nullcontext()
    with bar:
        write_ome_zarr(volume, out_path, voxel_size_um=voxel_size)
    out.print(f"wrote {out_path} ({volume.shape}, {volume.dtype})")


# --------------------------------------------------------------------------- atlas


@atlas_app.command("build")
def atlas_build(
    annotation: Annotated[Path, typer.Option(help="Allen annotation (.tif or .tif.lzma).")],
    structures: Annotated[Path, typer.Option(help="Allen structure CSV.")],
    resolution: Annotated[float, typer.Option(help="Output resolution in µm: 25, 50 or 100.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the atlas into.")],
    hemispheres: Annotated[Optional[Path], typer.Option(help="Hemispheres file.")] = None,
    reference: Annotated[
        Optional[Path], typer.Option(help="Reference image at the output resolution.")
    ] = None,
    name: Annotated[str, typer.Option(help="Atlas name.")] = "allen_mouse",
):
    """Write the Allen CCFv3 files as a BrainGlobe-format atlas folder."""
    from ketamap.atlas import load_allen, write_brainglobe

    at = load_allen(
        annotation,
        structures,
        hemispheres_path=hemispheres,
        reference_path=reference,
        resolution_um=resolution,
        name=name,
    )
    path = write_brainglobe(at, out_dir)
    out.print(f"wrote {path} ({at.shape}, {len(at.ontology.ids)} structures)")


@atlas_app.command("info")
def atlas_info(
    spec: Annotated[str, typer.Argument(help="phantom, a BrainGlobe name or a folder.")],
):
    """Print an atlas' shape, resolution, orientation and size of its ontology."""
    from ketamap.atlas import load_atlas

    at = load_atlas(spec)
    out.print(
        f"{at.name}: shape {at.shape}, resolution {at.resolution_um} µm, orientation "
        f"{at.orientation}, {len(at.ontology.ids)} structures, reference "
        f"{'yes' if at.reference is not None else 'no'}"
    )


# --------------------------------------------------------------------------- simulate + demo


@simulate_app.command("census")
def simulate_census_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Study folder to write.")],
    atlas: Annotated[str, typer.Option(help="Atlas to simulate from.")] = "phantom",
    scenario: Annotated[str, typer.Option(help="ketamine-10day or null.")] = "ketamine-10day",
    n_per_group: Annotated[int, typer.Option(help="Mice per group.")] = 4,
    voxel_size: Annotated[
        tuple[float, float, float], typer.Option("--voxel-size", help="Voxel size z y x in µm.")
    ] = (40.0, 40.0, 40.0),
    orientation: Annotated[str, typer.Option(help="Orientation of the written volumes.")] = "psl",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Brains in parallel.")] = 1,
):
    """Simulate a census study folder (manifest, volumes, ground truth)."""
    from ketamap.simulate import BrainParams, simulate_census

    params = BrainParams(voxel_size_um=voxel_size, orientation=orientation)
    n = n_per_group * 3 if scenario == "ketamine-10day" else n_per_group * 2
    with _progress(n, "simulate") as bar:
        manifest = simulate_census(
            out_dir,
            atlas=atlas,
            scenario=scenario,
            n_per_group=n_per_group,
            params=params,
            seed=seed,
            n_jobs=jobs,
            progress=_tick(bar),
        )
    out.print(f"wrote {manifest}")


@simulate_app.command("calcium")
def simulate_calcium_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    scenario: Annotated[str, typer.Option(help="stress-ketamine or null.")] = "stress-ketamine",
    n_cells: Annotated[int, typer.Option(help="Cells per field of view.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Simulate calcium imaging of one field of view over sessions, suite2p-style."""
    from ketamap.simulate.calcium import simulate_calcium_study

    manifest = simulate_calcium_study(out_dir, scenario=scenario, n_cells=n_cells, seed=seed)
    out.print(f"wrote {manifest}")


@app.command()
def ensembles(
    sessions: Annotated[Path, typer.Argument(help="Sessions file (TOML).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
):
    """Find coactive ensembles per session and compare coordination across sessions."""
    from ketamap.invivo import run_ensembles

    result = run_ensembles(sessions, out_dir)
    for row in result["sessions"]:
        label = row.get("session", "")
        n = result["n_ensembles"].get(label, 0)
        frac = row.get("fraction_coactive_bins", float("nan"))
        out.print(f"  {label}: {n} ensembles, coactive fraction {frac:.3f}")
    out.print(f"wrote {out_dir}/ensembles.csv and {out_dir}/sessions.csv")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Study folder.")] = Path("ketamap-demo"),
    atlas: Annotated[
        str, typer.Option(help="phantom (default), or the Allen files folder.")
    ] = "phantom",
    n_per_group: Annotated[int, typer.Option(help="Mice per group.")] = 4,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Brains in parallel.")] = 2,
    seed: Annotated[int, typer.Option(help="Simulation seed.")] = 0,
):
    """Simulate the ketamine 10-day study and run the whole census on it."""
    from ketamap.demo import print_summary, run_demo

    result = run_demo(
        out_dir,
        atlas=atlas,
        n_per_group=n_per_group,
        n_jobs=jobs,
        seed=seed,
        progress_factory=lambda total, label: _progress(total, label),
        tick=_tick,
    )
    print_summary(result, out)


def main() -> None:
    """Entry point: run the app, turning KetamapError into one sentence and exit 2."""
    try:
        app(standalone_mode=False)
    except KetamapError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
