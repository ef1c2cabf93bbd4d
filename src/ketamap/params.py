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

The same function reads the tables of the files users write (the manifests of
:mod:`ketamap.manifest`): given a :class:`Source`, it also builds nested tables,
lists of tables (:func:`tables`) and path fields, checks every type up front and
words each mistake as "KEY in WHERE must be ..., got VALUE.", raised as the
source's error class.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ketamap.errors import KetamapError, ParameterError

__all__ = [
    "bounds",
    "tables",
    "validate",
    "from_mapping",
    "check_keys",
    "did_you_mean",
    "to_dict",
    "Source",
]

T = TypeVar("T")


def bounds(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    doc: str = "",
    nonempty: bool = False,
    check: Callable[..., Any] | None = None,
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
    nonempty : bool
        A string that must not be empty (or blank).
    check : callable, optional
        ``check(value, where=WHAT) -> value``: a further rule (e.g.
        :func:`ketamap.space.check_orientation`) that :func:`from_mapping`
        applies to a given value, keeping what it returns; ``WHAT`` names the
        key and its place. A :class:`~ketamap.errors.KetamapError` it raises is
        re-raised with the same sentence.

    Returns
    -------
    dict
        To pass as ``dataclasses.field(metadata=...)``.
    """
    return {
        "gt": gt,
        "ge": ge,
        "lt": lt,
        "le": le,
        "choices": choices,
        "doc": doc,
        "nonempty": nonempty,
        "check": check,
    }


def tables(
    noun: str,
    *,
    label: str | None = None,
    unique: bool = False,
    at_least: int = 0,
    check: Callable[..., Any] | None = None,
) -> dict:
    """Metadata for a list-of-tables field (``tuple[SomeTable, ...]``, TOML ``[[key]]``).

    Parameters
    ----------
    noun : str
        What one table is (``"subject"``), to name it in messages: ``subject "m1"``
        when it has a ``label``, else ``subject #2``.
    label : str, optional
        The key that names a table.
    unique : bool
        No two tables may have the same ``label``.
    at_least : int
        The fewest tables allowed (a missing key counts as none).
    check : callable, optional
        ``check(tables, where=WHAT) -> tables``: a rule over the whole list (e.g.
        time order), applied as soon as it is read, as in :func:`bounds`.

    Returns
    -------
    dict
        To pass as ``dataclasses.field(metadata=...)``.
    """
    return {
        "tables": True,
        "noun": noun,
        "label": label,
        "unique": unique,
        "at_least": at_least,
        "check": check,
    }


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


def _check_bounds(label: str, value: Any, meta: Mapping, error: type = ParameterError) -> None:
    """Check ``value`` against :func:`bounds` metadata; ``label`` names it in the message."""
    if meta.get("choices") is not None and value not in meta["choices"]:
        options = ", ".join(repr(c) for c in meta["choices"])
        raise error(
            f"{label} must be one of {options}, got {value!r}"
            f"{did_you_mean(value, meta['choices'])}."
        )
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        raise error(f"{label} must not be empty.")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if v != v:  # NaN
            raise error(f"{label} must be a number, got NaN.")
        checks = [
            ("gt", operator.gt, "greater than"),
            ("ge", operator.ge, "at least"),
            ("lt", operator.lt, "less than"),
            ("le", operator.le, "at most"),
        ]
        for key, ok, words in checks:
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise error(f"{label} must be {words} {bound}, got {value!r}.")


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
        _check_bounds(f"{owner}.{f.name}", value, f.metadata)


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


@dataclasses.dataclass(frozen=True)
class Source:
    """How :func:`from_mapping` reads the tables of a file a user wrote (a manifest).

    Attributes
    ----------
    error : type
        Raised for every mistake in the file, with one sentence (e.g.
        :class:`~ketamap.errors.ManifestError`).
    path : callable
        ``path(value, what) -> Path`` turns the string of a :class:`~pathlib.Path`
        field into a path (the one path rule of the file kind); ``what`` names the
        key and its place (``'signal in subject "m1" of study.toml'``).
    """

    error: type[Exception]
    path: Callable[[str, str], Path]


def check_keys(
    mapping: Mapping,
    names,
    *,
    where: str = "",
    noun: str = "parameter",
    error: type[Exception] = ParameterError,
) -> None:
    """Raise one sentence naming the nearest valid key for the first unknown key of ``mapping``.

    Parameters
    ----------
    mapping : mapping
        The table read.
    names : iterable of str
        The valid keys.
    where : str
        Where the table is, for the message.
    noun : str
        What a key is called (``"parameter"``, ``"key"``).
    error : type
        The exception raised.

    Raises
    ------
    error
        ``Unknown NOUN "KEY" in WHERE (did you mean "X"?); valid keys are: ...``.
    """
    names = [str(n) for n in names]
    place = f" in {where}" if where else ""
    for key in mapping:
        if key not in names:
            raise error(
                f'Unknown {noun} "{key}"{place}{did_you_mean(key, names)}; '
                f"valid keys are: {', '.join(names)}."
            )


def from_mapping(
    cls: type[T],
    mapping: Mapping[str, Any] | None,
    *,
    where: str = "",
    source: Source | None = None,
) -> T:
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
    source : Source, optional
        Given when the mapping is a table of a file a user wrote (a manifest).
        Then a key is called a key, a field whose type is a dataclass is built
        from a nested table (named ``[key] of WHERE``), a ``tuple[Table, ...]``
        field from a list of tables (see :func:`tables`), a
        :class:`~pathlib.Path` field by ``source.path`` (also as the values of a
        ``dict[str, Path]``), a field without a default must be given, numbers
        must be finite, and every type, bound and ``check`` is tested before
        ``cls`` is built, each mistake raised as ``source.error`` with one
        sentence that names the key and ``where``.

    Returns
    -------
    instance of ``cls``

    Raises
    ------
    ParameterError
        For an unknown key (naming the nearest valid key), a wrong type or a
        value out of range (``source.error`` when a source is given).
    """
    if source is not None:
        return _read_table(cls, mapping or {}, where, source)
    mapping = dict(mapping or {})
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    suffix = f" (in {where})" if where else ""
    check_keys(mapping, names, where=where)
    kwargs = {k: _coerce(v, hints.get(k, Any)) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except ParameterError as e:
        raise ParameterError(f"{str(e).rstrip('.')}{suffix}.") from e


# --------------------------------------------------------------------------- file tables

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _optional(annotation: Any) -> Any:
    """``X`` for ``X | None``, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_table(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping | dict)


def _describe(annotation: Any) -> str:
    """Say in words what a value of ``annotation`` is (``"a number"``)."""
    annotation = _optional(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        words = [_describe(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(dict.fromkeys(words))
    if annotation is float:
        return "a number"
    if annotation is int:
        return "a whole number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if annotation is Path:
        return "a path string"
    if _is_table(annotation) or _is_mapping(annotation):
        return "a table"
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a list of tables" if _is_table(args[0]) else "a list"
        if args and all(a == args[0] for a in args):
            plural = {"a number": "numbers", "a whole number": "whole numbers"}.get(
                _describe(args[0]), "strings" if args[0] is str else "values"
            )
            return f"a list of {_NUMBER_WORDS.get(len(args), len(args))} {plural}"
        return f"a list of {len(args)} values"
    return "a value" if annotation is Any else f"of type {_type_name(annotation)}"


def _scalar(value: Any, annotation: Any, what: str, error: type) -> Any:
    """Check (and losslessly coerce) one scalar value: a number, string, bool or union."""
    coerced = _coerce(value, annotation)
    if not _type_ok(coerced, annotation):
        raise error(f"{what} must be {_describe(annotation)}, got {value!r}.")
    if annotation is not Any and isinstance(coerced, float) and not math.isfinite(coerced):
        raise error(f"{what} must be a finite number, got {value!r}.")
    return coerced


def _path(value: Any, what: str, source: Source) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise source.error(f"{what} must be a path string, got {value!r}.")
    return source.path(value, what)


def _read_tables(
    value: Any, annotation: Any, key: str, where: str, meta: Mapping, source: Source
) -> tuple:
    """Read a list of tables (``[[key]]``) into a tuple of ``annotation`` objects."""
    error = source.error
    if not isinstance(value, list):
        raise error(f"{key} in {where} must be a list of tables ([[{key}]]), got {value!r}.")
    noun, label = meta.get("noun") or f"[[{key}]]", meta.get("label")
    items, seen = [], set()
    for i, raw in enumerate(value, start=1):
        if not isinstance(raw, Mapping):
            raise error(f"every item of {key} in {where} must be a table, got {raw!r}.")
        name = raw.get(label) if label else None
        ok = isinstance(name, (str, int)) and not isinstance(name, bool) and str(name).strip()
        item_where = f'{noun} "{name}" of {where}' if ok else f"{noun} #{i} of {where}"
        item = _read_table(annotation, raw, item_where, source)
        if label and meta.get("unique"):
            mark = str(getattr(item, label))
            if mark in seen:
                raise error(
                    f'{noun} {label} "{mark}" appears twice in {where}; {label}s must be unique.'
                )
            seen.add(mark)
        items.append(item)
    return tuple(items)


def _read_value(value: Any, annotation: Any, key: str, where: str, meta: Mapping, source):
    """Read the value of ``key`` in the table ``where`` as ``annotation`` says."""
    error, what = source.error, f"{key} in {where}"
    annotation = _optional(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_table(annotation):
        if not isinstance(value, Mapping):
            raise error(f"{key} in {where} must be a table ([{key}]), got {value!r}.")
        return _read_table(annotation, value, f"[{key}] of {where}", source)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and _is_table(args[0]):
        items = _read_tables(value, args[0], key, where, meta, source)
        return _apply_check(items, what, meta, error)
    if annotation is Path:
        return _path(value, what, source)
    if _is_mapping(annotation):
        if not isinstance(value, Mapping):
            raise error(f"{what} must be a table, got {value!r}.")
        inner = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            entry = f'{key}."{k}" in {where}'
            out[k] = _path(v, entry, source) if inner is Path else _scalar(v, inner, entry, error)
        return out
    if origin is tuple:
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if not isinstance(value, list) or (fixed and len(value) != len(args)):
            raise error(f"{what} must be {_describe(annotation)}, got {value!r}.")
        kinds = args if fixed else [args[0]] * len(value)
        for v, kind in zip(value, kinds):
            if not _type_ok(_coerce(v, kind), kind):
                raise error(f"every item of {what} must be {_describe(kind)}, got {v!r}.")
        value = _scalar(value, annotation, what, error)
    else:
        value = _scalar(value, annotation, what, error)
    _check_bounds(what, value, meta, error)
    return _apply_check(value, what, meta, error)


def _apply_check(value: Any, what: str, meta: Mapping, error: type) -> Any:
    """Apply the ``check`` of a field's metadata, its sentence raised as ``error``."""
    if meta.get("check") is None:
        return value
    try:
        return meta["check"](value, where=what)
    except KetamapError as e:
        raise error(str(e)) from None


def _read_table(cls: type[T], mapping: Any, where: str, source: Source) -> T:
    """Build the schema dataclass ``cls`` from one table of a user's file."""
    error = source.error
    if not isinstance(mapping, Mapping):
        raise error(f"{where} must be a table, got {mapping!r}.")
    fields = dataclasses.fields(cls)
    hints = typing.get_type_hints(cls)
    check_keys(mapping, [f.name for f in fields], where=where, noun="key", error=error)
    kwargs = {}
    for f in fields:
        annotation, meta = hints.get(f.name, Any), f.metadata
        if f.name in mapping:
            kwargs[f.name] = _read_value(mapping[f.name], annotation, f.name, where, meta, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f'{where} is missing the required key "{f.name}".')
        if meta.get("tables") and len(kwargs.get(f.name, ())) < meta.get("at_least", 0):
            n = meta["at_least"]
            raise error(
                f"{where} needs at least {_NUMBER_WORDS.get(n, n)} [[{f.name}]] "
                f"table{'s' if n > 1 else ''}."
            )
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    """Return a parameters dataclass as a plain, JSON-ready dict (tuples as lists)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
