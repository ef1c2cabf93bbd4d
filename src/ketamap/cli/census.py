"""Whole-brain census commands: a study (validate, run, stats, report) and its single stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ketamap.cli._common import (
    ClusterKind,
    ClusterWorkers,
    SchedulerAddress,
    VoxelSize,
    dask_progress,
    err,
    log_file,
    out,
    progress_bar,
    ticker,
)
from ketamap.errors import KetamapError

app = typer.Typer()
PANEL = "Whole-brain census"
Manifest = Annotated[Path, typer.Argument(help="Study manifest (TOML).")]
Force = Annotated[bool, typer.Option(help="Recompute outputs that are up to date.")]


@app.command(rich_help_panel=PANEL)
def validate(manifest: Manifest):
    """Check a study (manifest, parameters, atlas, images) and print what it declares."""
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import check_study

    study = load_study(manifest)
    at = check_study(study)["atlas"]
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


@app.command(rich_help_panel=PANEL)
def run(
    manifest: Manifest,
    stage: Annotated[
        Optional[list[str]],
        typer.Option(
            "--stage",
            help="Run only these stages (detect, register, quantify, fibres, stats, report).",
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Subjects in parallel.")] = 1,
    force: Force = False,
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
    """Run (or resume) every stage of a study; up-to-date stages are skipped.

    Every stage's log (and, on a cluster, the scheduler's and workers' joining and
    leaving) is appended to logs/ketamap.log in the study folder.
    """
    from rich.markup import escape

    from ketamap.engine.scheduler import use_scheduler
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import run_study

    study = load_study(manifest)
    with (
        log_file(study.root / "logs" / "ketamap.log"),
        use_scheduler(scheduler, cluster, n_workers=workers),
        progress_bar(len(study.subjects) + 2, "census") as bar,
    ):
        summary = run_study(manifest, stages=stage, n_jobs=jobs, force=force,
                            allow_flagged=allow_flagged, progress=ticker(bar))  # fmt: skip
    ran = sum(v is True for r in summary.subjects for v in r.values())
    out.print(
        f"{study.name}: {len(study.subjects)} subjects, {ran} subject stages run, "
        f"outputs in {study.root} ({summary.seconds:.0f} s)"
    )
    for r in summary.subjects:
        if r.get("flags"):
            text = escape(f"{r['subject']} counted although " + " and ".join(r["flags"]))
            err.print(f"[yellow]warning:[/] {text}", highlight=False)
    report = study.root / "report.html"  # the one the user opens (report/ holds its parts)
    if report.exists() and (stage is None or "report" in stage):
        out.print(f"report: {report}")


@app.command(rich_help_panel=PANEL)
def stats(manifest: Manifest, force: Force = False):
    """Compare groups per region (needs quantified subjects)."""
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import run_stats

    study = load_study(manifest)
    run_stats(study, force=force)
    out.print(f"wrote {study.root / 'stats' / 'regions.csv'}")


@app.command(rich_help_panel=PANEL)
def report(manifest: Manifest, force: Force = False):
    """Rebuild the HTML report from a study's outputs."""
    from ketamap.manifest import load_study
    from ketamap.pipelines.census import run_report

    study = load_study(manifest)
    run_report(study, force=force)
    out.print(f"wrote {study.root / 'report.html'}")


# --------------------------------------------------------------------------- single stages


@app.command(rich_help_panel=PANEL)
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
    from ketamap.pipelines.census_stages import register_into
    from ketamap.space import check_orientation
    from ketamap.wholebrain.register import RegistrationParams

    orientation = check_orientation(orientation, where="--orientation")
    params = from_mapping(RegistrationParams, {"engine": engine}, where="--engine")
    at = load_atlas(atlas)
    image = open_volume(brain)
    with atomic_dir(out_dir) as tmp:
        qc = register_into(tmp, image, at, voxel_size_um=voxel_size, orientation=orientation,
                           params=params, title=brain.name)  # fmt: skip
    flag = "[red]FLAGGED[/]: " + "; ".join(qc["reasons"]) if qc.get("flagged") else "[green]ok[/]"
    correlation = qc.get("correlation_after", float("nan"))
    out.print(f"registration {flag}; correlation {correlation:.3f} -> {out_dir}")


