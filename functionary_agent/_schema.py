"""JSON-schema clean-up shared by tools and formats.

Pydantic's schemas carry `title` on every node and put every model in `$defs`. Models read prompts, not
validators: titles are noise tokens and `$ref` indirection makes small models lose track of what a field holds.
So titles go and references are inlined, except where a model really recurs (inlining would never end).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

# Keys whose value is a schema, a list of schemas, or a map from names to schemas (JSON Schema 2020-12).
_SCHEMA_KEYS = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

Walk = Callable[[Any, tuple[str, ...]], Any]
"""What `map_subschemas` does to a subschema (or a list of them), told the keys that lead to it from its parent."""


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` without `title` keys and with non-recursive `$ref`s inlined."""
    result: dict[str, Any] = _without_titles(inline_refs(schema))
    return result


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` with non-recursive `$ref`s inlined; recursive models stay in `$defs`."""
    schema = copy.deepcopy(schema)
    defs: dict[str, Any] = {**schema.pop("definitions", {}), **schema.pop("$defs", {})}
    kept: dict[str, Any] = {}
    result = _inline(schema, defs, (), kept)
    if kept:
        result["$defs"] = kept
    return result


def _ref_name(ref: str) -> str | None:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return None


def _inline(node: Any, defs: dict[str, Any], stack: tuple[str, ...], kept: dict[str, Any]) -> Any:
    """Replace `$ref`s by their definitions; a reference back into `stack` is a real recursion and stays."""
    if isinstance(node, list):
        return [_inline(item, defs, stack, kept) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    name = _ref_name(ref) if isinstance(ref, str) else None
    if name is not None and name in defs:
        if name in stack:
            if name not in kept:
                kept[name] = {}  # reserve first: the definition may refer to itself again
                kept[name] = _inline(defs[name], defs, (name,), kept)
            return {**node, "$ref": f"#/$defs/{name}"}
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        target = _inline(defs[name], defs, (*stack, name), kept)
        return {**target, **_inline(siblings, defs, stack, kept)}
    return map_subschemas(node, lambda sub, _keys: _inline(sub, defs, stack, kept))


def map_subschemas(
    node: Mapping[str, Any], walk: Walk, other: Callable[[str, Any], Any] | None = None
) -> dict[str, Any]:
    """A copy of the schema `node` in which each value that holds schemas becomes `walk(value, keys)`: a subschema
    (`items`, ...) or a list of them (`anyOf`, ...) with keys `(key,)`, each entry of a map of them (`properties`,
    `$defs`, ...) with keys `(key, name)`. Every other keyword's value becomes `other(key, value)` (by default
    stays as it is). The one table of JSON Schema's keywords for every walk over schemas."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            out[key] = {name: walk(sub, (key, name)) for name, sub in value.items()}
        elif key in _SCHEMA_KEYS or key in _SCHEMA_LIST_KEYS:
            out[key] = walk(value, (key,))
        else:
            out[key] = value if other is None else other(key, value)
    return out


def _without_titles(node: Any) -> Any:
    """A copy of `node` without `title` on any schema node; properties that happen to be named "title" stay."""
    if isinstance(node, list):
        return [_without_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    return map_subschemas({key: value for key, value in node.items() if key != "title"}, _walk_without_titles)


def _walk_without_titles(node: Any, keys: tuple[str, ...]) -> Any:
    return _without_titles(node)
