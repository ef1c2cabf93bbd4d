"""Simulators with known ground truth: the demo's embedded default and the tests' yardstick.

The names are imported on first use (their list is ``__init__.pyi``), so
``import ketamap.simulate`` stays cheap.
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
