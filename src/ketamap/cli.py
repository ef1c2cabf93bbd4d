"""The ``ketamap`` command line: each subcommand parses, calls one library function, prints.

Errors a user can act on (:class:`~ketamap.errors.KetamapError`) are printed as
one sentence without a traceback and the command exits with status 2.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

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


class _DefaultCommand(TyperGroup):
    """A group whose first command runs when no command is named.

    ``ketamap detect SIGNAL ...`` runs ``detect cells``, ``ketamap detect train ...``
    trains (a signal folder literally named ``train`` is written ``./train``).
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


detect_app = typer.Typer(
    cls=_DefaultCommand,
    no_args_is_help=True,
    help="Detect labelled somata (ketamap detect SIGNAL ...), or train the classifier "
    "that checks them (ketamap detect train ...).",
)
app.add_typer(detect_app, name="detect")

# soft wrap: the terminal wraps long lines itself, so paths and commands stay copyable
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

VoxelSize = Annotated[
    tuple[float, float, float],
    typer.Option("--voxel-size", help="Voxel size z y x in µm.", show_default=False),
]


SchedulerAddress = Annotated[
    Optional[str],
    typer.Option(
        "--scheduler", help="Address of a running dask.distributed scheduler (tcp://host:8786)."
    ),
]
ClusterKind = Annotated[
    Optional[str],
    typer.Option(
        "--cluster", help="Start a cluster for this run: local (processes), slurm or pbs."
    ),
]
ClusterWorkers = Annotated[
    int, typer.Option("--workers", help="Workers (local) or jobs (slurm/pbs) of --cluster.")
]


def _progress(total: int, label: str) -> Progress:
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
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
            task = bar.tasks[0]
            err.print(f"  [{int(task.completed)}/{int(task.total)}] {name}", highlight=False)

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
    """Check a study (manifest, parameters, atlas, images) and print what it declares."""
    from ketamap.pipeline import check_study
    from ketamap.study import load_study

    study = load_study(manifest)
    found = check_study(study)
    at = found["atlas"]
    out.print(
        f'[green]ok[/]: study "{study.name}", atlas {study.atlas} ({at.shape} at '
        f"{at.resolution_um[0]:g} µm"
        + (", synthetic reference" if at.synthetic_reference else "")
        + f"), marker {study.marker}, {len(study.groups)} groups, {len(study.subjects)} subjects"
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
    allow_flagged: Annotated[
        bool,
        typer.Option(
            "--allow-flagged",
            help="Count subjects whose detection or registration QC is flagged (the report "
            "marks them); by default they are stopped before counting.",
        ),
    ] = False,
    scheduler: SchedulerAddress = None,
    cluster: ClusterKind = None,
    workers: ClusterWorkers = 2,
):
    """Run (or resume) every stage of a study; up-to-date stages are skipped."""
    from ketamap.pipeline import run_study
    from ketamap.scheduler import use_scheduler
    from ketamap.study import load_study

    study = load_study(manifest)
    with (
        use_scheduler(scheduler, cluster, n_workers=workers),
        _progress(len(study.subjects) + 2, "census") as bar,
    ):
        summary = run_study(
            manifest,
            stages=stage,
            n_jobs=jobs,
            force=force,
            allow_flagged=allow_flagged,
            progress=_tick(bar),
        )
    ran = sum(v is True for r in summary.subjects for v in r.values())
    out.print(
        f"{study.name}: {len(study.subjects)} subjects, {ran} subject stages run, "
        f"outputs in {study.root} ({summary.seconds:.0f} s)"
    )
    from rich.markup import escape

    for r in summary.subjects:
        if r.get("flags"):
            text = escape(f"{r['subject']} counted although " + " and ".join(r["flags"]))
            err.print(f"[yellow]warning:[/] {text}", highlight=False)
    report = study.root / "report.html"  # the one the user opens (report/ holds its parts)
    if report.exists() and (stage is None or "report" in stage):
        out.print(f"report: {report}")


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


