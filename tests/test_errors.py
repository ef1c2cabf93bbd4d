"""Optional dependencies: one helper, one sentence with the install command."""

from __future__ import annotations

import pytest

from ketamap.errors import InputError, ParameterError, require


def test_require_imports_or_says_how_to_install():
    assert require("math", needed_for="Counting", install="math").__name__ == "math"
    with pytest.raises(ParameterError) as e:
        require("no_such_module.sub", needed_for='Engine "x"', install="ketamap[x]",
                otherwise=' or set engine = "y"')  # fmt: skip
    assert str(e.value) == (
        'Engine "x" needs the no_such_module package; install it with '
        'pip install "ketamap[x]" or set engine = "y".'
    )
    with pytest.raises(InputError, match="needs PyTorch"):
        require("no_such_module", needed_for="It", install="torch", what="PyTorch",
                error=InputError)  # fmt: skip
