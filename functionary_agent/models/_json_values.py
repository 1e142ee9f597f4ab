"""Argument JSON as it is decoded: where a value starts and ends (`_JsonValues`), token healing at a value's opening
quote (`_Healing`, over the vocabulary's token texts, `_Vocabulary`), and where a value starts to loop (`_ValueLoops`,
the free text's cycle detector applied to one value at a time)."""


from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Sequence
from copy import copy as shallow_copy
from typing import TYPE_CHECKING, Any

import numpy as np

from functionary_agent.models._text_scan import _Cycles, _repeats_needed

if TYPE_CHECKING:
    from functionary_agent.models._llama_decode import Decoder, ValueBias

logger = logging.getLogger(__name__)

# Token healing of argument values (`_Healing`) and enum values named by a synonym (`_steering.named_enum_values`)
# are on unless this is "0": a private switch for measuring them (benchmarks/embedded_values.py)
VALUE_REPAIR_SWITCH = "FUNCTIONARY_AGENT_VALUE_REPAIR"
_HEALING_REACH = 6.0  # healing looks ahead only where a longer token's logit is within this of the picked one's
_LOOK_AHEAD = 256  # the tokens its look-ahead weighs (nearly all the probability; the grammar checks each)


def value_repair() -> bool:
    """Whether argument values are repaired (see VALUE_REPAIR_SWITCH)."""
    return os.environ.get(VALUE_REPAIR_SWITCH, "1") != "0"



class _JsonValues:
    """Where JSON text stands, character by character: inside a string value, a number, or before a value."""

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._expect = False  # a value may start here
        self._string: bool | None = None  # inside a string: True for a value, False for a key
        self._escape = False
        self._number = False
        self._value = ""
        self._last = ""  # the last structural character
        self.keys = 0  # the keys begun so far
        self.key_depth = 0  # how deep in arrays and objects the last key is

    @property
    def in_key(self) -> bool:
        return self._string is False

    def closing_to(self, depth: int) -> str | None:
        """The shortest text that ends the value written at nesting `depth` (its string, then the arrays and objects
        opened in it), or None where that takes a guess (in a key, after a comma or colon, in an escape or a number
        that cannot end yet) or the value has ended already."""
        if self._string is False or self._escape or len(self._stack) < depth:
            return None
        if self._number and not self._value[-1:].isdigit():
            return None
        if not self._string and not self._number and self._last in ",:":
            return None
        closers = "".join("]" if kind == "[" else "}" for kind in reversed(self._stack[depth:]))
        return ('"' if self._string else "") + closers

    def restore(self, state: _JsonValues) -> None:
        """Stand where `state` stands (a state `after` gave)."""
        self.__dict__.update(state.after("").__dict__)

    def closing(self) -> str | None:
        """The shortest text that ends the JSON here, or None where that takes a guess (inside a key)."""
        if self._string is False or self._escape or self._last == "," or not self._stack:
            return None
        if self._number and not self._value[-1:].isdigit():
            return None
        text = '"' if self._string else ""
        if self._expect and self._last == ":":
            text += "null"
        return text + "".join("]" if kind == "[" else "}" for kind in reversed(self._stack))

    def current(self) -> tuple[str, str]:
        """("string" | "number", the value so far), ("start", "") before a value, or ("", "") elsewhere."""
        if self._string:
            return "string", self._value
        if self._number:
            return "number", self._value
        return ("start", "") if self._expect and self._string is None else ("", "")

    def after(self, piece: str) -> _JsonValues:
        """Where the JSON would stand after `piece` (this one does not move)."""
        probe = shallow_copy(self)
        probe._stack = list(self._stack)
        probe.feed(piece)
        return probe

    def feed(self, piece: str) -> None:
        for char in piece:
            if self._string is not None:
                self._in_string(char)
            elif self._number and char in "0123456789.eE+-":
                self._value += char
            else:
                self._number = False
                self._structure(char)

    def _in_string(self, char: str) -> None:
        if self._escape:
            self._escape = False
            self._value += char
        elif char == "\\":
            self._escape = True
        elif char == '"':
            self._string, self._expect = None, False
        else:
            self._value += char

    def _structure(self, char: str) -> None:
        if not char.isspace():
            self._last = char
        if char == '"':
            self._string, self._value = self._expect, ""
            if not self._expect:
                self.keys, self.key_depth = self.keys + 1, len(self._stack)
        elif char in "-0123456789" and self._expect:
            self._number, self._value, self._expect = True, char, False
        elif char in "{[":
            self._stack.append(char)
            self._expect = char == "["
        elif char == ":":
            self._expect = True
        elif char == ",":
            self._expect = bool(self._stack) and self._stack[-1] == "["
        elif char in "}]":
            if self._stack:
                self._stack.pop()
            self._expect = False


