"""Figures and the self-contained HTML report.

Submodules (and matplotlib, jinja2) are imported on first use, so
``import ketamap.report`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=["figures", "html", "qc", "maps"],
    submod_attrs={
        "html": ["render_report", "write_report"],
        "figures": ["save_figures", "make_figures"],
    },
)