@detect_app.command("cells")
def detect(
    signal: Annotated[
        Path,
        typer.Argument(help="TIFF planes folder, multipage TIFF, OME-Zarr, Imaris .ims or NIfTI."),
    ],
    voxel_size: VoxelSize,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    background: Annotated[Optional[Path], typer.Option(help="Autofluorescence channel.")] = None,
    soma_diameter: Annotated[float, typer.Option("--soma-diameter", help="µm.")] = 15.0,
    classifier: Annotated[
        Optional[Path],
        typer.Option(help="A trained candidate classifier (JSON) applied as a second pass."),
    ] = None,
    scheduler: SchedulerAddress = None,
    cluster: ClusterKind = None,
    workers: ClusterWorkers = 2,
):
    """Detect labelled somata (the default: ketamap detect SIGNAL runs this).

    Writes the cells, the tissue mask and the detection QC.

    Writes cells.parquet, cells.csv and cells.xml; tissue_mask.ome.zarr (the
    coarse mask of where cells were searched for, 1 = tissue); and
    detection_qc.json (candidates dropped outside the tissue and below its
    noise floor, tissue fraction and levels). Train a classifier for
    --classifier with "ketamap detect train" (see "ketamap detect train --help").
    """
    import contextlib

    from dask.diagnostics import ProgressBar

    from ketamap.io.atomic import atomic_dir
    from ketamap.io.points import write_cells
    from ketamap.io.volumes import open_volume
    from ketamap.params import from_mapping
    from ketamap.scheduler import use_scheduler
    from ketamap.wholebrain.classify import classify_cells, load_classifier
    from ketamap.wholebrain.detect import DetectionParams, detect_cells
    from ketamap.wholebrain.tissue import write_detection_qc

    params = from_mapping(
        DetectionParams, {"soma_diameter_um": soma_diameter}, where="--soma-diameter"
    )
    model = load_classifier(classifier) if classifier is not None else None  # fail early
    vol = open_volume(signal)
    bg = open_volume(background) if background else None
    local = not (scheduler or cluster)
    bar = ProgressBar(out=sys.stderr) if err.is_terminal and local else contextlib.nullcontext()
    with use_scheduler(scheduler, cluster, n_workers=workers), bar:
        cells, qc = detect_cells(
            vol, voxel_size_um=voxel_size, params=params, background=bg, return_qc=True
        )
    if model is not None:
        cells = classify_cells(cells, model)
    with atomic_dir(out_dir) as tmp:
        write_cells(cells, tmp)
        write_detection_qc(qc, tmp, voxel_size_um=voxel_size)
    fraction = qc["tissue_fraction"]
    tissue = (
        "no tissue mask" if fraction is None else f"tissue {100 * fraction:.1f} % of the volume"
    )
    n_out = qc["n_outside_tissue"]
    out.print(
        f"{len(cells)} cells; {n_out} candidate{'' if n_out == 1 else 's'} outside the tissue "
        f"dropped ({tissue}) -> {out_dir}",
        highlight=False,
    )


def _read_annotations(path: Optional[Path], what: str):
    """Read annotated points (cellfinder XML, or CSV/Parquet with z_vox,y_vox,x_vox or z,y,x)."""
    if path is None:
        return None
    import pandas as pd

    from ketamap.errors import InputError
    from ketamap.io.points import read_points

    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            head = pd.read_csv(path, nrows=0).columns
        except Exception as e:
            raise InputError(f"{what} file {path} cannot be read: {e}.") from e
        if "z_vox" not in head and {"z", "y", "x"} <= set(head):
            table = pd.read_csv(path).rename(columns={"z": "z_vox", "y": "y_vox", "x": "x_vox"})
            return table.rename(columns={"type": "cell_type"})
    table = read_points(path)
    return table.rename(columns={"type": "cell_type"}) if "cell_type" not in table else table


