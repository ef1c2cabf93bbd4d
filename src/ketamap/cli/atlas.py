"""``ketamap atlas``: build an atlas folder from the Allen files, and inspect atlases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ketamap.cli._common import err, out

app = typer.Typer(no_args_is_help=True, help="Build and inspect atlases.")


@app.command("build")
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

    at = load_allen(annotation, structures, hemispheres_path=hemispheres,
                    reference_path=reference, resolution_um=resolution, name=name)  # fmt: skip
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


@app.command("info")
def atlas_info(
    spec: Annotated[str, typer.Argument(help="phantom, a BrainGlobe name or a folder.")],
):
    """Print an atlas' shape, resolution, orientation and size of its ontology."""
    from ketamap.atlas import load_atlas

    at = load_atlas(spec)
    reference = (
        "synthetic (made from the annotation, not an image: a real brain cannot be "
        "registered to it)"
        if at.synthetic_reference
        else ("yes" if at.reference is not None else "no")
    )
    out.print(
        f"{at.name}: shape {at.shape}, resolution {at.resolution_um} µm, orientation "
        f"{at.orientation}, {len(at.ontology.ids)} structures, reference {reference}"
    )
