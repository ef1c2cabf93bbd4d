"""Public names of ``ketamap.report``, imported lazily by ``__init__.py``."""

__all__ = [
    "figures",
    "html",
    "make_figures",
    "maps",
    "qc",
    "render_report",
    "save_figures",
    "write_report",
]

from . import figures, html, maps, qc
from .figures import make_figures, save_figures
from .html import render_report, write_report
