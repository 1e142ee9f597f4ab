"""Functionary prompt formats: byte-exact prompts, robust parsing and streaming, and the call grammar.

`get_format(name)` gives the one object per protocol that both the embedded engine and the vLLM server use, so the
two render identical prompts for the same request. `detect_format` picks the name from a model's chat template.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from functionary_agent.errors import FormatError
from functionary_agent.formats._stream import StreamParser, message_from_deltas
from functionary_agent.formats.base import Format
from functionary_agent.formats.chatml import ChatMLV3Format
from functionary_agent.formats.grammar import (
    CallGrammar,
    CallSpec,
    arguments_gbnf,
    choice_gbnf,
    guard_schema,
    to_gbnf,
)
from functionary_agent.formats.v2 import V2Format, V25Format
from functionary_agent.formats.v3 import V3Format
from functionary_agent.formats.v31 import V31Format

__all__ = [
    "ALIASES",
    "FORMAT_NAMES",
    "CallGrammar",
    "CallSpec",
    "Format",
    "StreamParser",
    "arguments_gbnf",
    "choice_gbnf",
    "detect_format",
    "get_format",
    "guard_schema",
    "message_from_deltas",
    "to_gbnf",
]

_FORMATS: dict[str, Format] = {
    fmt.name: fmt for fmt in (V3Format(), V31Format(), V2Format(), V25Format(), ChatMLV3Format())
}
FORMAT_NAMES: tuple[str, ...] = tuple(_FORMATS)
ALIASES: dict[str, str] = {"v3.2": "v3.llama3", "v3.0": "v3.llama3", "v3.1": "v3-llama3.1", "v2.5": "v2.llama3"}


def get_format(name: str) -> Format:
    """The format called `name` (or one of its aliases: v3.2, v3.0, v3.1, v2.5)."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in _FORMATS:
        known = ", ".join([*FORMAT_NAMES, *ALIASES])
        raise FormatError(f"unknown prompt format {name!r}; known formats: {known}")
    return _FORMATS[key]


def detect_format(chat_template: str | None, special_tokens: Iterable[Any] | Mapping[str, Any] | None = None) -> str:
    """The format name for a model, from its chat template and its special tokens (token strings, or a mapping
    such as a tokenizer's added vocabulary or special-tokens map). Raises FormatError when nothing matches."""
    template = chat_template or ""
    tokens = _token_strings(special_tokens)
    if "<|eom_id|>" in template:
        return "v3-llama3.1"
    if "<|reserved_special_token_249|>" in template:
        return "v2.llama3"
    if ">>>" in template:
        return "v3.llama3"
    if "<|from|>" in tokens or ("<|from|>" in template and "<|recipient|>" in template):
        return "v2"
    if "<|im_start|>" in template:
        return "chatml-v3"
    raise FormatError(
        "cannot tell the prompt format from this model's chat template; pass --format (format=) with one of: "
        + ", ".join(FORMAT_NAMES)
    )


def _token_strings(special_tokens: Iterable[Any] | Mapping[str, Any] | None) -> set[str]:
    if special_tokens is None:
        return set()
    if isinstance(special_tokens, Mapping):
        values = [*special_tokens.keys(), *special_tokens.values()]
    else:
        values = list(special_tokens)
    found: set[str] = set()
    for value in values:
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(item for item in value if isinstance(item, str))
        elif hasattr(value, "content"):  # tokenizers' AddedToken
            found.add(str(value.content))
    return found
