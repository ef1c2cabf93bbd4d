"""One mechanism for stage parameters: frozen dataclasses checked at the boundary.

Each stage declares its parameters as a frozen dataclass whose fields carry
units in their names and, in their metadata, the allowed range::

    @dataclass(frozen=True)
    class DetectionParams:
        soma_diameter_um: float = field(default=15.0, metadata=bounds(gt=0))

        def __post_init__(self):
            validate(self)

:func:`validate` checks types and ranges and raises :class:`ParameterError`
with the name, the value received and what was expected. :func:`from_mapping`
builds such an object from a TOML table or CLI overrides; an unknown key is an
error that names the nearest valid key. Values are never rewritten silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ketamap.errors import ParameterError

__all__ = ["bounds", "validate", "from_mapping", "did_you_mean", "to_dict"]

T = TypeVar("T")


def bounds(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    doc: str = "",
) -> dict:
    """Metadata for a dataclass field: numeric bounds or a set of choices.

    Parameters
    ----------
    gt, ge, lt, le : float, optional
        Strict / inclusive lower and upper bounds. For tuple fields they apply
        to every element.
    choices : tuple, optional
        The allowed values.
    doc : str
        One line describing the parameter (shown in errors and docs).

    Returns
    -------
    dict
        To pass as ``dataclasses.field(metadata=...)``.
    """
    return {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "doc": doc}


def did_you_mean(word: str, candidates) -> str:
    """Return ``' (did you mean "x"?)'`` for the closest candidate, or ``''``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _check_bounds(name: str, value: Any, meta: Mapping, owner: str) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        options = ", ".join(repr(c) for c in meta["choices"])
        raise ParameterError(
            f"{owner}.{name} must be one of {options}, got {value!r}"
            f"{did_you_mean(value, meta['choices'])}."
        )
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if v != v:  # NaN
            raise ParameterError(f"{owner}.{name} must be a number, got NaN.")
        checks = [
            ("gt", operator.gt, "greater than"),
            ("ge", operator.ge, "at least"),
            ("lt", operator.lt, "less than"),
            ("le", operator.le, "at most"),
        ]
        for key, ok, words in checks:
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise ParameterError(f"{owner}.{name} must be {words} {bound}, got {value!r}.")


def validate(obj: Any) -> None:
    """Check every field of a parameters dataclass against its type and bounds.

    Parameters
    ----------
    obj : dataclass instance
        A parameters object whose fields may carry :func:`bounds` metadata.

    Raises
    ------
    ParameterError
        Naming the field, the value received and what was expected.
    """
    owner = type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        annotation = hints.get(f.name, Any)
        if not _type_ok(value, annotation):
            raise ParameterError(
                f"{owner}.{f.name} must be of type {_type_name(annotation)}, "
                f"got {type(value).__name__} {value!r}."
            )
        _check_bounds(f.name, value, f.metadata, owner)


def _coerce(value: Any, annotation: Any) -> Any:
    """Turn TOML/CLI values into the declared type where that is lossless."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None) and _type_ok(_coerce(value, arg), arg):
                return _coerce(value, arg)
        return value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) == len(value):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build a parameters dataclass from a mapping (a TOML table, CLI overrides).

    Parameters
    ----------
    cls : type
        The frozen parameters dataclass.
    mapping : mapping or None
        Keys are field names. Lists become tuples for tuple fields and integers
        become floats for float fields; nothing else is converted.
    where : str
        Where the mapping came from (e.g. ``"[detection] in study.toml"``), used
        in error messages.

    Returns
    -------
    instance of ``cls``

    Raises
    ------
    ParameterError
        For an unknown key (naming the nearest valid key), a wrong type or a
        value out of range.
    """
    mapping = dict(mapping or {})
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    place = f" in {where}" if where else ""
    suffix = f" (in {where})" if where else ""
    for key in mapping:
        if key not in names:
            raise ParameterError(
                f'Unknown parameter "{key}"{place}{did_you_mean(key, names)}; '
                f"valid keys are: {', '.join(names)}."
            )
    kwargs = {k: _coerce(v, hints.get(k, Any)) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except ParameterError as e:
        raise ParameterError(f"{str(e).rstrip('.')}{suffix}.") from e


def to_dict(obj: Any) -> dict:
    """Return a parameters dataclass as a plain, JSON-ready dict (tuples as lists)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
