"""An OpenAPI document's schemas as a model reads them: local `$ref`s inlined, bounded by a node budget.

A schema that refers back to itself goes to `$defs` once (as for recursive Python models); a reference to another
file or URL is not fetched: it becomes a schema that accepts any value and says so in its description. OpenAPI
3.0's `nullable` becomes a null type and `readOnly` properties go (a client must not send them). A malformed
document is a `ConfigurationError` that names the JSON pointer of the bad part (`malformed`).
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn
from urllib.parse import unquote

from functionary_agent._schema import map_subschemas
from functionary_agent.errors import ConfigurationError
from functionary_agent.tools import unique_tool_name

logger = logging.getLogger(__name__)

Where = tuple[str | int, ...]  # a JSON pointer into the document, as its parts

# Keywords dropped from schemas, none of them a schema keyword of `map_subschemas`: titles are noise tokens to a model.
_NOISE_KEYS = ("title", "xml", "externalDocs", "discriminator")
_MAX_DOCUMENT_NODES = 500_000  # schema nodes inlined for the whole document
_MAX_OPERATION_NODES = 50_000  # ... and for one tool (far more than a model can read)
_MAX_DEPTH = 100  # levels of nested schemas and $refs

# -- malformed documents ---------------------------------------------------------------------------------
def malformed(where: Where, problem: str) -> NoReturn:
    raise ConfigurationError(f"malformed OpenAPI document at {_pointer(where)}: {problem}")


def _pointer(where: Where) -> str:
    """The JSON pointer (as a URI fragment) of `where`; very long keys are cut short."""
    parts = (str(part)[:80].replace("~", "~0").replace("/", "~1") for part in where)
    return "#" + "".join("/" + part for part in parts)


def kind_of(value: Any) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def expect_object(node: Any, where: Where) -> dict[str, Any]:
    if not isinstance(node, dict):
        malformed(where, f"expected an object, found {kind_of(node)}")
    return node


def expect_list(node: Any, where: Where) -> list[Any]:
    if not isinstance(node, list):
        malformed(where, f"expected a list, found {kind_of(node)}")
    return node


class Budget:
    """Bounds the work of inlining `$ref`s: nodes for the whole document (and, by `Refs`, for one tool) and
    nesting depth, so that nested references that multiply (billion laughs) or YAML aliases that contain
    themselves end as a `ConfigurationError`, not as hours of work or a RecursionError."""

    def __init__(self, nodes: int = _MAX_DOCUMENT_NODES) -> None:
        self.limit = self.left = nodes

    def spend(self, where: Where, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            malformed(where, f"its schemas expand to more than {self.limit:,} nodes once $refs are inlined")
        if depth > _MAX_DEPTH:
            malformed(where, f"schemas nest deeper than {_MAX_DEPTH} levels once $refs are inlined")


# -- $ref ------------------------------------------------------------------------------------------------
class Refs:
    """Local `$ref`s of one document, inlined; a reference back into itself goes to `$defs` once.

    One per tool: its own `$defs`, and a node budget of its own inside the document's."""

    def __init__(self, document: dict[str, Any], budget: Budget | None = None) -> None:
        self.document = document
        self.defs: dict[str, Any] = {}
        self._names: dict[str, str] = {}  # ref -> name in $defs
        self._pending: list[str] = []
        self._document_budget = budget or Budget()
        self._budget = Budget(_MAX_OPERATION_NODES)
        self._acyclic: set[str] = set()  # refs whose chain of `$ref`s ends somewhere

    def deref(self, node: Any, where: Where) -> tuple[dict[str, Any], Where]:
        """A parameter, request body or path item that may be a `$ref` to one, and where it really is."""
        node, where = self._follow(node, where)
        return expect_object(node, where), where

    def pointer(self, ref: str, where: Where) -> Any:
        """What the local `ref` (met at `where`) points to."""
        node: Any = self.document
        for part in _ref_parts(ref, where):
            if isinstance(node, list) and isinstance(part, str) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                malformed(where, f"$ref {ref!r} points to nothing in the document")
        return node

    def schema(self, node: Any, where: Where) -> dict[str, Any]:
        result = self._schema(node, (), where, 0)
        return result if isinstance(result, dict) else {}

    def finish(self) -> dict[str, Any]:
        """Every recursive schema met so far, itself resolved (its own self-references stay `$ref`s)."""
        while self._pending:
            ref = self._pending.pop()
            where = _ref_parts(ref, ())
            self.defs[self._names[ref]] = self._schema(self.pointer(ref, where), (ref,), where, 0)
        return self.defs

    def _follow(self, node: Any, where: Where, *, schema: bool = False) -> tuple[Any, Where]:
        """Through a chain of `$ref`s to what it ends at; a chain that comes back to itself is malformed. A
        reference outside the document ends a schema's chain (it becomes a placeholder) and fails any other."""
        chain: list[str] = []
        start = where
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if schema and not _is_local(ref):
                break
            if not ref.startswith("#"):
                malformed(where, f"$ref {ref!r} is outside the document, which is not fetched")
            if ref in chain:
                malformed(start, f"$ref cycle: {' -> '.join([*chain, ref])}")
            chain.append(ref)
            node, where = self.pointer(ref, where), _ref_parts(ref, where)
        return node, where

    def _schema(self, node: Any, stack: tuple[str, ...], where: Where, depth: int) -> Any:
        self._spend(where, depth)
        if isinstance(node, list):
            return [self._schema(item, stack, (*where, index), depth + 1) for index, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            siblings = {k: self._schema(v, stack, (*where, k), depth + 1) for k, v in node.items() if k != "$ref"}
            return {**self._resolve(ref, stack, where, depth), **siblings}
        return _request_view(
            map_subschemas(
                {key: value for key, value in node.items() if key not in _NOISE_KEYS},
                lambda sub, keys: self._schema(sub, stack, (*where, *keys), depth + 1),
                lambda key, value: self._value(value, (*where, key), depth + 1),
            )
        )

    def _value(self, value: Any, where: Where, depth: int) -> Any:
        """A keyword's value (enum, default, example, ...), copied within the budget: YAML aliases may share one
        structure many times over, or make it contain itself."""
        self._spend(where, depth)
        if isinstance(value, list):
            return [self._value(item, (*where, index), depth + 1) for index, item in enumerate(value)]
        if isinstance(value, dict):
            return {key: self._value(item, (*where, key), depth + 1) for key, item in value.items()}
        return value

    def _spend(self, where: Where, depth: int) -> None:
        self._budget.spend(where, depth)
        self._document_budget.spend(where, depth)

    def _resolve(self, ref: str, stack: tuple[str, ...], where: Where, depth: int) -> dict[str, Any]:
        if not _is_local(ref):
            logger.warning("OpenAPI $ref %r is outside the document and is not fetched; it accepts any value", ref)
            return {"description": f"(a value described by {ref}, which was not fetched)"}
        if ref not in self._acyclic:
            self._follow({"$ref": ref}, where, schema=True)
            self._acyclic.add(ref)
        if ref in stack:
            if ref not in self._names:
                self._names[ref] = unique_tool_name(ref.rsplit("/", 1)[-1], set(self._names.values()), "schema")
                self.defs[self._names[ref]] = {}
                self._pending.append(ref)
            return {"$ref": f"#/$defs/{self._names[ref]}"}
        target = _ref_parts(ref, where)
        resolved = self._schema(self.pointer(ref, where), (*stack, ref), target, depth + 1)
        return resolved if isinstance(resolved, dict) else {}


def _is_local(ref: str) -> bool:
    return ref == "#" or ref.startswith("#/")


def _ref_parts(ref: str, where: Where) -> Where:
    """The keys of a local `$ref` ("#/components/schemas/Pet" -> components, schemas, Pet)."""
    if ref == "#":
        return ()
    if not ref.startswith("#/"):
        malformed(where, f"$ref {ref!r} is not a JSON pointer into the document")
    return tuple(unquote(part).replace("~1", "/").replace("~0", "~") for part in ref[2:].split("/"))


def _request_view(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 quirks as JSON Schema, seen from a request: `nullable` becomes a null type, and
    `readOnly` properties (which a client must not send) go."""
    if schema.pop("nullable", False) is True and isinstance(schema.get("type"), str):
        schema["type"] = [schema["type"], "null"]
    properties = schema.get("properties")
    if isinstance(properties, dict):
        hidden = {k for k, v in properties.items() if isinstance(v, dict) and v.get("readOnly") is True}
        if hidden:
            schema["properties"] = {k: v for k, v in properties.items() if k not in hidden}
            if isinstance(schema.get("required"), list):
                schema["required"] = [k for k in schema["required"] if k not in hidden]
    return schema

