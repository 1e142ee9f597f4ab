"""JSON schema -> the TypeScript-like `namespace functions { ... }` text that Functionary v2, v2.5 and v3 read.

The models were trained on one exact rendering, so the shape of the output (indentation, comment lines, where the
closing braces of arrays of objects go) follows upstream's byte for byte for the schemas upstream handles. Where
upstream produces broken text (an empty type for `anyOf`, a missing enum separator, `Format=` with nothing after
it) we render what the schema means instead; the README's "Compatibility notes" lists each difference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_INDENT = "    "
_HEADER = "// Supported function definitions that should be called when necessary.\nnamespace functions {\n\n"
_FOOTER = "} // namespace functions"
_LIMITS = (
    ("maximum", "Maximum"),
    ("minimum", "Minimum"),
    ("maxLength", "Maximum length"),
    ("minLength", "Minimum length"),
)


@dataclass(frozen=True)
class _Expr:
    """A rendered type: the first line continues `name: `, later lines are complete; `union` asks for parentheses
    when the type becomes an array item."""

    lines: tuple[str, ...]
    union: bool = False


def render_namespace(functions: Sequence[Mapping[str, Any]]) -> str:
    """The whole namespace block for OpenAI function dicts (`name`, `description`, `parameters`)."""
    parts = [_HEADER]
    for function in functions:
        name = function.get("name")
        if not name:
            continue
        parts.append(_comment(str(function.get("description") or "")) + "\n")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(parameters, Mapping) and isinstance(properties, Mapping) and properties:
            required = _required(parameters)
            body = "\n".join(_property_lines(properties, required, 0))
            parts.append(f"type {name} = (_: {{\n{body}\n}}) => any;\n\n")
        else:
            parts.append(f"type {name} = () => any;\n\n")
    parts.append(_FOOTER)
    return "".join(parts)


def _comment(text: str) -> str:
    """A `// ` comment; a multi-line description stays a comment on every line (upstream breaks out of it)."""
    return "// " + text.replace("\n", "\n// ")


def _required(schema: Mapping[str, Any]) -> frozenset[str]:
    required = schema.get("required")
    return frozenset(r for r in required if isinstance(r, str)) if isinstance(required, list) else frozenset()


def _property_lines(properties: Mapping[str, Any], required: frozenset[str], depth: int) -> list[str]:
    offset = _INDENT * depth
    lines: list[str] = []
    for name, schema in properties.items():
        if not isinstance(schema, Mapping):
            continue  # e.g. a stray `"required": [...]` inside properties
        info = _info_comment(schema)
        if info is not None:
            lines.append(offset + info)
        lines.extend(offset + "// " + text for text in _example_lines(name, schema))
        declaration = name if name in required else name + "?"
        expr = _expr(schema, depth)
        lines.append(f"{offset}{declaration}: {expr.lines[0]}")
        lines.extend(expr.lines[1:])
        lines[-1] += ","
    return lines


def _example_lines(name: str, schema: Mapping[str, Any]) -> list[str]:
    examples = schema.get("examples")
    if not isinstance(examples, list) or not examples:
        return []
    return [f"Example {name}:"] + [_example_text(example) for example in examples]


def _example_text(example: Any) -> str:
    if isinstance(example, str):
        return example.replace("\n", " ")
    return json.dumps(example, ensure_ascii=False)


def _info_comment(schema: Mapping[str, Any]) -> str | None:
    """Description, default, format and limits on one `//` line, in upstream's order."""
    parts: list[str] = []
    description = schema.get("description")
    if isinstance(description, str):
        parts.append(description if description.endswith(".") else description + ".")
    if "default" in schema:
        parts.append(f"Default={_default_text(schema['default'])}.")
    formats = _formats(schema)
    if formats:
        parts.append("Format=" + formats)
    parts.extend(f"{label}={schema[key]}" for key, label in _LIMITS if key in schema)
    if not parts:
        return None
    return "// " + " ".join(parts).replace("\n", " ")


def _default_text(value: Any) -> str:
    # Booleans and null the way the models saw them in training (Python spelling: `Default=True.`).
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _formats(schema: Mapping[str, Any]) -> str:
    own = schema.get("format")
    if isinstance(own, str):
        return own
    found = [sub["format"] for sub in _alternatives(schema) if isinstance(sub.get("format"), str)]
    return " or ".join(dict.fromkeys(found))


def _alternatives(schema: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            return [option for option in options if isinstance(option, Mapping)]
    return []


def _expr(schema: Mapping[str, Any], depth: int) -> _Expr:
    schema = _merge_all_of(schema)
    expr = _base_expr(schema, depth)
    if schema.get("nullable") is True and "null" not in expr.lines[-1]:
        return _Expr((*expr.lines[:-1], expr.lines[-1] + " | null"), union=True)
    return expr


def _base_expr(schema: Mapping[str, Any], depth: int) -> _Expr:
    if "enum" in schema and isinstance(schema["enum"], list):
        values = [_literal(value) for value in schema["enum"]]
        return _Expr((" | ".join(dict.fromkeys(values)) or "never",), union=len(values) > 1)
    if "const" in schema:
        return _Expr((_literal(schema["const"]),))
    kind = schema.get("type")
    if isinstance(kind, list):
        return _union([_expr({**schema, "type": one}, depth) for one in kind if isinstance(one, str)])
    if kind is None:
        if _alternatives(schema):
            return _union([_expr(option, depth) for option in _alternatives(schema)])
        kind = "object" if "properties" in schema else "array" if "items" in schema else "any"
    if kind == "object":
        return _object_expr(schema, depth)
    if kind == "array":
        return _array_expr(schema, depth)
    return _Expr(("number" if kind in ("integer", "float") else str(kind),))


def _object_expr(schema: Mapping[str, Any], depth: int) -> _Expr:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping) or not properties:
        return _Expr(("object",))
    children = _property_lines(properties, _required(schema), depth + 1)
    return _Expr(("{", *children, _INDENT * depth + "}"))


def _array_expr(schema: Mapping[str, Any], depth: int) -> _Expr:
    items = schema.get("items")
    if not isinstance(items, Mapping) or not items:
        return _Expr(("any[]",))
    # Upstream indents each further level of array nesting by one step; the models saw exactly that.
    nested = _merge_all_of(items).get("type") == "array"
    inner = _expr(items, depth + 1 if nested else depth)
    lines = list(inner.lines)
    if inner.union:
        lines[0] = "(" + lines[0]
        lines[-1] += ")"
    lines[-1] += "[]"
    return _Expr(tuple(lines))


def _union(options: list[_Expr]) -> _Expr:
    unique = list(dict.fromkeys(options))
    if not unique:
        return _Expr(("any",))
    lines = list(unique[0].lines)
    for option in unique[1:]:
        lines[-1] += " | " + option.lines[0]
        lines.extend(option.lines[1:])
    return _Expr(tuple(lines), union=len(unique) > 1)


def _merge_all_of(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    """Fold `allOf` parts into one schema (properties and required lists combined), which is what they mean for
    the plain objects tools use."""
    parts = schema.get("allOf")
    if not isinstance(parts, list):
        return schema
    merged: dict[str, Any] = {key: value for key, value in schema.items() if key != "allOf"}
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        part = _merge_all_of(part)
        for key, value in part.items():
            if key == "properties" and isinstance(value, Mapping):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _literal(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