@detect_app.command("train")
def detect_train(
    signal: Annotated[Path, typer.Argument(help="TIFF planes folder, multipage TIFF or OME-Zarr.")],
    voxel_size: VoxelSize,
    out_path: Annotated[Path, typer.Option("--out", help="Model file to write (JSON).")],
    cells: Annotated[
        Optional[Path],
        typer.Option(help="Annotated cells: cellfinder XML, or CSV with z,y,x voxel columns."),
    ] = None,
    non_cells: Annotated[
        Optional[Path],
        typer.Option("--non-cells", help="Annotated non-cells (artefacts): XML or CSV."),
    ] = None,
    points: Annotated[
        Optional[Path],
        typer.Option(
            help="One cellfinder classification XML with both types (2 cell, 1 non-cell)."
        ),
    ] = None,
    background: Annotated[Optional[Path], typer.Option(help="Autofluorescence channel.")] = None,
    soma_diameter: Annotated[float, typer.Option("--soma-diameter", help="µm.")] = 15.0,
    tolerance: Annotated[
        float,
        typer.Option(
            help="A candidate takes the label of the nearest annotation within this many µm."
        ),
    ] = 10.0,
    threshold: Annotated[
        float, typer.Option(help="Cell probability at or above which a candidate is kept.")
    ] = 0.5,
    non_cells_beyond: Annotated[
        Optional[float],
        typer.Option(
            "--non-cells-beyond",
            help="Every cell of the volume is annotated: candidates farther than this many µm "
            "from every annotated cell are non-cells.",
            show_default=False,
        ),
    ] = None,
):
    """Train the second-pass cell classifier from annotated cells and non-cells.

    Usage: ketamap detect train SIGNAL --voxel-size Z Y X --cells CELLS
    --non-cells NONCELLS [--background BG] --out MODEL.json (or --points FILE).
    Runs detection with the same parameters as "ketamap detect", labels the
    candidates, trains, prints the cross-validated accuracy and writes the model.
    """
    from ketamap.errors import ParameterError
    from ketamap.io.atomic import atomic_path
    from ketamap.io.volumes import open_volume
    from ketamap.params import from_mapping
    from ketamap.wholebrain.classify import (
        combine_annotations,
        save_classifier,
        train_from_annotations,
    )
    from ketamap.wholebrain.detect import DetectionParams

    if points is None and cells is None:
        raise ParameterError("Give the annotated cells: --cells (and --non-cells), or --points.")
    params = from_mapping(
        DetectionParams, {"soma_diameter_um": soma_diameter}, where="--soma-diameter"
    )
    annotations = combine_annotations(
        cells=_read_annotations(cells, "Cells"),
        non_cells=_read_annotations(non_cells, "Non-cells"),
        points=_read_annotations(points, "Points"),
    )
    trained = train_from_annotations(
        open_volume(signal),
        annotations,
        voxel_size_um=voxel_size,
        params=params,
        background=open_volume(background) if background else None,
        tolerance_um=tolerance,
        threshold=threshold,
        non_cells_beyond_um=non_cells_beyond,
    )
    with atomic_path(out_path) as tmp:
        save_classifier(trained.model, tmp)
    cv = trained.cross_validation
    score = (
        f"{cv['n_folds']}-fold cross-validated accuracy {cv['accuracy']:.3f} (cells kept "
        f"{cv['cell_recall']:.3f}, non-cells removed {cv['non_cell_rejection']:.3f})"
        if cv["n_folds"]
        else "too few labelled candidates to cross-validate"
    )
    out.print(
        f"trained on {cv['n_cells']} cells and {cv['n_non_cells']} non-cells of "
        f"{len(trained.candidates)} candidates; {score} -> {out_path}"
    )