# How many times in a row a period must appear in an argument value to be a loop (see `_text_scan._repeats_needed`,
# the rule of free text): a value repeats less on purpose than prose, and what it repeats tends to be short, so short
# periods need more repeats: a folder name in a path ("src/src/src/") 6, one token 16 with letters ("ffff" in a hex
# string, "ha"), 48 without (a float's digits, an address of zeros); a sentence 3 and a row of signs 16, as in text
_VALUE_SHORT_REPEATS = 6
_VALUE_TOKEN_REPEATS = 16
_VALUE_SYMBOL_REPEATS = 48


def _value_repeats_needed(period: str, tokens: int) -> int:
    """How many times in a row a period of `tokens` tokens spelling `period` must appear in a value to be a loop."""
    if tokens == 1:
        return _VALUE_TOKEN_REPEATS if any(char.isalpha() for char in period) else _VALUE_SYMBOL_REPEATS
    needed = _repeats_needed(period, tokens)
    return _VALUE_SHORT_REPEATS if needed == 4 else needed


def _value_end_rank(text: str, at: int) -> int:
    """How good a place to end a looping value's JSON text `text` at offset `at` is: 0 where the text goes on with
    a separator, an escape such as a line end or the string's own end ("3 * 3 = 9|, 3 * 3 = 9", "LIMA|\\nLIMA",
    '"Tuesday|", "Monday"'), 1 between words ("the realm of| the realm of"), else 2."""
    before, after = text[at - 1 : at], text[at : at + 1]
    if not before or before.isspace() or before in ",;":
        return 2
    return 0 if after in (",", ";", "\\", '"') else 1 if after.isspace() else 2


