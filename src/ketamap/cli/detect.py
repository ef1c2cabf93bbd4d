"""``ketamap detect``: detect somata in a volume, or train the classifier that checks them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ketamap.cli._common import (
    ClusterKind,
    ClusterWorkers,
    DefaultCommand,
    SchedulerAddress,
    VoxelSize,
    dask_progress,
    out,
)

app = typer.Typer(
    cls=DefaultCommand,
    no_args_is_help=True,
    help="Detect labelled somata (ketamap detect SIGNAL ...), or train the classifier "
    "that checks them (ketamap detect train ...).",
)
Signal = Annotated[
    Path,
    typer.Argument(help="TIFF planes folder, multipage TIFF, OME-Zarr, Imaris .ims or NIfTI."),
]
Background = Annotated[Optional[Path], typer.Option(help="Autofluorescence channel.")]
SomaDiameter = Annotated[float, typer.Option("--soma-diameter", help="µm.")]


def _params(soma_diameter: float):
    from ketamap.params import from_mapping
    from ketamap.wholebrain.detect import DetectionParams

    return from_mapping(
        DetectionParams, {"soma_diameter_um": soma_diameter}, where="--soma-diameter"
    )


@app.command("cells")
def detect(
    signal: Signal,
    voxel_size: VoxelSize,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    background: Background = None,
    soma_diameter: SomaDiameter = 15.0,
    classifier: Annotated[
        Optional[Path],
        typer.Option(help="A trained candidate classifier (JSON) applied as a second pass."),
    ] = None,
    scheduler: SchedulerAddress = None,
    cluster: ClusterKind = None,
    workers: ClusterWorkers = 2,
):
    """Detect labelled somata (the default: ketamap detect SIGNAL runs this).

    Writes cells.parquet, cells.csv and cells.xml; tissue_mask.ome.zarr (the
    coarse mask of where cells were searched for, 1 = tissue); and
    detection_qc.json (candidates dropped outside the tissue and below its
    noise floor, tissue fraction and levels). Train a classifier for
    --classifier with "ketamap detect train" (see "ketamap detect train --help").
    """
    from ketamap.engine.scheduler import use_scheduler
    from ketamap.io.atomic import atomic_dir
    from ketamap.io.volumes import open_volume
    from ketamap.pipelines.census_stages import detect_into
    from ketamap.wholebrain.classify import load_classifier

    params = _params(soma_diameter)
    model = load_classifier(classifier) if classifier is not None else None  # fail early
    vol = open_volume(signal)
    bg = open_volume(background) if background else None
    local = not (scheduler or cluster)
    with (
        use_scheduler(scheduler, cluster, n_workers=workers),
        dask_progress(local),
        atomic_dir(out_dir) as tmp,
    ):
        qc = detect_into(tmp, vol, voxel_size_um=voxel_size, params=params, background=bg,
                         classifier=model)  # fmt: skip
    fraction = qc["tissue_fraction"]
    tissue = (
        "no tissue mask" if fraction is None else f"tissue {100 * fraction:.1f} % of the volume"
    )
    n_out = qc["n_outside_tissue"]
    out.print(
        f"{qc['n_cells']} cells; {n_out} candidate{'' if n_out == 1 else 's'} outside the "
        f"tissue dropped ({tissue}) -> {out_dir}",
        highlight=False,
    )


@app.command("train")
def detect_train(
    signal: Signal,
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
    background: Background = None,
    soma_diameter: SomaDiameter = 15.0,
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
    from ketamap.io.points import read_annotations
    from ketamap.io.volumes import open_volume
    from ketamap.wholebrain.classify import (
        combine_annotations,
        save_classifier,
        train_from_annotations,
    )

    if points is None and cells is None:
        raise ParameterError("Give the annotated cells: --cells (and --non-cells), or --points.")
    params = _params(soma_diameter)

    def read(path):
        return None if path is None else read_annotations(path)

    annotations = combine_annotations(
        cells=read(cells), non_cells=read(non_cells), points=read(points)
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
