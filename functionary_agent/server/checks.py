"""The check a chat request's tools pass before the plugin writes a prompt or builds a call grammar for them.

A tool the grammar could not describe, or whose calls the parser could not read back, is refused with its place in
the request, its name and what to change; vLLM answers HTTP 400 with it (OpenAI's error body, `param` included).
Refused: a name outside TOOL_NAME_PATTERN (what OpenAI and our own client allow, and the only names the parser reads
as calls), a name the format keeps for plain text ("all"), `parameters` that are not a valid JSON Schema of an object
(an unknown `type`, a `$ref` that points nowhere, ...), and, where the server passes a compiler, a schema the
grammar engine cannot compile. Without this, xgrammar rejects the schema, vLLM falls back to a backend that cannot
read structural tags, and the user reads "Invalid grammar specification: 'triggers'" about no tool in particular.

No vLLM import: the unit tests run it as the server does. Checks are cached per schema, since clients send the same
tools with every request.
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from functionary_agent._schema import map_subschemas
from functionary_agent._text import shorten
from functionary_agent.errors import ConfigurationError
from functionary_agent.formats import Format, guard_schema
from functionary_agent.tools import TOOL_NAME_PATTERN

JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
SchemaCompiler = Callable[[str], object]  # compiles a JSON Schema's text; raises on one it cannot use
_NAME_SHOWN = 80  # characters of a refused name quoted back
_ENGINE_NOISE = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*")  # xgrammar's "[10:13:18] /project/cpp/x.cc:49: "
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]+")


class ToolRejected(ConfigurationError):
    """A request's tool the server cannot offer the model. `parameter` is where it is, as OpenAI's error `param`
    spells it (`tools[1].function.name`)."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def check_tools(tools: Sequence[Any], fmt: Format, compile_schema: SchemaCompiler | None = None) -> None:
    """Raise ToolRejected for the first function tool in `tools` (OpenAI dicts) that cannot be offered: its name,
    then its parameter schema, then (with `compile_schema`) whether the grammar engine compiles that schema."""
    for index, function in _functions(tools):
        name = function.get("name")
        where = f"tools[{index}] {shorten(repr(name), _NAME_SHOWN)}"
        problem = name_problem(name, fmt)
        if problem is not None:
            raise ToolRejected(f"invalid tool {where}: {problem}", f"tools[{index}].function.name")
        parameters = function.get("parameters")
        if parameters is None:
            continue
        problem = schema_problem(parameters)
        if problem is None and compile_schema is not None:
            problem = _compile_problem(compile_schema, _canonical(parameters))
        if problem is not None:
            raise ToolRejected(f"invalid tool {where}: {problem}", f"tools[{index}].function.parameters")


def name_problem(name: Any, fmt: Format) -> str | None:
    """Why `name` cannot be a tool's name in `fmt` (None: it can). The grammar, the parser and this check share
    TOOL_NAME_PATTERN, so a call the grammar lets the model write is always read back as a call."""
    if not isinstance(name, str) or TOOL_NAME_PATTERN.fullmatch(name) is None:
        return (
            f"the name must be 1 to 64 letters, digits, '_' or '-' ({TOOL_NAME_PATTERN.pattern}, as OpenAI requires); "
            "rename the tool"
        )
    if name == fmt.protocol.text_recipient:
        return f"format {fmt.name} sends plain text to {name!r}, so no call could reach this tool; rename it"
    return None


def schema_problem(parameters: Any) -> str | None:
    """What is wrong with a tool's `parameters` as the JSON Schema of its arguments object (None: nothing)."""
    if not isinstance(parameters, Mapping):
        return f"parameters must be a JSON Schema object, not {type(parameters).__name__}"
    try:
        return _problem_of(_canonical(parameters))
    except (TypeError, ValueError) as error:  # NaN, or keys that are not strings: not a JSON document
        return f"parameters are not JSON: {error}"
    except RecursionError:
        return "parameters are nested too deeply; flatten the schema"


