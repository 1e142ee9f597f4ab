"""Argument JSON as it is decoded: where a value starts and ends (`_JsonValues`), and token healing at a value's
opening quote (`_Healing`, over the vocabulary's token texts, `_Vocabulary`)."""


from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Sequence
from copy import copy as shallow_copy
from typing import TYPE_CHECKING, Any

import numpy as np

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
