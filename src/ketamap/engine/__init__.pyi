"""Public names of ``ketamap.engine``, imported lazily by ``__init__.py``."""

__all__ = ["StageRun", "fingerprint", "run_stage", "stage_key", "stage_result", "versions"]

from .stage import StageRun, fingerprint, run_stage, stage_key, stage_result, versions
