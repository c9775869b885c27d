"""Declared constraints of every config class: shared field types, the decorator that
checks them, and their text for error messages and the config reference.

A config class is a frozen pydantic dataclass (:func:`config_class`): still a
dataclass (``dataclasses.fields``, ``replace`` and ``asdict`` work), whose field
types carry the rules (``batch_size: PositiveInt``), checked at construction and by
``replace``. Only rules between fields stay code, in ``__post_init__``. A violation
raises :class:`em3.errors.ImproperlyConfigured` (a ``ValueError``) that names the
class and the field, and says what was expected and what was given:

>>> @config_class
... class Example:
...     n: PositiveInt = 1
...     p: Probability = 0.5
...     mode: Literal["a", "b"] = "a"
>>> Example(n=0)
Traceback (most recent call last):
...
em3.errors.ImproperlyConfigured: Example: n must be > 0, but 0 is given
>>> Example(n=True, p=2)
Traceback (most recent call last):
...
em3.errors.ImproperlyConfigured: Example: n must be an integer > 0, but True is given; p must be in [0, 1], but 2 is given
>>> describe(Example, "p"), describe(Example, "mode")
('in [0, 1]', "one of 'a', 'b'")

Integers are strict (a bool, a float or a string is refused, as the hand-written
checks did); numbers take ints but refuse bools and strings; unknown keywords are
refused. Secrets never show: a field declared with ``repr=False`` is not echoed, and
a URL's password is masked.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal, Mapping, Union

import annotated_types as at
import pydantic
import pydantic.dataclasses
from pydantic import AllowInfNan, Field, Strict, StringConstraints, ValidationError
from pydantic.fields import FieldInfo

from em3.errors import ImproperlyConfigured

__all__ = [
    "config_class",
    "describe",
    "explain",
    "Annotated",
    "Field",
    "Literal",
    "StringConstraints",
    "Int",
    "Float",
    "PositiveInt",
    "NonNegInt",
    "PositiveFloat",
    "NonNegFloat",
    "FiniteFloat",
    "FinitePositiveFloat",
    "FiniteNonNegFloat",
    "Probability",
    "OpenProbability",
    "Fraction",
    "Port",
    "NonEmptyStr",
]

#: Strict numbers: an int field refuses bools, floats and strings; a float field takes
#: ints but refuses bools and strings. Bounds: ``Annotated[Float, Field(ge=0, lt=1)]``.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]

PositiveInt = Annotated[int, Strict(), at.Gt(0)]
NonNegInt = Annotated[int, Strict(), at.Ge(0)]
PositiveFloat = Annotated[float, Strict(), at.Gt(0)]
NonNegFloat = Annotated[float, Strict(), at.Ge(0)]
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
FinitePositiveFloat = Annotated[float, Strict(), at.Gt(0), AllowInfNan(False)]
FiniteNonNegFloat = Annotated[float, Strict(), at.Ge(0), AllowInfNan(False)]
#: in ``[0, 1]``
Probability = Annotated[float, Strict(), at.Ge(0), at.Le(1)]
#: in ``(0, 1)``
OpenProbability = Annotated[float, Strict(), at.Gt(0), at.Lt(1)]
#: in ``(0, 1]``: a share of traffic
Fraction = Annotated[float, Strict(), at.Gt(0), at.Le(1)]
Port = Annotated[int, Strict(), at.Ge(0), at.Le(65535)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]

_CONFIG = pydantic.ConfigDict(arbitrary_types_allowed=True, extra="forbid")


def config_class(cls: type | None = None, /) -> Any:
    """Make ``cls`` a frozen pydantic dataclass whose declared constraints are checked
    at construction; a violation raises :class:`ImproperlyConfigured` naming the field."""
    if cls is None:
        return config_class
    cls = pydantic.dataclasses.dataclass(frozen=True, config=_CONFIG)(cls)
    validate = cls.__init__
    n_init = sum(1 for f in dataclasses.fields(cls) if f.init)

    @functools.wraps(validate)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > n_init:  # pydantic would drop them silently
            raise ImproperlyConfigured(f"{cls.__name__}: takes at most {n_init} positional arguments, "
                                       f"but {len(args)} are given")
        try:
            validate(self, *args, **kwargs)
        except ValidationError as exc:
            raise ImproperlyConfigured(explain(cls, exc)) from None

    cls.__init__ = __init__
    return cls


# --------------------------------------------------------------------- text
_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
    "tuple": "a list", "list": "a list", "dict": "a mapping", "mapping": "a mapping",
}


def describe(cls: type, name: str) -> str:
    """The declared constraint of field ``name`` of config class ``cls`` in words
    (``"> 0"``, ``"in [0, 1]"``, ``"one of 'a', 'b'"``, ``"> 0 or None"``); ``""``
    when the field declares none."""
    decl = _declaration(cls, (name,))
    return _constraint_text(*decl) if decl else ""


def explain(cls: type, exc: ValidationError) -> str:
    """One line for ``exc``: each field that broke its declaration, what it must be and
    what was given (cross-field errors keep their own message)."""
    names = [name for name, info in cls.__pydantic_fields__.items() if info.init is not False]
    errors = exc.errors(include_url=False)
    for err in errors:  # positional arguments are reported by index
        loc = err["loc"]
        if loc and isinstance(loc[0], int) and loc[0] < len(names):
            err["loc"] = (names[loc[0]], *loc[1:])
    parts = []
    for err in errors:
        loc, kind = err["loc"], err["type"]
        if any(other["loc"][:len(loc)] == loc and len(other["loc"]) > len(loc) for other in errors):
            continue  # a container that failed because an item did: the item's error says it
        path = _path(loc)
        error = (err.get("ctx") or {}).get("error")
        if kind in ("value_error", "assertion_error") and error is not None:
            parts.append(f"{path}: {error}" if loc else str(error))
            continue
        if kind in ("missing", "missing_argument"):
            parts.append(f"{path} is required")
            continue
        if kind in ("unexpected_keyword_argument", "unexpected_positional_argument"):
            what = f"argument {path}" if kind.endswith("positional_argument") else path
            parts.append(f"{what} is not a field; the fields are {names}")
            continue
        decl = _declaration(cls, loc)
        expected = _constraint_text(*decl) if decl else ""
        if (kind.endswith(("_type", "_parsing")) or kind in ("int_from_float", "is_instance_of")) \
                and not expected.startswith(("a ", "an ")):
            word = _TYPE_WORDS.get(kind.split("_")[0]) or _instance_word(err)
            expected = f"{word} {'with ' if expected.startswith('each') else ''}{expected}".strip()
        if not expected:
            msg = err["msg"].removeprefix("Input should be ")
            expected = msg[:1].lower() + msg[1:]
        parts.append(f"{path} must be {expected}, but {_shown(cls, loc, err.get('input'))} is given")
    return f"{cls.__name__}: " + "; ".join(parts)


def _instance_word(err: Mapping[str, Any]) -> str:
    name = (err.get("ctx") or {}).get("class")
    return f"a {name}" if name else "of another type"


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _shown(cls: type, loc: tuple[Any, ...], value: Any) -> str:
    """``repr(value)``, unless it is a secret: a ``repr=False`` field shows nothing,
    a URL shows no password."""
    from em3.config import redact_url

    field = cls.__pydantic_fields__.get(loc[0]) if loc else None
    if field is not None and not field.repr:
        return "a value (not shown)"
    if isinstance(value, str) and "://" in value:
        return repr(redact_url(value))
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _declaration(cls: type, loc: tuple[Any, ...]) -> tuple[Any, list[Any]] | None:
    """(type, constraint metadata) declared at ``loc`` inside config class ``cls``."""
    ann: Any = cls
    meta: list[Any] = []
    for key in loc:
        ann = _unwrap(_strip_none(_unwrap(ann)[0]))[0]
        fields = getattr(ann, "__pydantic_fields__", None)
        origin, args = typing.get_origin(ann), typing.get_args(ann)
        if isinstance(key, str) and fields is not None:
            if key not in fields:
                return None
            ann, meta = fields[key].annotation, list(fields[key].metadata)
        elif isinstance(key, int) and origin in (tuple, list) and args:
            ann, meta = args[0], []
        elif isinstance(key, str) and origin in (dict, collections.abc.Mapping) and len(args) == 2:
            ann, meta = args[1], []
        else:
            return None
    ann, more = _unwrap(ann)
    return ann, meta + more


def _unwrap(ann: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, *m]`` -> ``(T, m)``, flattening grouped metadata and ``Field(...)``."""
    meta: list[Any] = []
    while typing.get_origin(ann) is Annotated:
        args = typing.get_args(ann)
        ann = args[0]
        meta.extend(args[1:])
    flat: list[Any] = []
    for m in meta:
        if isinstance(m, FieldInfo):
            flat.extend(m.metadata)
        elif isinstance(m, at.GroupedMetadata) and not isinstance(m, StringConstraints):
            flat.extend(m)
        else:
            flat.append(m)
    return ann, flat


