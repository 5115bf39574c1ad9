"""Configuration values checked against the types the documentation gives each key.

``tidings.config`` runs every layer (the TOML file, the environment, the overrides)
through ``check_table`` before pydantic sees it, and turns an environment variable's text
into a value with ``parse_env``, by the type of the key it sets. The checks are here
rather than left to pydantic, whose lax mode turns "8106" into 8106 and "yes" into True,
and whose messages ("Extra inputs are not permitted") are not the project's: every
problem is a ``ConfigError`` naming the key, with the type in the documentation's words.
"""

from __future__ import annotations

import json
import math
import re
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from tidings.errors import ConfigError
from tidings.settings import Settings

__all__ = ["annotation_at", "check_table", "check_value", "parse_env"]

#: Environment spellings of booleans (any case).
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _arms(annotation: Any) -> tuple[Any, ...]:
    """The members of a union annotation, or the annotation alone."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _describe(annotation: Any) -> str:
    """What a value of ``annotation`` must be, as the error message says it."""
    arms = [arm for arm in _arms(annotation) if arm is not type(None)]
    if len(arms) > 1:
        return " or ".join(_describe(arm) for arm in arms)
    annotation = arms[0]
    origin = get_origin(annotation)
    if origin is Literal:
        values = [json.dumps(value) for value in get_args(annotation)]
        return values[0] if len(values) == 1 else f"one of {', '.join(values)}"
    if origin is tuple:
        item = get_args(annotation)[0]
        if get_origin(item) is Literal:
            return f"a list of {', '.join(json.dumps(v) for v in get_args(item))}"
        return "a list of strings"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, "a table")


def _matches(annotation: Any, value: Any) -> bool:
    """Whether ``value`` has the type ``annotation`` documents (no coercion)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_matches(arm, value) for arm in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        # TOML has inf and nan; no setting means either.
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if annotation is str:
        return isinstance(value, str)
    origin = get_origin(annotation)
    if origin is tuple:
        item = get_args(annotation)[0]
        return isinstance(value, list | tuple) and all(
            _matches(item, element) if get_origin(item) is Literal else isinstance(element, str)
            for element in value
        )
    if origin is Literal:
        return any(
            type(value) is type(choice) and value == choice for choice in get_args(annotation)
        )
    return False


def check_value(annotation: Any, value: Any, path: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` naming the key when ``value`` is not of its documented type."""
    key = ".".join(path)
    if _is_section(annotation) or get_origin(annotation) is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table")
        if _is_section(annotation):
            check_table(annotation, value, path)
        else:
            item = get_args(annotation)[1]
            for name, child in value.items():
                check_value(item, child, (*path, str(name)))
    elif not _matches(annotation, value):
        raise ConfigError(key, f"must be {_describe(annotation)}")


def check_table(
    model: type[BaseModel], data: Mapping[str, Any], path: tuple[str, ...] = ()
) -> None:
    fields = model.model_fields
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            raise ConfigError(".".join((*path, str(key))), "unknown key")
        check_value(field.annotation, value, (*path, key))


def annotation_at(path: tuple[str, ...]) -> Any:
    """The annotation of the key at ``path``, or None when no such key exists."""
    node: Any = Settings
    for part in path:
        if _is_section(node):
            field = node.model_fields.get(part)
            if field is None:
                return None
            node = field.annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return None
    return node


def parse_env(annotation: Any, text: str) -> Any:
    """An environment variable's text as a value of ``annotation``: integers, numbers,
    ``true``/``false`` (or ``1``/``0``) and comma-separated lists. Text that does not
    parse is returned as it is, for the type check to name the key."""
    arms = [arm for arm in _arms(annotation) if arm is not type(None)]
    if len(arms) > 1:
        for arm in arms:
            parsed = parse_env(arm, text)
            if _matches(arm, parsed):
                return parsed
        return text
    annotation = arms[0]
    stripped = text.strip()
    if annotation is bool:
        lowered = stripped.lower()
        return True if lowered in _TRUE else False if lowered in _FALSE else text
    if annotation is int:
        return int(stripped) if _INTEGER.fullmatch(stripped) else text
    if annotation is float:
        try:
            return float(stripped)
        except ValueError:
            return text
    if get_origin(annotation) is tuple:
        return [item.strip() for item in text.split(",") if item.strip()]
    return text