@app.command()
def register(
    brain: Annotated[Path, typer.Argument(help="TIFF planes folder, multipage TIFF or OME-Zarr.")],
    voxel_size: VoxelSize,
    orientation: Annotated[str, typer.Option(help="BrainGlobe orientation code, e.g. psl.")],
    atlas: Annotated[str, typer.Option(help="Atlas: phantom, a BrainGlobe name or folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    engine: Annotated[
        str,
        typer.Option(help='Registration library: simpleitk, or antspyx (the "ants" extra).'),
    ] = "simpleitk",
):
    """Register a brain to an atlas; writes the transform, QC numbers, QC image and volumes."""
    from ketamap.atlas import load_atlas
    from ketamap.io.atomic import atomic_dir
    from ketamap.io.volumes import open_volume
    from ketamap.params import from_mapping
    from ketamap.pipeline import write_registration
    from ketamap.space import check_orientation
    from ketamap.wholebrain.register import RegistrationParams, register_to_atlas

    orientation = check_orientation(orientation, where="--orientation")
    params = from_mapping(RegistrationParams, {"engine": engine}, where="--engine")
    at = load_atlas(atlas)
    image = open_volume(brain)
    reg = register_to_atlas(
        image,
        at.reference,
        voxel_size_um=voxel_size,
        orientation=orientation,
        atlas_resolution_um=at.resolution_um,
        atlas_orientation=at.orientation,
        atlas_labels=at.annotation,
        params=params,
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
    from ketamap.wholebrain.quantify import quantify_cells
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
    source: Annotated[
        Path,
        typer.Argument(
            help="TIFF planes folder, multipage TIFF/BigTIFF, Imaris .ims, NIfTI or .npy."
        ),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="OME-Zarr folder to write.")],
    voxel_size: Annotated[
        Optional[tuple[float, float, float]],
        typer.Option(
            "--voxel-size",
            help="Voxel size z y x in µm (default: from the file).",
            show_default=False,
        ),
    ] = None,
    levels: Annotated[
        Optional[int],
        typer.Option(
            "--levels",
            help="Resolution levels (default: until the smallest fits one chunk).",
            show_default=False,
        ),
    ] = None,
    channel: Annotated[int, typer.Option(help="Channel of an Imaris file.")] = 0,
    chunks: Annotated[
        Optional[tuple[int, int, int]],
        typer.Option(
            "--chunks",
            help="Zarr chunk z y x (default 64 128 128); memory from TIFF planes is "
            "about chunk z x one plane.",
            show_default=False,
        ),
    ] = None,
):
    """Convert a volume to multiscale OME-Zarr, streaming chunk by chunk (bounded memory)."""
    import contextlib

    from dask.diagnostics import ProgressBar

    from ketamap.io.volumes import open_volume, read_voxel_size_um, write_ome_zarr

    volume = open_volume(source, channel=channel)
    if voxel_size is None:
        voxel_size = read_voxel_size_um(source)
        if voxel_size is None:
            raise KetamapError(f"{source} does not record its voxel size; give --voxel-size Z Y X.")
    if levels is not None and levels < 1:
        raise KetamapError(f"--levels must be at least 1, got {levels}.")
    if chunks is not None and min(chunks) < 1:
        raise KetamapError(f"--chunks must be three whole numbers of at least 1, got {chunks}.")
    bar = ProgressBar(out=sys.stderr) if err.is_terminal else contextlib.nullcontext()
    with bar:
        write_ome_zarr(
            volume,
            out_path,
            voxel_size_um=voxel_size,
            levels=levels,
            **({"chunks": chunks} if chunks else {}),
        )
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
    if reference is None:
        err.print(
            f"[yellow]warning:[/] no --reference: {path.name} holds a synthetic reference made "
            "from the annotation (one grey level per region), not an image. Simulated brains "
            "register to it; a real brain cannot. Give an intensity template at "
            f"{resolution:g} µm with --reference to register real brains.",
            highlight=False,
        )


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
        + (
            "synthetic (made from the annotation, not an image: a real brain cannot be "
            "registered to it)"
            if at.synthetic_reference
            else ("yes" if at.reference is not None else "no")
        )
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
    drift: Annotated[
        bool, typer.Option(help="Move the field and re-detect/shuffle ROIs between sessions.")
    ] = True,
):
    """Simulate calcium imaging of one field of view over sessions, suite2p-style."""
    from ketamap.simulate.calcium import simulate_calcium_study

    manifest = simulate_calcium_study(
        out_dir, scenario=scenario, n_cells=n_cells, seed=seed, drift=drift
    )
    out.print(f"wrote {manifest}")


@simulate_app.command("spines")
def simulate_spines_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    scenario: Annotated[str, typer.Option(help="stress-ketamine or no-return.")] = (
        "stress-ketamine"
    ),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    n_mice: Annotated[int, typer.Option(help="Mice.")] = 3,
    dendrites_per_mouse: Annotated[int, typer.Option(help="Dendrites per mouse.")] = 2,
    snr: Annotated[float, typer.Option(help="Spine-head signal-to-noise ratio.")] = 10.0,
    drift: Annotated[float, typer.Option(help="SD of the session drift in µm.")] = 2.0,
    stacks: Annotated[bool, typer.Option(help="Write 3D stacks instead of projections.")] = False,
):
    """Simulate longitudinal two-photon images of dendritic spines, with ground truth."""
    from ketamap.simulate.spines import SpineSimParams, simulate_spine_study

    params = SpineSimParams(snr=snr, drift_um=drift, n_z=9 if stacks else 1)
    manifest = simulate_spine_study(
        out_dir,
        scenario=scenario,
        seed=seed,
        n_mice=n_mice,
        dendrites_per_mouse=dendrites_per_mouse,
        params=params,
    )
    out.print(f"wrote {manifest}")