def _strip_none(ann: Any) -> Any:
    """``T | None`` -> ``T``; anything else unchanged."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and math.isfinite(x) else repr(x)


def _constraint_text(ann: Any, meta: list[Any]) -> str:
    """Words for a declared type: its choices, bounds, length and pattern."""
    optional = False
    inner = _strip_none(ann)
    if inner is not ann:
        optional = True
        ann, more = _unwrap(inner)
        meta = meta + more
    words: list[str] = []
    if typing.get_origin(ann) is Literal:
        words.append("one of " + ", ".join(repr(a) for a in typing.get_args(ann)))
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in meta
              if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le))}
    low = ("(", bounds["Gt"]) if "Gt" in bounds else ("[", bounds["Ge"]) if "Ge" in bounds else None
    high = (")", bounds["Lt"]) if "Lt" in bounds else ("]", bounds["Le"]) if "Le" in bounds else None
    if low and high:
        words.append(f"in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}")
    elif low:
        words.append(f"{'>' if low[0] == '(' else '>='} {_num(low[1])}")
    elif high:
        words.append(f"{'<' if high[0] == ')' else '<='} {_num(high[1])}")
    unit = "characters" if ann is str else "items"
    for m in meta:
        min_length, max_length = getattr(m, "min_length", None), getattr(m, "max_length", None)
        if isinstance(m, AllowInfNan) and not m.allow_inf_nan:
            words.append("finite")
        if min_length == 1 and ann is str:
            words.append("a non-empty string")
        elif min_length == 1:
            words.append("non-empty")
        elif min_length:
            words.append(f"of at least {min_length} {unit}")
        if max_length:
            words.append(f"of at most {max_length} {unit if max_length > 1 else unit[:-1]}")
        if getattr(m, "pattern", None):
            noun = "" if min_length == 1 and ann is str else "a string " if ann is str else ""
            words.append(f"{noun}matching {m.pattern!r}")
    origin, args = typing.get_origin(ann), [a for a in typing.get_args(ann) if a is not Ellipsis]
    if origin in (tuple, list) and args:
        item = _constraint_text(*_unwrap(args[0]))
        words.extend([f"each {item}"] if item else [])
    elif origin in (dict, collections.abc.Mapping) and len(args) == 2:
        value = _constraint_text(*_unwrap(args[1]))
        words.extend([f"each value {value}"] if value else [])
    text = " and ".join(words).replace(" and matching", " matching")
    return f"{text} or None" if text and optional else text
