"""The ``ketamap`` command line: each subcommand parses, calls one library function, prints.

One typer sub-app per wing: :mod:`~ketamap.cli.census` (a study and its single
stages), :mod:`~ketamap.cli.detect`, :mod:`~ketamap.cli.atlas`,
:mod:`~ketamap.cli.invivo` (ensembles, spines) and :mod:`~ketamap.cli.simulate`
(simulators and the demo). Errors a user can act on
(:class:`~ketamap.errors.KetamapError`) are printed as one sentence without a
traceback and the command exits with status 2.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated

import typer

from ketamap.cli import atlas, census, detect, invivo, simulate
from ketamap.cli._common import err
from ketamap.errors import KetamapError

__all__ = ["app", "main"]

app = typer.Typer(
    name="ketamap",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Measure how a drug remodels the mouse brain: whole-brain cell census and more.",
)
app.add_typer(simulate.demo_app)
app.add_typer(census.app)
app.add_typer(detect.app, name="detect", rich_help_panel="Whole-brain census")
app.add_typer(atlas.app, name="atlas", rich_help_panel="Data")
app.add_typer(invivo.app)
app.add_typer(simulate.app, name="simulate", rich_help_panel="Start here")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")] = False,
):
    # The console shows warnings (every record with -v); ketamap's own records go on to
    # whatever file handler a command adds (the study's logs/ketamap.log for `run`).
    root = logging.getLogger()
    if not root.handlers:  # (as logging.basicConfig: a host that set up logging keeps it)
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console.setLevel(logging.INFO if verbose else logging.WARNING)
        root.addHandler(console)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ketamap").setLevel(logging.INFO)


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