def _functions(tools: Sequence[Any]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(index, function dict) of each function tool, legacy bare function entries included; other tool types are
    not ours to check."""
    for index, tool in enumerate(tools):
        if isinstance(tool, Mapping) and tool.get("type", "function") == "function":
            function = tool.get("function", tool if "type" not in tool else None)
            yield index, function if isinstance(function, Mapping) else {}


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, allow_nan=False)


@functools.lru_cache(maxsize=512)
def _problem_of(text: str) -> str | None:
    schema = json.loads(text)
    return _meta_problem(schema) or _object_problem(schema) or _ref_problem(schema)


def _meta_problem(schema: dict[str, Any]) -> str | None:
    """The most telling violation of the JSON Schema meta-schema (2020-12 unless `$schema` names another draft)."""
    from jsonschema import exceptions, validators  # loaded with the first schema, not with the plugin

    default = validators.Draft202012Validator
    meta = validators.validator_for(schema, default=default) if isinstance(schema.get("$schema"), str) else default
    error = exceptions.best_match(meta(meta.META_SCHEMA).iter_errors(schema))
    if error is None:
        return None
    path = _path(["parameters", *error.absolute_path])
    if _is_unknown_type(error):
        shown = repr(error.instance) if isinstance(error.instance, str) else json.dumps(error.instance)
        return f"{path}: unknown type {shown}; use one of {', '.join(JSON_TYPES)}"
    return f"{path}: {shorten(error.message, 200)}"


def _is_unknown_type(error: Any) -> bool:
    """A `type` value outside JSON's seven: the meta-schema says so with an enum of them (inside an anyOf)."""
    return any(
        cause.validator == "enum" and set(cause.validator_value or ()) == set(JSON_TYPES)
        for cause in (error, *(error.context or ()))
    )


def _object_problem(schema: dict[str, Any]) -> str | None:
    declared = schema.get("type", "object")
    if declared in ("object", ["object"]):
        return None
    shown = repr(declared) if isinstance(declared, str) else json.dumps(declared)
    return (
        f"parameters must describe a JSON object (type 'object'), not type {shown}: "
        "a call's arguments are always an object"
    )


def _ref_problem(schema: dict[str, Any]) -> str | None:
    """A `$ref` that does not lead to a schema inside this one (a missing definition, or a document elsewhere)."""
    for keys, ref in _refs(schema, ("parameters",)):
        if not (ref == "#" or ref.startswith("#/")):
            return (
                f"{_path([*keys, '$ref'])}: {ref!r} is outside this schema; only references inside it, such as "
                "'#/$defs/Name', are supported"
            )
        if not _resolves(schema, ref):
            where = _path([*keys, "$ref"])
            return f"{where}: {ref!r} points to nothing in this schema; define it under $defs or inline it"
    return None


def _refs(node: Any, keys: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str]]:
    """Every `$ref` in schema positions of `node` (not inside `const`, `enum`, `default`...), with where it is."""
    found: list[tuple[tuple[Any, ...], str]] = []
    if isinstance(node, list):
        for index, item in enumerate(node):
            found.extend(_refs(item, (*keys, index)))
        return found
    if not isinstance(node, Mapping):
        return found
    if isinstance(node.get("$ref"), str):
        found.append((keys, node["$ref"]))
    map_subschemas(node, lambda sub, more: found.extend(_refs(sub, (*keys, *more))))
    return found


def _resolves(schema: Any, ref: str) -> bool:
    """Whether the JSON pointer in `ref` ("#/$defs/Name") leads to a schema (an object or a boolean)."""
    node = schema
    for part in ref[2:].split("/") if ref != "#" else ():
        key = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return isinstance(node, (Mapping, bool))


@functools.lru_cache(maxsize=512)
def _compile_problem(compile_schema: SchemaCompiler, text: str) -> str | None:
    try:
        compile_schema(json.dumps(guard_schema(json.loads(text))))
    except Exception as error:  # the engine's own words, whatever it raises
        lines = _ENGINE_NOISE.sub("", str(error)).strip().splitlines()
        detail = shorten(lines[0], 200) if lines else type(error).__name__
        return f"parameters: the grammar engine cannot use this schema: {detail}"
    return None


def _path(keys: Sequence[Any]) -> str:
    """`parameters.properties.city.type`; list positions as [1], unusual keys quoted."""
    text = ""
    for key in keys:
        if isinstance(key, int):
            text += f"[{key}]"
        elif _PLAIN_KEY.fullmatch(key):
            text += f".{key}" if text else key
        else:
            text += f"[{json.dumps(key)}]"
    return text
