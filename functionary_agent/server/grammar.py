"""A request's call grammar as a vLLM structural tag (xgrammar's `{"type": "structural_tag", "format": ...}`).

The tag describes the whole output after the prompt, so decoding enforces tool_choice: the recipients are exactly
the tools the request allows, each call's arguments follow its JSON schema, free text appears only where the
request allows it and never contains a marker that would open a call, and calls stop at the request's limit
(one for a named function or `parallel_tool_calls: false`).
Free text is `any_text` (no per-token grammar work beyond the excluded markers), which keeps grammar-on
throughput close to grammar-off.

Pure data built from `Format.call_grammar`: nothing here imports vLLM, so it is tested without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from functionary_agent.errors import ConfigurationError
from functionary_agent.formats import CallGrammar, CallSpec, Format, guard_schema
from functionary_agent.server.checks import name_problem

Node = dict[str, Any]
# A model looping on blanks inside JSON would spend its whole budget there; real arguments never need more.
MAX_JSON_WHITESPACE = 16


def structural_tag(
    fmt: Format,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any = "auto",
    *,
    parallel_tool_calls: bool = True,
    max_calls: int | None = None,
    max_items: int | None = None,
    max_length: int | None = None,
) -> Node:
    """The structural tag for one request (raises ConfigurationError for a tool_choice the tools cannot meet, or a
    tool name the parser would not read back as a call). `max_calls` caps the calls in one turn; `max_items` /
    `max_length` bound arrays and free strings in arguments where the schema sets no bound (small models otherwise
    write a list or a string until max_tokens cuts it)."""
    grammar = fmt.call_grammar(tools, tool_choice)
    for spec in grammar.calls:
        problem = name_problem(spec.name, fmt)
        if problem is not None:
            raise ConfigurationError(f"no call grammar for tool {spec.name!r}: {problem}")
    if max_items is not None or max_length is not None:
        grammar = replace(grammar, calls=tuple(_bounded(spec, max_items, max_length) for spec in grammar.calls))
    limits = [n for n in (grammar.max_calls, max_calls, None if parallel_tool_calls else 1) if n is not None]
    limit = min(limits) if limits else None
    excludes = _excludes(fmt, grammar)
    build = _recipient_first if grammar.text_begin else _text_first
    return {"type": "structural_tag", "format": build(grammar, excludes, limit)}


def _bounded(spec: CallSpec, max_items: int | None, max_length: int | None) -> CallSpec:
    if spec.parameters is None:
        return spec
    return replace(spec, parameters=guard_schema(spec.parameters, max_items=max_items, max_length=max_length))


def _excludes(fmt: Format, grammar: CallGrammar) -> list[str]:
    """Free text must not contain anything that opens a segment, even where no call may follow (tool_choice none)."""
    markers = [marker for marker, _ in fmt.protocol.text_markers]
    return list(dict.fromkeys(marker for marker in [*grammar.triggers, *markers] if marker))


def _recipient_first(grammar: CallGrammar, excludes: list[str], limit: int | None) -> Node:
    """v2, v3, chatml-v3: every segment opens with its recipient, the first one partly written by the prompt.
    Text segments may come anywhere before the call limit is reached; after the last allowed call, the turn ends."""
    first = grammar.first_openers()
    first_calls = [_segment(rest, spec, excludes) for rest, spec in first.items() if spec is not None]
    later_calls = [_segment(begin, spec, excludes) for begin, spec in grammar.openers().items() if spec is not None]
    text_rest = [rest for rest, spec in first.items() if spec is None]
    if not text_rest:  # required or named: calls only
        return _calls_only(first_calls, later_calls, limit)
    texts = _star(_segment(grammar.text_begin, None, excludes))
    text_first = _segment(text_rest[0], None, excludes)
    if limit == 0 or not later_calls:
        return _sequence(text_first, texts)
    call = _or(later_calls)
    starts_with_text = _sequence(text_first, texts, _more_calls(call, texts, limit))
    if not first_calls:
        return starts_with_text
    return _or([starts_with_text, _sequence(_or(first_calls), _after_call(call, texts, _less(limit)))])


def _text_first(grammar: CallGrammar, excludes: list[str], limit: int | None) -> Node:
    """v2.llama3, v3-llama3.1: text needs no opener; calls are marked, and the prompt may have opened the first."""
    first = grammar.first_openers()
    first_calls = [_segment(rest, spec, excludes) for rest, spec in first.items() if spec is not None]
    later_calls = [_segment(begin, spec, excludes) for begin, spec in grammar.openers().items() if spec is not None]
    if None not in first.values():  # required or named: calls only
        return _calls_only(first_calls, later_calls, limit)
    text = _text(excludes)
    if limit == 0 or not later_calls:
        return text
    return _sequence(text, _more_calls(_or(later_calls), text, limit))


def _more_calls(call: Node, text: Node, limit: int | None) -> Node | None:
    """Up to `limit` more calls (None: any number), each followed by text only while another call may follow."""
    if limit is None:
        return _star(_sequence(call, text))
    if limit <= 0:
        return None
    return _repeat(_sequence(call, _after_call(call, text, limit - 1)), 1)


def _after_call(call: Node, text: Node, remaining: int | None) -> Node | None:
    """What may follow a call when `remaining` more calls are allowed: at the limit, only the end of the turn (a
    text segment there would be an answer written before the results exist)."""
    if remaining == 0:
        return None
    return _sequence(text, _more_calls(call, text, remaining))


def _calls_only(first_calls: list[Node], later_calls: list[Node], limit: int | None) -> Node:
    return _sequence(_or(first_calls), _repeat(_or(later_calls), _less(limit)) if later_calls else None)


def _less(limit: int | None) -> int | None:
    return None if limit is None else max(limit - 1, 0)


def _segment(opener: str, spec: CallSpec | None, excludes: list[str]) -> Node:
    """One segment: its opener (or the part of it the prompt left), then text, raw code or JSON arguments."""
    if spec is None:
        return _sequence(_const(opener), _text(excludes))
    if spec.parameters is None:  # python: raw code up to the next opener or the end of the turn
        return _sequence(_const(opener), _text(excludes), _const(spec.end))
    schema = guard_schema(spec.parameters)
    arguments = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    return _sequence(_const(opener), arguments, _const(spec.end))


def _text(excludes: list[str]) -> Node:
    return {"type": "any_text", "excludes": list(excludes)}


def _const(text: str) -> Node | None:
    return {"type": "const_string", "value": text} if text else None


def _sequence(*elements: Node | None) -> Node:
    kept = [element for element in elements if element is not None]
    return kept[0] if len(kept) == 1 else {"type": "sequence", "elements": kept}


def _or(elements: list[Node]) -> Node:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _star(element: Node) -> Node:
    return {"type": "star", "content": element}


def _repeat(element: Node, times: int | None) -> Node | None:
    """`element` up to `times` times (None: any number). Plain `star` where unbounded, which older xgrammar has."""
    if times is None:
        return _star(element)
    if times <= 0:
        return None
    return {"type": "repeat", "min": 0, "max": times, "content": element}
