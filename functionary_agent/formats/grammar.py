"""What a model may emit for one request, as plain data that each engine compiles its own way.

The description constrains only what must be exact, the recipients and the argument JSON, and never free text:
an engine decodes free text unconstrained (stopping at `triggers` and `stop`), then decodes a call under a grammar.
That keeps grammars small and cheap, even for long answers.

A decode loop an engine can follow:
  1. at the start, the model continues the prompt, which already ends with `prompt_suffix`; the allowed openers
     are `first_openers()` (a free-text opener maps to None, a call opener to its CallSpec);
  2. in free text, decode without a grammar, stopping at `triggers` (a new opener starts) and `stop`; after a
     trigger, `continuations(trigger)` are the choices;
  3. in a call, decode `arguments` under the JSON grammar (`arguments_gbnf`), or without one for raw code
     (`spec.parameters is None`), then write `spec.end`;
  4. afterwards the model either stops or writes one of `openers()`, up to `max_calls` calls.
`to_gbnf` compiles steps 1–4 for outputs that are calls only (tool_choice "required" or a named function).
The vLLM server compiles the same description into an xgrammar structural tag (`functionary_agent.server.grammar`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from functionary_agent.errors import ConfigurationError

_GBNF_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z0-9_-]+|.', re.DOTALL)
_OPEN_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class CallSpec:
    """One function the model may call: its argument schema and the exact text around the arguments."""

    name: str
    parameters: Mapping[str, Any] | None  # JSON schema of the arguments object; None: raw code, not JSON
    begin: str  # text that opens the call, e.g. ">>>get_weather\n" or "<function=get_weather>"
    end: str  # text that closes it; "" where the next opener or the stop token does


@dataclass(frozen=True)
class CallGrammar:
    """Everything the model may emit after the prompt, for one tool list and tool_choice."""

    format: str
    calls: tuple[CallSpec, ...]
    text_allowed: bool  # free text may come before, between or instead of calls
    text_begin: str  # what opens a free-text segment (">>>all\n" in v3; "" where text needs no opener)
    min_calls: int
    max_calls: int | None  # None: no limit from the protocol
    prompt_suffix: str  # the end of the prompt that already belongs to the first opener
    triggers: tuple[str, ...]  # every opener after the first starts with one of these
    stop: tuple[str, ...]

    def openers(self) -> dict[str, CallSpec | None]:
        """The openers allowed after a call or a text segment; None stands for free text."""
        result: dict[str, CallSpec | None] = {spec.begin: spec for spec in self.calls}
        if self.text_allowed:
            result[self.text_begin] = None
        return result

    def continuations(self, written: str) -> dict[str, CallSpec | None]:
        """The openers that start with `written` (text already in the prompt or the output, such as a trigger the
        free-text phase stopped at), with that part removed: what the model may write next."""
        cut = len(written)
        return {k[cut:]: v for k, v in self.openers().items() if k.startswith(written)}

    def first_openers(self) -> dict[str, CallSpec | None]:
        """The openers at the very start, with the part the prompt already holds removed. An empty opener for text
        (None) means free text may begin at once."""
        return self.continuations(self.prompt_suffix)

    def call(self, name: str) -> CallSpec:
        for spec in self.calls:
            if spec.name == name:
                return spec
        raise KeyError(name)


def guard_schema(
    schema: Mapping[str, Any] | None,
    *,
    max_items: int | None = None,
    max_length: int | None = None,
    closed_objects: bool = False,
) -> dict[str, Any]:
    """A copy of `schema` with bounds a small model cannot loop past: `maxItems` on arrays and `maxLength` on free
    strings where the schema sets none, and (with `closed_objects`) no properties beyond the declared ones."""
    result = copy.deepcopy(dict(schema)) if schema else dict(_OPEN_OBJECT)
    if "type" not in result and "properties" in result:
        result["type"] = "object"

    def visit(node: dict[str, Any]) -> None:
        declared = node.get("type")
        kinds: list[Any] = declared if isinstance(declared, list) else [declared]
        if max_items is not None and "array" in kinds and "maxItems" not in node:
            node["maxItems"] = max(max_items, int(node.get("minItems", 0)))
        free_string = not any(key in node for key in ("enum", "const", "pattern", "format", "maxLength"))
        if max_length is not None and "string" in kinds and free_string:
            node["maxLength"] = max(max_length, int(node.get("minLength", 0)))
        if closed_objects and isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False

    _walk(result, visit)
    return result


def _walk(node: Any, visit: Callable[[dict[str, Any]], None]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, visit)
        return
    if not isinstance(node, dict):
        return
    visit(node)
    for key, value in node.items():
        if key in ("properties", "$defs", "definitions", "patternProperties") and isinstance(value, dict):
            for sub in value.values():
                _walk(sub, visit)
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems", "not"):
            _walk(value, visit)


def arguments_gbnf(
    spec: CallSpec, *, max_items: int | None = None, max_length: int | None = None, closed_objects: bool = False
) -> str:
    """GBNF (llama.cpp) for one call's argument JSON, through llama.cpp's own JSON-schema converter."""
    if spec.parameters is None:
        raise ConfigurationError(f"{spec.name!r} takes raw code, which no grammar constrains; decode it freely")
    schema = guard_schema(spec.parameters, max_items=max_items, max_length=max_length, closed_objects=closed_objects)
    return _json_schema_to_gbnf(schema)


def _json_schema_to_gbnf(schema: Mapping[str, Any]) -> str:
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigurationError("GBNF grammars need llama-cpp-python: pip install llama-cpp-python") from error
    return str(json_schema_to_gbnf(json.dumps(schema)))


def choice_gbnf(options: Iterable[str]) -> str:
    """GBNF that accepts exactly one of `options`, e.g. the recipients at an opener."""
    alternatives = [gbnf_literal(option) for option in dict.fromkeys(options) if option]
    if not alternatives:
        raise ConfigurationError("choice_gbnf needs at least one non-empty option")
    return "root ::= " + " | ".join(alternatives)


def to_gbnf(
    grammar: CallGrammar,
    *,
    max_calls: int | None = None,
    max_items: int | None = None,
    max_length: int | None = None,
    closed_objects: bool = False,
    include_code: bool = True,
) -> str:
    """One GBNF for an output made of calls only (free text is never part of a grammar): the first call continues
    the prompt, later ones start with their full opener. Raw-code calls (python) take any text; `include_code=False`
    leaves them out, for engines that would rather not let a small model ramble in "code"."""
    specs = [spec for spec in grammar.calls if include_code or spec.parameters is not None]
    if not specs:
        raise ConfigurationError("this request allows no calls (tool_choice 'none'); decode free text instead")
    limit = _call_limit(grammar, max_calls)
    rules: list[str] = []
    first: list[str] = []
    later: list[str] = []
    for number, spec in enumerate(specs):
        body = _body_rule(spec, f"c{number}", rules, max_items, max_length, closed_objects)
        if spec.begin.startswith(grammar.prompt_suffix):
            first.append(_sequence(spec.begin[len(grammar.prompt_suffix) :], body, spec.end))
        later.append(_sequence(spec.begin, body, spec.end))
    if not first:
        raise ConfigurationError("no call can continue this prompt")
    head = ["first-call ::= " + " | ".join(first), "call ::= " + " | ".join(later)]
    rest = _repeat("call", None if limit is None else limit - 1)
    return "\n".join([f"root ::= first-call {rest}".rstrip(), *head, *rules])


def _call_limit(grammar: CallGrammar, max_calls: int | None) -> int | None:
    limits = [limit for limit in (grammar.max_calls, max_calls) if limit is not None]
    return min(limits) if limits else None


def _repeat(rule: str, times: int | None) -> str:
    if times is None:
        return f"{rule}*"
    text = ""
    for _ in range(max(times, 0)):
        text = f"({rule} {text})?" if text else f"{rule}?"
    return text


def _sequence(begin: str, body: str, end: str) -> str:
    return "(" + " ".join(part for part in (gbnf_literal(begin), body, gbnf_literal(end)) if part) + ")"


def _body_rule(
    spec: CallSpec,
    prefix: str,
    rules: list[str],
    max_items: int | None,
    max_length: int | None,
    closed_objects: bool,
) -> str:
    if spec.parameters is None:
        rules.append(f"{prefix}-root ::= [^\\x00]*")
        return f"{prefix}-root"
    text = arguments_gbnf(spec, max_items=max_items, max_length=max_length, closed_objects=closed_objects)
    rules.extend(prefix_rules(text, prefix))
    return f"{prefix}-root"


def prefix_rules(grammar_text: str, prefix: str) -> list[str]:
    """The rules of a converter-made grammar renamed `<prefix>-<name>`, so several grammars share one file."""
    parsed = [line.split(" ::= ", 1) for line in grammar_text.splitlines() if " ::= " in line]
    names = {name.strip() for name, _ in parsed}

    def rename(body: str) -> str:
        tokens = _GBNF_TOKEN.findall(body)
        return "".join(f"{prefix}-{token}" if token in names else token for token in tokens)

    return [f"{prefix}-{name.strip()} ::= {rename(body)}" for name, body in parsed]


def gbnf_literal(text: str) -> str:
    """A GBNF string literal for `text` ("" for empty text, which GBNF sequences simply leave out)."""
    if not text:
        return ""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char == "\n":
            escaped.append("\\n")
        elif char == "\r":
            escaped.append("\\r")
        elif char == "\t":
            escaped.append("\\t")
        elif ord(char) < 0x20:
            escaped.append(f"\\x{ord(char):02x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
