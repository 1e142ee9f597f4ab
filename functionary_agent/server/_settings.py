"""Names and switches shared by the plugin's parts, which run in different vLLM processes and meet only here.

The API server process renders prompts and parses outputs, the engine process compiles grammars; both learn the
format from the same place: a mode name that pins it (`functionary-chatml-v3`), else $FUNCTIONARY_AGENT_FORMAT,
else the model's own chat template. No vLLM import: the launcher and the unit tests use this too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from functionary_agent.errors import ConfigurationError
from functionary_agent.formats import FORMAT_NAMES, Format, detect_format, get_format

PREFIX = "functionary"  # tool parser name and tokenizer/renderer mode; f"{PREFIX}-{format}" pins the format
FORMAT_ENV = "FUNCTIONARY_AGENT_FORMAT"
GRAMMAR_ENV = "FUNCTIONARY_AGENT_GRAMMAR"
GRAMMAR_XARG = "functionary_grammar"  # per request: {"vllm_xargs": {"functionary_grammar": "off"}}
# Bounds on calls per turn and on call arguments (arrays' items, free strings' length), per request in vllm_xargs
# (`functionary_max_calls`...) or for the server in the environment; unset: the request and the schema decide.
# Small models need them to stop calling, or writing a string or a list, before max_tokens cuts a call short.
LIMITS = {
    "max_calls": "FUNCTIONARY_AGENT_MAX_CALLS",
    "max_items": "FUNCTIONARY_AGENT_MAX_ITEMS",
    "max_length": "FUNCTIONARY_AGENT_MAX_LENGTH",
}
_OFF = frozenset({"0", "off", "false", "no"})
# format -> its tool parser class in functionary_agent.server.tool_parser (None: resolved per model)
PARSER_CLASSES: dict[str | None, str] = {
    None: "FunctionaryToolParser",
    "v3.llama3": "V3ToolParser",
    "v3-llama3.1": "V31ToolParser",
    "v2.llama3": "V25ToolParser",
    "v2": "V2ToolParser",
    "chatml-v3": "ChatMLV3ToolParser",
}


def mode_names() -> dict[str, str | None]:
    """Every name the plugin registers, with the format it pins (None: resolved per model)."""
    return {PREFIX: None, **{f"{PREFIX}-{name}": name for name in FORMAT_NAMES}}


def mode_for(format_name: str | None) -> str:
    """The parser / tokenizer-mode name for `format_name` (its canonical spelling; aliases such as v3.2 accepted)."""
    return PREFIX if format_name is None else f"{PREFIX}-{get_format(format_name).name}"


def format_of_mode(mode: str | None) -> str | None:
    return mode_names().get(mode or "")


def resolve_format(pinned: str | None, tokenizer: Any) -> Format:
    """The format of a model: pinned by name, else from the environment, else detected from its chat template."""
    name = pinned or os.environ.get(FORMAT_ENV)
    if name:
        return get_format(name)
    template = getattr(tokenizer, "chat_template", None)
    return get_format(detect_format(template if isinstance(template, str) else None, _special_tokens(tokenizer)))


def _special_tokens(tokenizer: Any) -> Mapping[str, Any] | None:
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        vocab = added()
        return vocab if isinstance(vocab, Mapping) else None
    return None


def grammar_enabled(per_request: Mapping[str, Any] | None = None) -> bool:
    """Grammar-constrained calls are on unless the server ($FUNCTIONARY_AGENT_GRAMMAR=0, `serve --no-grammar`) or
    the request (`vllm_xargs`) turns them off; off exists to measure what the grammar costs and buys."""
    if per_request and GRAMMAR_XARG in per_request:
        return str(per_request[GRAMMAR_XARG]).strip().lower() not in _OFF
    return os.environ.get(GRAMMAR_ENV, "1").strip().lower() not in _OFF


def grammar_limits(per_request: Mapping[str, Any] | None = None) -> dict[str, int | None]:
    """`max_calls`, `max_items`, `max_length` for the call grammar: `functionary_<name>` in vllm_xargs, else the
    environment."""
    limits: dict[str, int | None] = {}
    for name, variable in LIMITS.items():
        value = (per_request or {}).get(f"functionary_{name}", os.environ.get(variable))
        try:
            limits[name] = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            raise ConfigurationError(f"{name} must be an integer, got {value!r}") from None
    return limits


def plain_data(value: Any) -> Any:
    """Request data (messages, tools, tool_choice) as plain lists and dicts for `formats`: vLLM holds them as
    pydantic models, and its validation leaves lazy one-shot iterators in messages (an assistant's `tool_calls`, a
    content part list) that would otherwise be consumed on first read."""
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_none=True)
    if isinstance(value, Mapping):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return value
    return [plain_data(item) for item in value]
