"""Fixtures shared by the report tests: one small census case (study, subjects, QC, tables).

The case is built once, by ``cohort`` in ``test_report.py``; other test modules take it
as a fixture instead of importing that module by path.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def census_case():
    """``(study, subjects, qc, regions, counts)`` of a 12-mouse, 40-region census."""
    from test_report import cohort

    return cohort()
