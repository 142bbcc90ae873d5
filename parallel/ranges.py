"""Declared ranges of config fields, and the one check that reads them.

A config dataclass declares each number's range beside the field (its docstring stays under
it), as plain field metadata with the keys ge, gt, le, lt (>=, >, <=, <):

    lr: float = field(default=3e-4, metadata={"gt": 0})

Plain metadata rather than a class from here, because a model family's config (which must not
import this library) declares its ranges the same way. This module is a leaf (standard library
only) so that the parallel library checks its own section with it while the application checks
every other section with it, without the library importing the application.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import typing
from typing import Any

BOUNDS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
# torch sizes, indices, steps and seeds are int64: a larger integer fails deep inside training.
INT64 = (-(2**63), 2**63)


def range_text(metadata: typing.Mapping[str, Any], words: bool = False) -> str:
    """A field's declared range: '>= 1', '> 0' ('positive' in words), 'in [0, 1)'; '' for none."""
    low = next(((key, metadata[key]) for key in ("ge", "gt") if key in metadata), None)
    high = next(((key, metadata[key]) for key in ("le", "lt") if key in metadata), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, {high[1]:g}{']' if high[0] == 'le' else ')'}"
    if words and low == ("gt", 0):
        return "positive"
    bound = low or high
    return f"{SYMBOLS[bound[0]]} {bound[1]:g}" if bound else ""


def field_problems(section: Any, prefix: str) -> list[str]:
    """Every number of dataclass `section` (not of the sections it holds) outside its declared range,
    every float that is not finite and every integer beyond 64 bits; list and tuple fields entry by
    entry. Each message names the field (`prefix` + name), the value, the range and a value to set."""
    hints = typing.get_type_hints(type(section))
    found = []
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            continue
        default = _default(f)
        if isinstance(value, (list, tuple)):
            same_shape = isinstance(default, (list, tuple)) and len(default) == len(value)
            for i, item in enumerate(value):
                found += _problem(f"{name}[{i}]", item, f.metadata, default[i] if same_shape else None, False)
        else:
            nullable = type(None) in typing.get_args(hints[f.name])  # int | None
            found += _problem(name, value, f.metadata, default, nullable)
    return found


def _default(f: dataclasses.Field) -> Any:
    """The field's default value (None where it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _problem(name: str, value: Any, metadata: typing.Mapping[str, Any], default: Any, nullable: bool) -> list[str]:
    """The message for one number out of range (empty when it is fine or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    allowed = range_text(metadata)
    fix = f"set it to {'an integer' if isinstance(value, int) else 'a number'}"
    fix += f" {allowed}" if allowed else ""
    fix += " or null" if nullable else ""
    if default is not None or nullable:
        fix += f", e.g. the default {'null' if default is None else repr(default)}"
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{name} must be a finite number, got {value!r}; {fix}"]
    if isinstance(value, int) and not INT64[0] <= value < INT64[1]:
        return [f"{name} must fit in 64 bits, got {value}; {fix}"]
    if not all(BOUNDS[key](value, bound) for key, bound in metadata.items() if key in BOUNDS):
        required = range_text(metadata, words=True) + (" or null" if nullable else "")
        return [f"{name} must be {required}, got {value!r}; {fix}"]
    return []
