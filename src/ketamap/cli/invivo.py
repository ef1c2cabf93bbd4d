"""In-vivo commands: coactive ensembles from calcium imaging, and dendritic spine turnover."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ketamap.cli._common import out

app = typer.Typer()
Force = Annotated[bool, typer.Option(help="Recompute outputs that are up to date.")]


def _skipped(result: dict, out_dir: Path) -> None:
    if not result.get("ran", True):
        out.print(f"{out_dir} is up to date (same inputs and parameters); skipped, --force reruns")


@app.command(rich_help_panel="In vivo")
def ensembles(
    sessions: Annotated[
        list[Path], typer.Argument(help="Sessions file (TOML); one per field of view.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    unit: Annotated[
        str, typer.Option(help="Several fields: the mixed model's unit, field or cell.")
    ] = "field",
    force: Force = False,
):
    """Find coactive ensembles per session and compare coordination across sessions.

    With several sessions files (one per field of view, ``mouse`` in each), every field
    is analysed and sessions are compared across mice by a mixed model.
    """
    from ketamap.pipelines import run_ensembles

    if len(sessions) > 1:
        from ketamap.pipelines.ensembles import run_ensembles_mice

        res = run_ensembles_mice(sessions, out_dir, unit=unit, force=force)
        for row in res["statistics"]:
            out.print(
                f"  {row['measure']}, {row['session']} vs {row['reference']}: "
                f"{row['estimate']:+.3g} (p = {row['p_value']:.2g}; {row['method']})"
            )
        out.print(
            f"wrote {out_dir}/statistics.csv and {out_dir}/report.html ({res['n_mice']} mice)"
        )
        return
    result = run_ensembles(sessions[0], out_dir, force=force)
    _skipped(result, out_dir)
    for row in result["sessions"]:
        label = row.get("session", "")
        n = result["n_ensembles"].get(label, 0)
        frac = row.get("fraction_coactive_bins", float("nan"))
        out.print(f"  {label}: {n} ensembles, coactive fraction {frac:.3f}")
    out.print(f"cells matched across sessions by {result.get('cell_matching', 'index')}")
    out.print(f"wrote {out_dir}/ensembles.csv, {out_dir}/sessions.csv and {out_dir}/report.html")


@app.command(rich_help_panel="In vivo")
def spines(
    sessions: Annotated[Path, typer.Argument(help="Spine sessions file (TOML).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")],
    annotations: Annotated[
        Optional[Path],
        typer.Option(help="Corrected spines (CSV, or a folder of napari points CSVs)."),
    ] = None,
    force: Force = False,
):
    """Track dendritic spines across sessions; formation, elimination, return to lost sites."""
    from ketamap.pipelines import run_spines

    result = run_spines(sessions, out_dir, annotations=annotations, force=force)
    _skipped(result, out_dir)
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
