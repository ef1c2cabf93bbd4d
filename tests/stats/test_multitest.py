"""The multiple-testing adjustments agree with statsmodels, ignore NaN and check their input."""

from __future__ import annotations

import numpy as np
import pytest

from ketamap.errors import InputError
from ketamap.stats.multitest import benjamini_hochberg, holm


@pytest.mark.parametrize(("ours", "method"), [(holm, "holm"), (benjamini_hochberg, "fdr_bh")])
def test_adjustments_match_statsmodels(ours, method):
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = np.random.default_rng(1)
    p = np.r_[rng.uniform(size=50), rng.uniform(0, 1e-3, 5), [0.0, 1.0]]
    np.testing.assert_allclose(ours(p), multitest.multipletests(p, method=method)[1], rtol=1e-12)
    with_nan = p.copy()
    with_nan[::4] = np.nan
    ok = ~np.isnan(with_nan)
    got = ours(with_nan)
    assert np.isnan(got[~ok]).all()
    np.testing.assert_allclose(got[ok], multitest.multipletests(p[ok], method=method)[1])
    assert ours(np.array([])).shape == (0,)
    assert ours(p[:56].reshape(7, 8)).shape == (7, 8)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ours([0.2, 1.5])
