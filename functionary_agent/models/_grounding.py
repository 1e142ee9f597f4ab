"""Grounding: which argument values a conversation supports, for steering a small model (see `Review`).

A 135M model fills arguments from its prior rather than from what the user said; these checks are what the embedded
engine uses to prefer values copied from the conversation and to drop or reject values that came from nowhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from functionary_agent.formats._common import message_text
from functionary_agent.models.base import ToolCall

# A number as people write it: thousands grouped by three ("1,500,000") or plain ("0.05", "-11"); a list such as
# "[22,33,42]" is three numbers, not one.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])|(?<![\w.])-?\d+(?:\.\d+)?")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "hundred": 100, "thousand": 1000, "million": 1_000_000,
    "once": 1, "twice": 2, "thrice": 3, "dozen": 12, "single": 1, "double": 2, "triple": 3, "pair": 2,
}


def numbers_in(text: str) -> list[str]:
    """The numbers a text states, as JSON number text: digits ("1,500" -> "1500") and number words ("six" -> "6")."""
    found = [match.replace(",", "") for match in _NUMBER.findall(text)]
    found += [str(_NUMBER_WORDS[word]) for word in re.findall(r"[a-z]+", text.lower()) if word in _NUMBER_WORDS]
    return list(dict.fromkeys(found))


class Review:
    """What the engine checks in each JSON call before anyone sees it.

    A small model fills arguments from its prior: the example in a description ("Istanbul"), a plausible unit, a
    number from nowhere. Arguments are grounded when their values occur in the conversation (user, system and tool
    messages; never the tool descriptions). An optional argument that is not grounded is left out, so the tool's
    default applies. Where text may replace the call (tool_choice "auto"), a call none of whose required values is
    grounded, or one the conversation already made, is rejected: the model writes text instead. An array that
    ran to `max_items` is a loop (the model never closed it): its repeated items are dropped.
    """

    def __init__(self, messages: Sequence[Mapping[str, Any]], max_items: int | None = None) -> None:
        self._evidence = Evidence(evidence_text(messages))
        self._max_items = max_items
        self._made = [(call.name, _loads(call.arguments)) for m in messages for call in _calls_of(m)]

    def __call__(self, spec: Any, arguments: str, may_reject: bool) -> str | None:
        try:
            value = json.loads(arguments)
        except ValueError:
            return arguments
        if not isinstance(value, dict):
            return arguments
        required = set((spec.parameters or {}).get("required") or ())
        value = {key: _unlooped(item, self._max_items) for key, item in value.items()}
        kept = {key: item for key, item in value.items() if key in required or self._evidence.supports(item)}
        if may_reject and (not self._grounded(kept, required) or self._repeats(spec.name, kept, required)):
            return None
        unchanged = kept == value and json.loads(arguments) == value
        return arguments if unchanged else json.dumps(kept, ensure_ascii=False)

    def _repeats(self, name: str, arguments: Mapping[str, Any], required: set[str]) -> bool:
        """The conversation already made this call: same function, same required values (optional values only
        refine a call; a small model adds them to a call it has the answer to)."""
        keys = required or set(arguments)
        mine = {key: arguments.get(key) for key in keys}
        return any(
            made_name == name and isinstance(made, dict) and {key: made.get(key) for key in keys} == mine
            for made_name, made in self._made
        )

    def _grounded(self, arguments: Mapping[str, Any], required: set[str]) -> bool:
        """At least one required value occurs in the conversation (or no required value could)."""
        checkable = [item for key, item in arguments.items() if key in required and _checkable(item)]
        return not checkable or any(self._evidence.supports(item) for item in checkable)


def descriptions(tools: Sequence[Mapping[str, Any]]) -> str:
    """Every description and example in the tool definitions: where a small model's made-up values come from."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key in ("description", "examples", "default") and not isinstance(value, (Mapping, bool)):
                    found.append(json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(list(tools))
    return "\n".join(found)


def evidence_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """What the conversation said: user, system and tool messages (never the tool descriptions)."""
    return "\n".join(message_text(m.get("content")) for m in messages if m.get("role") in ("user", "system", "tool"))


class Evidence:
    """The conversation's text, normalised for lenient matching: case, punctuation and spacing do not count."""

    def __init__(self, text: str) -> None:
        lowered = text.lower()
        self._squashed = re.sub(r"[^0-9a-z\u00c0-\uffff]", "", lowered)
        self._words = set(re.findall(r"[0-9a-z\u00c0-\uffff]+", lowered))
        self._numbers = {float(number) for number in numbers_in(text)}

    def supports(self, value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return True  # a flag cannot be quoted; the model's choice stands
        if isinstance(value, (int, float)):
            return float(value) in self._numbers
        if isinstance(value, str):
            squashed = re.sub(r"[^0-9a-z\u00c0-\uffff]", "", value.lower())
            words = re.findall(r"[0-9a-z\u00c0-\uffff]+", value.lower())
            quoted = squashed in self._squashed or 2 * sum(word in self._words for word in words) >= len(words)
            return bool(squashed) and quoted
        if isinstance(value, list):
            return all(self.supports(item) for item in value)
        if isinstance(value, dict):
            return all(self.supports(item) for item in value.values())
        return True


def _unlooped(value: Any, max_items: int | None) -> Any:
    """`value` without the repeats of any array that reached `max_items` (the first of each kept, in order)."""
    if isinstance(value, dict):
        return {key: _unlooped(item, max_items) for key, item in value.items()}
    if not isinstance(value, list):
        return value
    items = [_unlooped(item, max_items) for item in value]
    if max_items is None or len(items) < max_items:
        return items
    unique: list[Any] = []
    for item in items:
        if item not in unique:
            unique.append(item)
    return unique


def _checkable(value: Any) -> bool:
    return not isinstance(value, bool) and value is not None and value != [] and value != {}


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _calls_of(message: Mapping[str, Any]) -> list[ToolCall]:
    if message.get("role") != "assistant":
        return []
    return [ToolCall.from_dict(call) for call in message.get("tool_calls") or () if isinstance(call, Mapping)]
