"""Steering a small model (`steer=True`, on by default for chatml-v3): the embedded engine's heuristics, kept apart
from the decoder so a Functionary GGUF user can read decoding without them.

A 135M model fills arguments from its prior rather than from what the user said, calls some tool for nearly any
question, makes one call where the user listed several, and echoes the protocol or a tool result instead of
answering. Here: grounding (`Evidence`, `Review`), which tools a request is about (`Relevance`), further calls for
listed values (`FurtherCalls`), the copy bias (`CopyBias`) and how a text may open (`text_opening`); the review
also repairs values that lost their leading punctuation (`restore_leading`) and finds enum values the user named by a
synonym (`named_enum_values`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from functionary_agent._openai_messages import message_text
from functionary_agent.models._code_segment import CODE_PURPOSE, code_steering_on
from functionary_agent.models._json_values import value_repair
from functionary_agent.models.base import ToolCall

# A number as people write it: thousands grouped by three ("2,500,000") or plain ("0.75", "-18"); a list such as
# "[12,14,16]" is three numbers, not one.
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

    Values are repaired first (unless the private switch `VALUE_REPAIR_SWITCH` is off): a string that the
    conversation writes only with leading punctuation gets it back ("tmp/old.log" -> "/tmp/old.log", "sunset" ->
    "#sunset"; `restore_leading`), and an enum property takes the value the request names (`named_enum_values`).
    """

    def __init__(self, messages: Sequence[Mapping[str, Any]], max_items: int | None = None) -> None:
        self._source = evidence_text(messages)
        self._evidence = Evidence(self._source)
        self._request = request_text(messages)
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
        named = self._repair(spec.parameters or {}, value) if value_repair() else {}
        kept = {k: item for k, item in value.items() if k in required or k in named or self._evidence.supports(item)}
        if may_reject and (not self._grounded(kept, required) or self._repeats(spec.name, kept, required)):
            return None
        unchanged = kept == value and json.loads(arguments) == value
        return arguments if unchanged else json.dumps(kept, ensure_ascii=False)

    def _repair(self, parameters: Mapping[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        """Repairs `value` in place (see the class); returns the enum values the request named."""
        declared = parameters.get("properties")
        properties: Mapping[str, Any] = declared if isinstance(declared, Mapping) else {}
        for key, item in value.items():
            if not isinstance(properties.get(key), Mapping) or "enum" not in properties[key]:
                value[key] = restore_leading(item, self._source)
        named = named_enum_values(properties, self._request)
        value.update(named)
        return named

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


# A span of text as a value may copy it: what stands between spaces, without the brackets, quotes and sentence
# punctuation around it ("(/tmp/old.log)." -> "/tmp/old.log")
_SPAN = re.compile(r"[^\s(\[{<\"'`](?:\S*[^\s.,;:!?)\]}>\"'`])?")


def restore_leading(value: Any, source: str) -> Any:
    """`value` with the leading punctuation it lost: a string that `source` never writes as a span of its own, only
    after punctuation ("tmp/old.log" where the user wrote "/tmp/old.log"; "12" for "$12"; "env" for ".env"), becomes
    that span, if exactly one; strings inside lists and objects alike."""
    if isinstance(value, list):
        return [restore_leading(item, source) for item in value]
    if isinstance(value, dict):
        return {key: restore_leading(item, source) for key, item in value.items()}
    if not isinstance(value, str) or not value:
        return value
    spans = set(_SPAN.findall(source))
    if value in spans:
        return value
    longer = {span for span in spans if span.endswith(value) and not any(c.isalnum() for c in span[: -len(value)])}
    return longer.pop() if len(longer) == 1 else value


def named_enum_values(properties: Mapping[str, Any], request: str) -> dict[str, str]:
    """For each enum property (of strings) whose values the request names exactly one of, that value.

    A value is named by itself, by a word its description gives it, or by an abbreviation. Its description's words:
    the description is cut into clauses (at , ; | and "or"), and a clause that mentions one value names it by the
    words next to the mention (up to two, after it or else before it: "c for Celsius", "Celsius (c)"); glue words,
    the property's own name and words given to several values do not count. A request word names a value's word
    when equal, when it is a prefix of it of 3+ letters ("Fahr"), when the word is a prefix of it with at most 3
    more letters ("mile", "miles"), or as a single capital letter the word starts with ("F" for "fahrenheit")."""
    words = [word for word in words_of(request) if word not in _GLUE]
    capitals = {letter.lower() for letter in re.findall(r"(?<![\w])[A-Z](?![\w])", request)}
    named: dict[str, str] = {}
    for key, prop in properties.items():
        values = [v for v in prop.get("enum") or () if isinstance(v, str)] if isinstance(prop, Mapping) else []
        if len(values) < 2:
            continue
        names = _enum_names(values, str(prop.get("description") or ""), set(words_of(str(key))))
        chosen = [v for v in values if any(_names(word, name, word in capitals) for word in words for name in names[v])]
        if len(chosen) == 1:
            named[key] = chosen[0]
    return named


def _enum_names(values: Sequence[str], description: str, own: set[str]) -> dict[str, set[str]]:
    """The words that name each enum value: its own, and those its description gives it."""
    names = {value: set(words_of(value)) for value in values}
    given: dict[str, set[str]] = {value: set() for value in values}
    for clause in re.split(r"[,;|\n]|\bor\b|\.\s", description):
        clause_words = words_of(clause)
        mentioned = [v for v in values if _mention(clause_words, names[v]) is not None]
        if len(mentioned) != 1:
            continue
        start, end = _mention(clause_words, names[mentioned[0]]) or (0, 0)
        after = [w for w in clause_words[end:] if w not in _GLUE and w not in own]
        before = [w for w in clause_words[:start] if w not in _GLUE and w not in own]
        given[mentioned[0]].update(after[:2] if after else before[-2:])
    shared = {word for value in values for word in given[value] if sum(word in given[v] for v in values) > 1}
    return {value: names[value] | (given[value] - shared) for value in values}


def _mention(words: Sequence[str], name: set[str]) -> tuple[int, int] | None:
    """Where a value's words (`name`) stand in `words`: the first and one past the last index, if all appear."""
    places = [index for index, word in enumerate(words) if word in name]
    if not name or not places or {words[index] for index in places} != name:
        return None
    return places[0], places[-1] + 1


def _names(word: str, name: str, capital: bool) -> bool:
    """Whether a request's `word` names an enum value's word `name` (see `named_enum_values`)."""
    if word == name:
        return True
    if len(word) >= 3 and name.startswith(word):
        return True
    if len(name) >= 4 and word.startswith(name) and len(word) - len(name) <= 3:
        return True
    return capital and len(word) == 1 and name.startswith(word)


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


_WORD = re.compile(r"[0-9a-z\u00c0-\uffff]+")


def words_of(text: str) -> list[str]:
    """Lower-case runs of letters and digits: the unit in which values are matched against the conversation."""
    return _WORD.findall(text.lower())


class Evidence:
    """The conversation's text as words, for lenient matching: case, punctuation and spacing do not count, but a
    value must match whole words ("NY" is not grounded by "any", nor "5" by "15")."""

    def __init__(self, text: str) -> None:
        self._sequence = words_of(text)
        self._words = set(self._sequence)
        self._numbers = {float(number) for number in numbers_in(text)}

    def supports(self, value: Any) -> bool:
        if isinstance(value, bool) or value is None:
            return True  # a flag cannot be quoted; the model's choice stands
        if isinstance(value, (int, float)):
            return float(value) in self._numbers
        if isinstance(value, str):
            words = words_of(value)
            known = sum(word in self._words for word in words)
            return bool(words) and (self._quotes("".join(words)) or (len(words) > 1 and 2 * known >= len(words)))
        if isinstance(value, list):
            return all(self.supports(item) for item in value)
        if isinstance(value, dict):
            return all(self.supports(item) for item in value.values())
        return True

    def _quotes(self, squashed: str) -> bool:
        """Some run of whole conversation words spells `squashed` ("new-york", "New York" and "NewYork" alike)."""
        for start, word in enumerate(self._sequence):
            if not squashed.startswith(word):
                continue
            spelled, end = word, start + 1
            while len(spelled) < len(squashed) and end < len(self._sequence):
                spelled, end = spelled + self._sequence[end], end + 1
            if spelled == squashed:
                return True
        return False


# Words that say nothing of what a tool is for: glue, and the verbs every request and every tool description uses.
_GLUE_TEXT = """a an the to of in on at by for from with and or is are was be it its me my i you your we our us
this that what whats how who why when where which please can could would will do does did get set make give tell let
like want need some any all one there here about into than then now right today via given specified name value type
current"""
_GLUE = frozenset(_GLUE_TEXT.split())
_STEM = 5  # "reserve" and "reservation", "convert" and "conversion" meet in their first five letters


class Relevance:
    """Whether the user's request mentions what a tool is for: a word of the request meets a word of the tool's
    name, description, parameter names or descriptions or enum values (glue words aside, long words by their first
    five letters). A 135M model calls some tool for almost any question ("Who wrote Hamlet?" becomes a file search
    for "Hamlet", whose value the question does contain), so grounding alone cannot tell a request from small talk.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]], request: str) -> None:
        self._asked = _stems(request)
        self._purposes: dict[str, set[str]] = {}
        for tool in tools:
            if tool.get("type") == "code_interpreter":  # no description of its own: what the `python` tool is for
                if code_steering_on():
                    self._purposes["python"] = _stems(CODE_PURPOSE)
                continue
            function = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                self._purposes[function["name"]] = _stems(_purpose_text(function))

    def serves(self, name: str) -> bool:
        purpose = self._purposes.get(name)
        return purpose is None or bool(purpose & self._asked)

    def served(self) -> frozenset[str]:
        """The tools the request mentions the purpose of."""
        return frozenset(name for name in self._purposes if self.serves(name))


def _stems(text: str) -> set[str]:
    return {word[:_STEM] for word in words_of(text.replace("_", " ")) if word not in _GLUE and not word.isdigit()}


def _purpose_text(function: Mapping[str, Any]) -> str:
    parts = [str(function.get("name", "")), str(function.get("description", ""))]
    properties = (function.get("parameters") or {}).get("properties") or {}
    for key, prop in properties.items() if isinstance(properties, Mapping) else ():
        parts.append(str(key))
        if isinstance(prop, Mapping):
            parts.append(str(prop.get("description", "")))
            parts.extend(str(item) for item in prop.get("enum") or () if isinstance(item, str))
    return " ".join(parts)


def request_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The request a call answers: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


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


# What may stand between two listed values: a comma or a conjunction, then perhaps the preposition or article that
# the first value had ("in Istanbul and in Hanoi", "to EUR and to GBP").
_LINK = r"(?:\s*,\s*(?:(?:and|or|&)\s+)?|\s+(?:and|or|&|plus)\s+)(?:(?:in|to|for|at|on|from|of|the|with|into)\s+)?"
_NUMBER_TEXT = r"-?\d+(?:\.\d+)?"


def listed_with(text: str, value: Any) -> list[str]:
    """The values `text` lists together with `value` ("Paris, Berlin and Madrid"; "20 GBP and 35 GBP"): the same
    shape (a number, a capitalised name of as many words, a code in capitals, a file or address name), joined by
    a comma or a conjunction. Plain lower-case words are never listed values: too often they are the next verb."""
    entity = _entity_pattern(value)
    if entity is None:
        return []
    found: list[str] = []
    for match in re.finditer(rf"(?<![\w.@])({re.escape(_spelled(value))})(?![\w@])", text, flags=re.IGNORECASE):
        unit = re.match(r"\s+([A-Za-z]+)", text[match.end(1):]) if entity == _NUMBER_TEXT else None
        found += _walk(text, match.start(1), match.end(1), entity, unit.group(1) if unit else "")
    return [item for item in dict.fromkeys(found) if item.lower() != _spelled(value).lower()]


def _entity_pattern(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return _NUMBER_TEXT
    if not isinstance(value, str) or not value.strip():
        return None
    words = value.split()
    if any(ch in value for ch in "._@") or any(ch.isdigit() for ch in value):
        return r"[\w\-]+(?:[._@][\w\-]+)+" if len(words) == 1 else None  # a file or address name
    if all(word.isupper() and len(word) > 1 for word in words):
        return r"\s+".join([r"[A-Z]{2,}"] * len(words))
    if all(word[:1].isupper() for word in words):  # a name has two letters at least ("in F" names no city)
        return r"\s+".join([r"[A-Z\u00c0-\u00de][\w'\-]+"] * len(words))
    return None


def _walk(text: str, start: int, end: int, entity: str, unit: str = "") -> list[str]:
    """Neighbours of the value at text[start:end], rightwards then leftwards, as long as the list goes on. A
    number's unit may follow each number ("10 miles and 20 miles")."""
    unit = rf"(?:\s+{re.escape(unit)})?" if unit else ""
    found = []
    right = end
    while match := re.match(rf"{unit}{_LINK}({entity})(?![\w@])", text[right:]):
        found.append(match.group(1))
        right += match.end()
    left = start
    while match := re.search(rf"(?<![\w.@])({entity}){unit}{_LINK}$", text[:left]):
        found.append(match.group(1))
        left = match.start(1)
    return found


def _spelled(value: Any) -> str:
    """A value as the user would have written it (20.0 as "20")."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class FurtherCalls:
    """After a call, a further call of the same tool for each other value the user listed with one of its values:
    "weather in Istanbul and in Hanoi" -> get_weather(Istanbul), then get_weather(Hanoi). A small model makes the
    first call and then answers for both cities from nothing; this writes the calls the list asks for instead.
    Each value is used once per turn; the call made is the previous one with that value replaced."""

    def __init__(self, request: str) -> None:
        self._request = request
        self._used: set[tuple[str, str, str]] = set()

    def __call__(self, name: str, arguments: str) -> str | None:
        value = _loads(arguments)
        if not isinstance(value, dict):
            return None
        for key, item in value.items():
            self._used.add((name, key, _spelled(item).lower()))
        for key, item in value.items():
            for sibling in listed_with(self._request, item):
                if (name, key, _spelled(_like(item, sibling)).lower()) not in self._used:
                    replaced = {**value, key: _like(item, sibling)}
                    return json.dumps(replaced, ensure_ascii=False)
        return None


def _like(original: Any, text: str) -> Any:
    """`text` as a value of the original's type (numbers stay numbers)."""
    if isinstance(original, (int, float)) and not isinstance(original, bool):
        number = float(text)
        return int(number) if isinstance(original, int) and number.is_integer() else number
    return text


# A text segment may not open with the words a small model writes when it echoes the protocol instead of answering
# (the `all` recipient, "Recipient:", "Available functions", a traceback). Measured on the prompts of
# benchmarks/embedded_decisions.py under tool_choice "none": 4.7 % of answers echoed the protocol or were empty with
# this ban, 17.2 % with none, 14.1 % with the earlier rule (a capital first letter, Python literals banned), which
# also refused answers such as "8 legs.".
_NOT_PROSE = ("All", "all", "ALL", "Available", "Trace", "Traceback", "Recipient", "Output")
# Right after a tool result the model mistakes itself for the tool: it copies the result's JSON, a date, or answers
# "True" / "None" for ever (seen on the README's own weather example). There the answer must open like a sentence:
# a capital or non-ASCII letter, and not a Python literal.
_SENTENCE_START = "root ::= ([A-Z] | [^\\x00-\\x7f]) [^\\x00]*"
_LITERALS = ("True", "False", "None", "Null")


def text_opening(*, after_result: bool) -> tuple[tuple[str, ...], str | None]:
    """What a steered text segment may not open with, and the grammar its first token follows (None: any)."""
    if after_result:
        return (*_NOT_PROSE, *_LITERALS), _SENTENCE_START
    return _NOT_PROSE, None


class CopyBias:
    """Favours argument values copied from the conversation (`source`: the user's, system and tool messages).

    A small model fills arguments from its prior (the example in a description, a round number). Adding `bias` to the
    logits of the tokens that begin a span of the source (at the start of a string value) or go on with a word or
    number of the source that the value has begun makes it copy what the user said instead; a string that would
    begin like a name or a quoted example of the tool descriptions (`examples`) that the conversation never used
    gets `bias` taken off. Where the value already is a whole word or number of the source, nothing is favoured:
    going on is the model's call.

    A value starts best where a span of the source starts: after a space, a quote or a bracket. "/tmp/old.log" is
    such a span; its inner words ("tmp") get half the bias only, so a path keeps its "/". Where the tokenizer merges
    the opening quote with what follows (` "/`, ` "$`, ` "#`), the merged token is favoured ("opener", see
    `ValueBias`).
    """

    def __init__(self, llama: Any, source: str, bias: float, examples: str = "") -> None:
        self._llama = llama
        self._bias = bias
        self._text = source
        self._lower = source.lower()
        self._repair = value_repair()  # off (a private switch): every word start alike, as before spans counted
        self._span_starts = _span_starts(source) if self._repair else []
        spans = set(self._span_starts)
        self._inner_starts = [m.start() for m in re.finditer(r"(?<![\w])\w", source) if m.start() not in spans]
        self._inner_bias = bias / 2 if self._repair else bias
        self._numbers = numbers_in(source)
        self._first: dict[str, int | None] = {}
        known = set(re.findall(r"\w+", self._lower))
        named = re.findall(r"\b[A-Z]\w{2,}", examples) + re.findall(r"[\"']([^\"'\n]{3,40})[\"']", examples)
        unsaid = {word for word in named if word.lower() not in known}
        starts = {t for t in map(self._first_token, unsaid) if t is not None}
        self._unsaid = sorted(starts - set(self._string_tokens("", self._span_starts + self._inner_starts)))

    def logits(self, kind: str, written: str) -> tuple[list[int], list[float]]:
        """The tokens to favour (or, with a negative value, disfavour) next, and by how much."""
        if kind == "string":
            return self._string_logits(written)
        if kind == "opener":
            return self._opener_logits(written)
        if kind == "start":  # a number begins like one the conversation states (the grammar says if one fits)
            favoured = sorted({t for t in map(self._first_token, self._numbers) if t is not None})
            return favoured, [self._bias] * len(favoured)
        if kind == "number" and written not in self._numbers:
            rests = {number[len(written) :] for number in self._numbers if number.startswith(written)}
            favoured = sorted(t for t in map(self._first_token, rests) if t is not None)
            return favoured, [self._bias] * len(favoured)
        return [], []

    def _string_logits(self, written: str) -> tuple[list[int], list[float]]:
        if written:
            favoured = self._string_tokens(written, self._span_starts + self._inner_starts)
            return favoured, [self._bias] * len(favoured)
        # a value that begins like a span of the source; less, like a word inside one; never like a word of the
        # tool descriptions the user never said
        spans = self._string_tokens("", self._span_starts)
        inner = [t for t in self._string_tokens("", self._inner_starts) if t not in spans]
        tokens = [*spans, *inner, *self._unsaid]
        bias = [self._bias] * len(spans) + [self._inner_bias] * len(inner) + [-self._bias] * len(self._unsaid)
        return tokens, bias

    def _opener_logits(self, opener: str) -> tuple[list[int], list[float]]:
        """The tokens that write `opener` (the text opening a value: a quote, a space) together with the start of a
        span of the source, as the tokenizer itself would write them (` "/` for "/tmp/old.log")."""
        alone = self._first_token(opener)
        merged = {self._first_token(opener + self._text[at : at + 24]) for at in self._span_starts}
        favoured = sorted(t for t in merged if t is not None and t != alone)
        return favoured, [self._bias] * len(favoured)

    def _string_tokens(self, written: str, starts: Sequence[int]) -> list[int]:
        """The first tokens of what follows `written` where the source has it at one of `starts`, as long as that
        goes on with a word (or, for a value not yet begun, with anything)."""
        key = written.lower()
        found = set()
        for at in starts:
            if not self._lower.startswith(key, at):
                continue
            end = at + len(written)
            if end < len(self._text) and _goes_on(written, self._text[end], self._repair):
                token = self._first_token(self._text[end : end + 24])
                if token is not None:
                    found.add(token)
        return sorted(found)

    def _first_token(self, text: str) -> int | None:
        if text not in self._first:
            tokens = self._llama.tokenize(text.encode(), add_bos=False, special=False) if text else []
            self._first[text] = tokens[0] if tokens else None
        return self._first[text]


def _span_starts(text: str) -> list[int]:
    """Where a value copied from `text` may start: each run of non-space characters, past the quotes and brackets
    that open it ("/tmp/old.log", "$12", "@jane", "'Paris'"; not "tmp" inside "/tmp", nor "s" in "What's")."""
    starts = []
    for run in re.finditer(r"\S+", text):
        opening = len(run.group()) - len(run.group().lstrip("\"'`([{<"))
        if opening < len(run.group()):
            starts.append(run.start() + opening)
    return starts


def _goes_on(written: str, following: str, spans: bool) -> bool:
    """Whether copying `written` should go on with the source's next character: a value not yet begun with
    anything, a begun one only inside a word ("Pari" + "s", "/" + "tmp"; not "Paris" + ",", "New " + "York").
    Without `spans` (value repair off), as before: only letters and digits, and within a word."""
    if not spans:
        return following.isalnum() and (not written or written[-1].isalnum())
    if not written:
        return not following.isspace()
    return following.isalnum() and not written[-1].isspace()