@app.command(rich_help_panel=PANEL)
def quantify(
    cells: Annotated[Path, typer.Option(help="cells.parquet/.csv/.xml from detect.")],
    registration: Annotated[Path, typer.Option(help="Output folder of register.")],
    atlas: Annotated[str, typer.Option(help="The atlas used for registration.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
):
    """Map cells to the atlas and count them per region at every level."""
    from ketamap.atlas import load_atlas
    from ketamap.io.atomic import atomic_dir
    from ketamap.io.points import read_points
    from ketamap.pipelines.census_stages import quantify_into

    at = load_atlas(atlas)
    table = read_points(cells)
    with atomic_dir(out_dir) as tmp:
        summary = quantify_into(tmp, table, registration, at)
    out.print(
        f"{summary['n_in_regions']} of {summary['n_cells']} cells in regions "
        f"({summary['n_outside_volume']} outside the atlas, {summary['n_unlabelled']} unlabelled)"
        f" -> {out_dir}/regions.csv"
    )


@app.command(rich_help_panel="Data")
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
    with dask_progress():
        write_ome_zarr(volume, out_path, voxel_size_um=voxel_size, levels=levels,
                       **({"chunks": chunks} if chunks else {}))  # fmt: skip
    out.print(f"wrote {out_path} ({volume.shape}, {volume.dtype})")


@app.command(rich_help_panel=PANEL)
def fibres(
    signal: Annotated[
        Path,
        typer.Argument(help="TIFF planes folder, multipage TIFF, OME-Zarr, Imaris .ims or NIfTI."),
    ],
    voxel_size: VoxelSize,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    background: Annotated[Optional[Path], typer.Option(help="Autofluorescence channel.")] = None,
    cells: Annotated[
        Optional[Path],
        typer.Option(help="Detected cells (cells.parquet/.csv/.xml): their bodies are not fibre."),
    ] = None,
    registration: Annotated[
        Optional[Path],
        typer.Option(help="Output folder of register: adds the per-region table (with --atlas)."),
    ] = None,
    atlas: Annotated[Optional[str], typer.Option(help="The atlas used for registration.")] = None,
    scheduler: SchedulerAddress = None,
    cluster: ClusterKind = None,
    workers: ClusterWorkers = 2,
):
    """Segment TH+ fibres; writes the fibre mask, its skeleton, the QC and the length table.

    Writes fibre_mask.ome.zarr (uint8, 1 = fibre, the input's grid), skeleton.ome.zarr,
    fibre_qc.json (noise, total length) and, with --registration and --atlas,
    fibre_regions.parquet/.csv (length density, voxel fraction and intensity per region,
    every hierarchy level, left and right) and fibre_density_atlas.ome.zarr (the
    skeleton's length per atlas voxel, mm per mm³, on the atlas grid).
    """
    from ketamap.atlas import load_atlas
    from ketamap.engine.scheduler import use_scheduler
    from ketamap.io.atomic import atomic_dir
    from ketamap.io.points import read_points
    from ketamap.io.volumes import open_volume
    from ketamap.pipelines.census_stages import fibres_into
    from ketamap.wholebrain.fibres import FibreParams

    at = load_atlas(atlas) if atlas is not None else None
    somata = read_points(cells) if cells is not None else None
    local = not (scheduler or cluster)
    with (
        use_scheduler(scheduler, cluster, n_workers=workers),
        dask_progress(local),
        atomic_dir(out_dir) as tmp,
    ):
        qc = fibres_into(tmp, open_volume(signal), voxel_size_um=voxel_size,
                         params=FibreParams(), background=open_volume(background) if background
                         else None, somata=somata, registration_dir=registration,
                         atlas=at)  # fmt: skip
    regions = f", {qc['n_regions']} regions" if "n_regions" in qc else ""
    out.print(f"{qc['total_length_mm']:.1f} mm of fibre{regions} -> {out_dir}", highlight=False)
