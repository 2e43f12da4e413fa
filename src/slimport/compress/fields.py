"""Recipe values checked against the annotations of the dataclass fields they fill.

A YAML recipe can hold any type anywhere (`bits: "four"`, `protect: 5`); checked here, each is
one error naming the option, instead of a TypeError deep inside a quantizer. Pure data.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from slimport.errors import SlimportError


def check_field_types(cls: type, values: dict, what: str = "quantization option") -> None:
    """Every `values[name]` that is a field of the dataclass `cls` must match its annotation."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in values and not matches(values[f.name], hints[f.name]):
            shown = repr(values[f.name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise SlimportError(
                f"{what} {f.name}: {shown} is not {describe(hints[f.name])}",
                hint=f"give {f.name} as {describe(hints[f.name])}",
            )


def matches(value: object, annotation) -> bool:
    """isinstance for the annotations recipes use: int, float, bool, str, list[X], dict, X | None.
    A bool is no int (True would pass as 1 bit), an int is a float, a tuple is a list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (object,)
        return isinstance(value, list | tuple) and all(matches(v, item) for v in value)
    if annotation is tuple or origin is tuple:  # a YAML list fills a tuple field
        return isinstance(value, list | tuple)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is object or annotation is typing.Any:
        return True
    return isinstance(value, origin or annotation)


def describe(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is tuple or origin is tuple:
        return "a list"
    if origin is list:
        args = typing.get_args(annotation)
        return "a list" + (f" of {describe(args[0]).split(' ', 1)[-1]}s" if args else "")
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    return names.get(annotation, "a mapping" if (origin or annotation) is dict else str(annotation))
