"""What every command shares: the consoles, option types and progress bars."""

from __future__ import annotations

import contextlib
import logging
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


def progress_bar(total: int, label: str) -> Progress:
    """Return a progress bar of ``total`` steps on stderr (silent off a terminal)."""
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


def ticker(bar: Progress):
    """Return a callback that advances ``bar`` by one named step."""

    def advance(name: str) -> None:
        bar.update(bar.task_ids[0], advance=1, description=name)
        if not err.is_terminal:
            task = bar.tasks[0]
            err.print(f"  [{int(task.completed)}/{int(task.total)}] {name}", highlight=False)

    return advance


def dask_progress(local: bool = True):
    """Return Dask's progress bar on a terminal for work run here, else a null context."""
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr) if err.is_terminal and local else contextlib.nullcontext()


class _LazyFileHandler(logging.FileHandler):
    """A file handler that makes its folder and file at the first record, not before."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def log_file(path: Path):
    """Append the INFO records of ketamap (and of a cluster run) to ``path`` meanwhile."""
    handler = _LazyFileHandler(path, encoding="utf-8", delay=True)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


class DefaultCommand(TyperGroup):
    """A group whose first command runs when no command is named.

    ``ketamap detect SIGNAL ...`` runs ``detect cells``, ``ketamap detect train ...``
    trains (a signal folder literally named ``train`` is written ``./train``).
    """

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)
