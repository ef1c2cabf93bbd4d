"""``ketamap simulate``: studies with known ground truth; ``ketamap demo`` runs one end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ketamap.cli._common import out, progress_bar, ticker

app = typer.Typer(no_args_is_help=True, help="Simulate studies with known ground truth.")
demo_app = typer.Typer()


@app.command("census")
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
    with progress_bar(n, "simulate") as bar:
        manifest = simulate_census(
            out_dir,
            atlas=atlas,
            scenario=scenario,
            n_per_group=n_per_group,
            params=params,
            seed=seed,
            n_jobs=jobs,
            progress=ticker(bar),
        )
    out.print(f"wrote {manifest}")


@app.command("calcium")
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


@app.command("spines")
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


@demo_app.command(rich_help_panel="Start here")
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
        progress_factory=progress_bar,
        tick=ticker,
    )
    print_summary(result, out)
