"""ketamap: measure how a drug remodels the mouse brain.

Importing ``ketamap`` is cheap and side-effect free; the analysis wings
(``ketamap.atlas``, ``ketamap.wholebrain``, ``ketamap.stats`` ...) are imported
when first used.
"""

from ketamap.errors import KetamapError

__version__ = "0.1.0"

__all__ = ["KetamapError", "__version__"]