class _ValueLoops:
    """Loops in argument values: the cycle detector of free text (`_text_scan._Cycles`) over the tokens of one value
    at a time, a value being what follows a key up to the next key (a string, a number, an array of them; in an
    array of objects every item's keys start afresh, so repeated items are not its business). Once a value loops,
    `add` says where it is to end: at a token boundary in the loop's first occurrence, or at its end, where the JSON
    can be closed (the value's string, then the arrays and objects opened in it) and the text ends best (before a
    separator, a line end or the string's own end, else between words; the latest such place)."""

    def __init__(self) -> None:
        self._cycles: _Cycles | None = None
        self._keys = -1
        self._in_key = False  # the last token ended in a key
        self._depth = 0  # the nesting of the value's key: the value is closed down to it
        self._first = 0  # the index of the value's first token among the call's tokens
        self._states: list[_JsonValues] = []  # where the JSON stands after each token of the value
        self._ends: list[int] = []  # where each token of the value ends in its text
        self._text = ""
        self.period = ""  # the text repeated and how many times, once a value loops
        self.repeats = 0

    def add(self, index: int, token: int, piece: str, values: _JsonValues) -> tuple[int, str] | None:
        """Token `index` of the call, its text `piece`, after which the JSON stands at `values`. Returns, once the
        value loops, the index of the first token to drop and the text that closes the value there."""
        key, self._in_key = values.keys != self._keys or values.in_key or self._in_key, values.in_key
        if key:  # a token of a key: the value starts after it
            self._keys, self._depth, self._cycles = values.keys, values.key_depth, None
            return None
        if self._cycles is None:
            self._cycles = _Cycles(needed=_value_repeats_needed)
            self._first, self._states, self._ends, self._text = index, [], [], ""
        self._text += piece
        self._ends.append(len(self._text))
        self._states.append(values.after(""))
        if self._cycles.add(token, piece) is None:
            return None
        loop, self._cycles = self._cycles, None  # found: the next token starts afresh, whatever happens here
        kept = self._end(loop.copies_from, loop.size)
        if kept is None:
            return None
        closing = self._states[kept - 1].closing_to(self._depth)
        if closing is None:  # never: `_end` chose a place where the value can be closed
            return None
        self.period, self.repeats = loop.period, loop.repeats
        return self._first + kept, closing

    def _text_of(self, index: int) -> bool:
        """Whether the value's token `index` has text of its own (not only the first bytes of a character)."""
        return self._ends[index] > (self._ends[index - 1] if index else 0)

    def _end(self, copies_from: int, size: int) -> int | None:
        """How many of the value's tokens to keep: from the first occurrence's second token to its end (where the
        copies begin), the best place to close the value (see the class); None where there is none."""
        places = [kept for kept in range(copies_from, max(copies_from - size, 0), -1)
                  if _closable(self._states[kept - 1], self._depth) and self._text_of(kept - 1)]
        if not places:
            return None
        kept = min(places, key=lambda kept: _value_end_rank(self._text, self._ends[kept - 1]))
        return self._before_repeated_items(kept, size) or kept

    def _before_repeated_items(self, kept: int, size: int) -> int | None:
        """In an array whose loop's first occurrence only repeats items written before it (["I", "V", "vi", "IV",
        "V", "I", "V", "I", ...]), where the array ends before the items it repeats (they are there already; so
        steering keeps an array that runs to its maximum: each item once); None elsewhere."""
        items, found = self._items(kept), None
        for earlier in range(kept - 1, max(kept - size - 1, 0), -1):
            before = self._items(earlier) if _closable(self._states[earlier - 1], self._depth) else None
            if not before or items is None or len(before) >= len(items) or items[: len(before)] != before:
                continue  # no array, or not between its items
            if not all(item in before for item in items[len(before) :]):
                break
            found = earlier
        return found

    def _items(self, kept: int) -> list[Any] | None:
        """The value's array as it stands after its first `kept` tokens, closed there; None if it is no array."""
        closing = self._states[kept - 1].closing_to(self._depth) or ""
        try:
            value = json.loads(self._text[: self._ends[kept - 1]] + closing)
        except ValueError:
            return None
        return value if isinstance(value, list) else None


def _closable(values: _JsonValues, depth: int) -> bool:
    """Whether a looping value may end where the JSON stands at `values`: it can be closed there, and not in a
    string only just opened (an item "" is nobody's value)."""
    return values.closing_to(depth) is not None and values.current() != ("string", "")


class _Healing:
    """Token healing where a value starts (the technique of llama.cpp's examples and guidance, here inside the JSON
    grammar).

    SmolLM2's tokenizer merges a quote with the punctuation after it (` "/`, ` "$`, ` "#`, ` ".`, ` "-`), so its
    training wrote "/tmp/old.log" as ` "/` + `tmp`...; after the bare quote ` "` the model is at a token boundary it
    never saw before a "/", and writes "tmp/old.log". So where the picked token opens a value (a bare quote, or only
    space) and longer tokens start with its text, the choice is made again among them, as a choice of the value's
    first character: a longer token weighs its own logit, the picked one its logit plus the log-probability of the
    likeliest first character after it (one token of look-ahead, under the grammar). The copy bias (`ValueBias`)
    favours merged tokens that begin a span of the conversation, and the look-ahead sees it too. Longer tokens that
    go on with a closing or separating character or a quote (` ",`, ` ")`, ` ""`) are left out: in the text the
    model learnt from they end a value, they do not start one.
    """

    def __init__(self, decoder: Decoder, values: _JsonValues, copy: ValueBias | None) -> None:
        self._decoder = decoder
        self._values = values
        self._copy = copy
        self._vocabulary = _Vocabulary.of(decoder.llama)

    def token(self, picked: int, boost: Sequence[int], bias: Sequence[float]) -> int:
        """`picked`, or the longer token that replaces it; `boost` and `bias` are the logit changes it was picked
        with."""
        opener = self._vocabulary.texts[picked]
        after = self._values.after(opener)
        longer = self._vocabulary.openings(opener) if _opens_value(self._values, opener, after) else None
        if longer is None or not len(longer):
            return picked
        logits = self._decoder.logits()
        np.add.at(logits, list(boost), list(bias))
        if self._copy is not None:
            merged, extra = self._copy.logits("opener", opener)
            np.add.at(logits, list(merged), list(extra))
        if logits[longer].max() < logits[picked] - _HEALING_REACH:
            return picked
        choices = np.full_like(logits, -np.inf)
        choices[longer] = logits[longer]
        choices[picked] = logits[picked] + self._first_character(picked, after)
        chosen = self._decoder.sampler.sample(choices)
        return picked if chosen is None else chosen

    def _first_character(self, picked: int, after: _JsonValues) -> float:
        """The log-probability of the likeliest first character after `picked`, under the grammar and the copy
        bias (over the likeliest `_LOOK_AHEAD` tokens: the grammar is slow on the whole vocabulary)."""
        logits = self._decoder.logits_after(picked)
        if self._copy is not None:
            boost, bias = self._copy.logits(*after.current())
            np.add.at(logits, list(boost), list(bias))
        ids = np.argpartition(logits, -_LOOK_AHEAD)[-_LOOK_AHEAD:].astype(np.intc)
        allowed = self._decoder.sampler.refused_after(picked, ids, logits[ids])
        return self._vocabulary.likeliest_first_character(ids, allowed)


