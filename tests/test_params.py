from dataclasses import dataclass, field

import pytest

from ketamap.errors import ParameterError
from ketamap.params import bounds, from_mapping, to_dict, validate


@dataclass(frozen=True)
class P:
    soma_diameter_um: float = field(default=15.0, metadata=bounds(gt=0))
    voxel_size_um: tuple[float, float, float] = field(
        default=(1.0, 1.0, 1.0), metadata=bounds(gt=0)
    )
    mode: str = field(default="a", metadata=bounds(choices=("a", "b")))
    n: int = field(default=3, metadata=bounds(ge=1, le=10))

    def __post_init__(self):
        validate(self)


def test_from_mapping_coerces_losslessly():
    p = from_mapping(P, {"soma_diameter_um": 3, "voxel_size_um": [1, 2, 3]})
    assert p.soma_diameter_um == 3.0 and p.voxel_size_um == (1.0, 2.0, 3.0)
    assert to_dict(p)["voxel_size_um"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "mapping,match",
    [
        ({"soma_diamter_um": 3}, 'did you mean "soma_diameter_um"'),
        ({"soma_diameter_um": -1}, "greater than 0, got -1.0"),
        ({"voxel_size_um": [1, 0, 2]}, "greater than 0"),
        ({"mode": "c"}, "one of 'a', 'b'"),
        ({"soma_diameter_um": "x"}, "must be of type float"),
        ({"n": 2.5}, "must be of type int"),
        ({"n": 11}, "at most 10"),
        ({"n": True}, "must be of type int"),
        ({"soma_diameter_um": float("nan")}, "NaN"),
    ],
)
def test_errors_name_parameter_value_and_expectation(mapping, match):
    with pytest.raises(ParameterError, match=match):
        from_mapping(P, mapping, where="[detection]")


def test_frozen():
    p = P()
    with pytest.raises(AttributeError):
        p.n = 4