@app.command()
def ensembles(
    sessions: Annotated[
        list[Path], typer.Argument(help="Sessions file (TOML); one per field of view.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    unit: Annotated[
        str, typer.Option(help="Several fields: the mixed model's unit, field or cell.")
    ] = "field",
):
    """Find coactive ensembles per session and compare coordination across sessions.

    With several sessions files (one per field of view, ``mouse`` in each), every field
    is analysed and sessions are compared across mice by a mixed model.
    """
    from ketamap.invivo import run_ensembles

    if len(sessions) > 1:
        from ketamap.invivo.cohort import run_ensembles_mice

        res = run_ensembles_mice(sessions, out_dir, unit=unit)
        for row in res["statistics"]:
            out.print(
                f"  {row['measure']}, {row['session']} vs {row['reference']}: "
                f"{row['estimate']:+.3g} (p = {row['p_value']:.2g}; {row['method']})"
            )
        out.print(
            f"wrote {out_dir}/statistics.csv and {out_dir}/report.html ({res['n_mice']} mice)"
        )
        return
    result = run_ensembles(sessions[0], out_dir)
    for row in result["sessions"]:
        label = row.get("session", "")
        n = result["n_ensembles"].get(label, 0)
        frac = row.get("fraction_coactive_bins", float("nan"))
        out.print(f"  {label}: {n} ensembles, coactive fraction {frac:.3f}")
    out.print(f"cells matched across sessions by {result.get('cell_matching', 'index')}")
    out.print(f"wrote {out_dir}/ensembles.csv, {out_dir}/sessions.csv and {out_dir}/report.html")


@app.command()
def spines(
    sessions: Annotated[Path, typer.Argument(help="Spine sessions file (TOML).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    annotations: Annotated[
        Optional[Path],
        typer.Option(help="Corrected spines (CSV, or a folder of napari points CSVs)."),
    ] = None,
):
    """Track dendritic spines across sessions; formation, elimination, return to lost sites."""
    from ketamap.invivo.spines import run_spines

    result = run_spines(sessions, out_dir, annotations=annotations)
    for row in result["pooled"]:
        out.print(
            f"  {row['interval']}: formation {100 * row['formation_rate']:.1f}%, "
            f"elimination {100 * row['elimination_rate']:.1f}% (n={row['n_a']})"
        )
    rs = result["return_sites"]
    out.print(
        f"  return to lost sites: {rs['n_near']}/{rs['n_new']} new spines, chance "
        f"{rs['null_share_mean']:.2f}, p = {rs['p_value']:.3g}"
    )
    out.print(f"wrote {out_dir}/rates.csv, {out_dir}/spines.csv and {out_dir}/report.html")


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
    """Entry point: run the app, turning KetamapError into one sentence and exit 2.

    Ctrl-C and SIGTERM stop the run (worker processes included), print "aborted" and
    exit 130 and 143; what was being written is a temporary a re-run removes.
    """
    import threading

    _interrupt.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_interrupt)
    try:
        _run_app()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_app() -> None:
    try:
        code = app(standalone_mode=False)  # an Exit's code is returned, not raised
    except KetamapError as e:
        from rich.markup import escape  # a message may hold brackets ("ketamap[ants]", paths)

        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except OSError as e:  # disk full, permission denied ... not caught where it was written
        from ketamap.io.atomic import disk_error

        mapped = disk_error(e)
        if mapped is None:
            raise
        err.print(f"[bold red]error:[/] {mapped}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise
    if _interrupt or code == 130:  # typer returns 130 for an interrupt it caught
        err.print("aborted")
        sys.exit(128 + (_interrupt[-1] if _interrupt else signal.SIGINT))
    if isinstance(code, int) and code:
        sys.exit(code)


_interrupt: list[int] = []  # the signal that stopped this run, if any


def _on_interrupt(signum, frame):
    """SIGINT or SIGTERM: unwind from wherever the main thread is, as Ctrl-C does."""
    _interrupt.append(int(signum))
    raise KeyboardInterrupt()