def _opens_value(before: _JsonValues, opener: str, after: _JsonValues) -> bool:
    """`opener` opens a string value and writes none of it, or is only space where a value starts."""
    if after.current() == ("string", ""):
        return before.current()[0] != "string"
    return before.current() == ("start", "") and opener.isspace()


class _Vocabulary:
    """Every token's text, and its first character as a group number (for token healing); built once per model."""

    @classmethod
    def of(cls, llama: Any) -> _Vocabulary:
        found = _VOCABULARIES.get(llama)
        if found is None:
            found = _VOCABULARIES[llama] = cls(llama)
        return found

    def __init__(self, llama: Any) -> None:
        pieces = (llama.detokenize([token], special=False) for token in range(llama.n_vocab()))
        self.texts = [piece.decode("utf-8", errors="replace") for piece in pieces]
        firsts, self._group = np.unique([text[:1] for text in self.texts], return_inverse=True)
        self._groups = len(firsts)
        self._has_text = np.array([bool(text) for text in self.texts])
        self._longer: dict[str, np.ndarray] = {}
        self._by_text: dict[str, int] | None = None

    def token_of(self, text: str) -> int | None:
        """A token whose text is exactly `text`, if there is one."""
        if self._by_text is None:
            self._by_text = {}
            for token, piece in enumerate(self.texts):
                self._by_text.setdefault(piece, token)
        return self._by_text.get(text)

    def openings(self, prefix: str) -> np.ndarray:
        """The tokens whose text is `prefix` and more, where the more has no quote and does not start with a
        closing or separating character (see `_Healing`)."""
        if prefix not in self._longer:
            found = [
                token
                for token, text in enumerate(self.texts)
                if text.startswith(prefix) and text != prefix and _may_open(text[len(prefix) :])
            ]
            self._longer[prefix] = np.array(found, dtype=np.intc)
        return self._longer[prefix]

    def likeliest_first_character(self, ids: np.ndarray, allowed: np.ndarray) -> float:
        """The log-probability that the next token's text starts with its likeliest first character, among the
        tokens `ids` whose `allowed` logits are finite (the probabilities of those that start with each character,
        summed); -inf where none may come."""
        usable = np.isfinite(allowed) & self._has_text[ids]
        if not usable.any():
            return float("-inf")
        weights = np.exp(allowed[usable] - allowed[usable].max())
        mass = np.bincount(self._group[ids[usable]], weights=weights, minlength=self._groups)
        return float(np.log(mass.max() / weights.sum()))


_VOCABULARIES: weakref.WeakKeyDictionary[Any, _Vocabulary] = weakref.WeakKeyDictionary()


def _may_open(text: str) -> bool:
    """Whether a value may start with `text`, as far as token healing goes."""
    return '"' not in text and text[:1] not in ",;:!?)]}>"


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
