"""Token-level decoding for the embedded engine: one assistant turn on one llama.cpp context, in phases.

Free text runs without a grammar (a GBNF over free text roughly halves generation speed on a small model); only the
recipient choice and a call's argument JSON are decoded under a grammar. Even there the grammar is checked on the
token the sampler picks first and applied to the whole vocabulary only when that token is refused (the way
llama.cpp's own `common_sampler` does it), so constrained JSON costs little more than free text.

Every token of the turn is appended to the context as it is decoded, never re-evaluated: the prompt of the next turn
starts with this one, so llama.cpp only evaluates what is new. A `Llama` is not thread-safe; callers hold its lock.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import llama_cpp
import numpy as np

from functionary_agent.errors import ModelError
from functionary_agent.formats import CallGrammar, CallSpec, arguments_gbnf
from functionary_agent.formats.grammar import gbnf_literal
from functionary_agent.models._grounding import numbers_in

_MIN_LOOP_LINE = 12  # shorter lines (a closing brace, "Yes.") may well repeat on purpose
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
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


@dataclass(frozen=True)
class Sampling:
    """llama.cpp sampler settings; temperature 0 is greedy (the default: a 135M model is at its best greedy)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0


class _TokenArray:
    """A llama_token_data_array over a numpy view, refilled from logits without a Python loop."""

    def __init__(self, size: int) -> None:
        self._data = (llama_cpp.llama_token_data * size)()
        self.view = np.frombuffer(memoryview(self._data).cast("B"), dtype=_TOKEN_DATA)
        self._ids = np.arange(size, dtype=np.intc)
        self.array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p), size=size, selected=-1, sorted=False
        )
        self.pointer = ctypes.byref(self.array)

    def fill(self, logits: np.ndarray, ids: np.ndarray | None = None) -> None:
        size = len(logits)
        self.view["id"][:size] = self._ids[:size] if ids is None else ids
        self.view["logit"][:size] = logits
        self.view["p"][:size] = 0.0
        self.array.size, self.array.selected, self.array.sorted = size, -1, False

    def selected(self) -> int:
        return int(self.view["id"][self.array.selected])


class Sampler:
    """The sampling chain of one turn, plus the grammar of the current phase (if any).

    The grammar is checked on the chain's pick first; only a refused token makes it filter the whole vocabulary and
    the chain pick again. The result is always a token the grammar accepts.
    """

    def __init__(self, llama: Any, sampling: Sampling) -> None:
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._all = _TokenArray(llama.n_vocab())
        self._one = _TokenArray(1)
        self._chain = _chain(llama.n_vocab(), sampling)
        self._grammar: Any = None

    def use_grammar(self, gbnf: str | None) -> None:
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if gbnf is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
            if not grammar:
                raise ModelError("llama.cpp could not compile the call grammar (see its message above)")
            self._grammar = grammar

    def sample(self, logits: np.ndarray) -> int | None:
        """The next token, or None when the grammar allows no token at all."""
        self._all.fill(logits)
        llama_cpp.llama_sampler_apply(self._chain, self._all.pointer)
        token = self._all.selected()
        if self._grammar is None or self._allowed(token):
            return token
        self._all.fill(logits)
        llama_cpp.llama_sampler_apply(self._grammar, self._all.pointer)
        if not np.isfinite(self._all.view["logit"]).any():
            return None
        llama_cpp.llama_sampler_apply(self._chain, self._all.pointer)
        return self._all.selected()

    def _allowed(self, token: int) -> bool:
        self._one.fill(np.zeros(1, dtype=np.single), np.array([token], dtype=np.intc))
        llama_cpp.llama_sampler_apply(self._grammar, self._one.pointer)
        return bool(np.isfinite(self._one.view["logit"][0]))

    def accept(self, token: int, *, grammar: bool = True) -> None:
        llama_cpp.llama_sampler_accept(self._chain, token)
        if grammar and self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)

    def close(self) -> None:
        self.use_grammar(None)
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _chain(n_vocab: int, sampling: Sampling) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    steps = []
    if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
        steps.append(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, 64, sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty
            )
        )
    if sampling.temperature <= 0:
        steps.append(llama_cpp.llama_sampler_init_greedy())
    else:
        steps += [
            llama_cpp.llama_sampler_init_top_k(sampling.top_k),
            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1),
            llama_cpp.llama_sampler_init_temp(sampling.temperature),
            llama_cpp.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF),
        ]
    for step in steps:
        llama_cpp.llama_sampler_chain_add(chain, step)
    return chain


def choice_or_stop_gbnf(options: Sequence[str], may_stop: bool) -> str:
    """One of `options`; with `may_stop` also nothing, so the end-of-generation token is allowed at once."""
    body = " | ".join(gbnf_literal(option) for option in dict.fromkeys(options) if option)
    return f"root ::= ({body})?" if may_stop else f"root ::= {body}"


class Decoder:
    """One assistant turn: the prompt is already in `llama` (see `prefill`); phases append tokens to it.

    `emit` receives the generated text piece by piece, exactly as the format's parser must read it. Between `hold`
    and `release` the pieces wait, so that a call can be reviewed (and rewound with `rewind`) before anyone sees it.
    """

    def __init__(
        self,
        llama: Any,
        sampler: Sampler,
        *,
        pending: list[int],
        budget: int,
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> None:
        self.llama = llama
        self.sampler = sampler
        self.generated = 0
        self.exhausted = False
        self._pending = pending
        self._budget = budget
        self._sink = emit
        self._held: list[str] | None = None
        self._cancelled = cancelled
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._n_vocab = llama.n_vocab()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # -- tokens ----------------------------------------------------------------------------------------------------

    def _next(
        self, ban: np.ndarray | None = None, boost: Sequence[int] = (), bias: Sequence[float] = ()
    ) -> int | None:
        """The next sampled token (not yet part of the context); None at the budget, on cancel or a dead end.
        Tokens in `ban` are never chosen; `bias` is added to the logits of the tokens in `boost`."""
        if self.generated >= self._budget or self._cancelled():
            self.exhausted = True
            return None
        if self._pending:
            self.llama.eval(self._pending)
            self._pending = []
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, -1), shape=(self._n_vocab,))
        if (ban is not None and len(ban)) or boost:
            logits = logits.copy()
            if ban is not None:
                logits[ban] = -np.inf
            np.add.at(logits, list(boost), list(bias))
        return self.sampler.sample(logits)

    def _take(self, token: int, grammar: bool = True) -> str:
        """Append `token` to the context (evaluated lazily) and return its text."""
        self.sampler.accept(token, grammar=grammar)
        self._pending.append(token)
        self.generated += 1
        return self._utf8.decode(self.llama.detokenize([token], special=True))

    def _is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def force(self, text: str) -> None:
        """Write `text` as if the model had: where the protocol leaves no choice, sampling would only cost time."""
        for token in self.llama.tokenize(text.encode(), add_bos=False, special=True):
            self._take(token, grammar=False)
        self._emit(text)

    def mark(self) -> tuple[int, int]:
        """A checkpoint: the length of the token sequence, and the tokens generated so far."""
        return int(self.llama.n_tokens) + len(self._pending), self.generated

    def rewind(self, checkpoint: tuple[int, int]) -> None:
        """Back to `checkpoint`: later tokens leave the context (llama.cpp drops their cache cells at the next eval)
        and no longer count against the budget (the output will not hold them)."""
        mark, self.generated = checkpoint
        evaluated = int(self.llama.n_tokens)
        if mark > evaluated:
            self._pending = self._pending[: mark - evaluated]
        else:  # the last kept token is evaluated again, for fresh logits
            self._pending = [int(self.llama.input_ids[mark - 1])]
            self.llama.n_tokens = mark - 1

    # -- what the parser sees ---------------------------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if not text:
            return
        if self._held is not None:
            self._held.append(text)
        else:
            self._sink(text)

    def hold(self) -> None:
        self._held = []

    def held_text(self, start: int = 0) -> str:
        return "".join(self._held[start:]) if self._held is not None else ""

    def held_size(self) -> int:
        return len(self._held) if self._held is not None else 0

    def release(self, start: int | None = None, replacement: str = "") -> None:
        """Pass held text on; with `start`, the pieces from there on are replaced by `replacement`."""
        held, self._held = self._held or [], None
        if start is not None:
            held = [*held[:start], replacement]
        self._emit("".join(held))

    def discard(self) -> None:
        self._held = None

    # -- phases ----------------------------------------------------------------------------------------------------

    def choose(self, options: Sequence[str], may_stop: bool) -> str | None:
        """One of `options` (recipients, openers) under a grammar; None when the model stops instead."""
        if len(options) == 1 and not may_stop:
            self.force(options[0])
            return options[0]
        self.sampler.use_grammar(choice_or_stop_gbnf(options, may_stop))
        written = ""
        while (token := self._next()) is not None and not self._is_end(token):
            piece = self._take(token)
            written += piece
            self._emit(piece)
            if written in options and not any(o != written and o.startswith(written) for o in options):
                return written
        return written if written in options else None

    def preference(self, options: Sequence[str], other: str) -> float:
        """How much more likely the model starts one of `options` than `other` here: the log-probability of the
        best option's first token minus that of `other`'s first token."""
        if self._pending:
            self.llama.eval(self._pending)
            self._pending = []
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, -1), shape=(self._n_vocab,))

        def first(text: str) -> int:
            return int(self.llama.tokenize(text.encode(), add_bos=False, special=True)[0])

        return float(max(logits[first(option)] for option in options) - logits[first(other)])

    def json_arguments(self, gbnf: str, copy: CopyBias | None = None) -> bool:
        """Argument JSON under `gbnf`, up to the moment it is a complete value; False if it was cut short.
        With `copy`, tokens that copy a value from the conversation are favoured (see `CopyBias`)."""
        self.sampler.use_grammar(gbnf)
        written = ""
        values = _JsonValues()
        while True:
            closing = values.closing()
            if closing is not None and self._budget - self.generated <= len(closing):
                self.force(closing)  # out of tokens: end the JSON rather than cut it (it may miss a property)
                return _parses_as_json(written + closing)
            boost, bias = copy.logits(*values.current()) if copy is not None else ((), ())
            token = self._next(boost=boost, bias=bias)
            if token is None or self._is_end(token):
                break
            piece = self._take(token)
            values.feed(piece)
            written += piece
            self._emit(piece)
            if written.rstrip().endswith("}") and _parses_as_json(written):
                return True
        return _parses_as_json(written)

    def free_text(
        self, triggers: Sequence[str], stops: Sequence[str], prose: bool = False, after_result: bool = False
    ) -> str | None:
        """Unconstrained text up to the end of the turn (None) or a trigger, which is returned once written.
        With `prose` the first token may not echo the protocol (and, `after_result`, must open a sentence) and a
        repeated line ends the text."""
        sentence = prose and after_result
        self.sampler.use_grammar(_SENTENCE_START if sentence else None)
        ban = self._not_prose((*_NOT_PROSE, *(_LITERALS if sentence else ()))) if prose else None
        scan = _TextScan(triggers, stops, no_loops=prose)
        while (token := self._next(ban)) is not None and not self._is_end(token):
            if sentence:
                self.sampler.use_grammar(None)
                sentence = False
            ban = None
            start = len(scan.text)
            scan.add(self._take(token))
            found = scan.find()
            if found is None:
                self._emit(scan.release())
                continue
            position, marker = found
            self._emit(scan.text[scan.released : position])
            if marker not in triggers:  # a stop string, or a repeated line
                return None
            self._cut_last_token(scan.text[start : position + len(marker)])
            self._emit(marker)
            return marker
        self._emit(scan.text[scan.released :])
        return None

    def _not_prose(self, banned: Sequence[str]) -> np.ndarray:
        words = [*banned, *(f" {word}" for word in banned)]
        ids = {t[0] for w in words if len(t := self.llama.tokenize(w.encode(), add_bos=False, special=False)) == 1}
        return np.array(sorted(ids), dtype=np.intc)

    def _cut_last_token(self, keep: str) -> None:
        """The last token may run past a trigger: replace it by the tokens of the part up to the trigger's end, so
        the next phase continues from exactly the trigger."""
        last = self._pending.pop()
        if self.llama.detokenize([last], special=True).decode(errors="replace") == keep:
            self._pending.append(last)
        else:
            self._pending.extend(self.llama.tokenize(keep.encode(), add_bos=False, special=True))


class _TextScan:
    """Free text seen so far and how much of it is safe to pass on: not the start of a trigger or stop string, and,
    with `no_loops`, not a line that is so far a copy of an earlier one (a small model's loops end at the copy)."""

    def __init__(self, triggers: Sequence[str], stops: Sequence[str], no_loops: bool) -> None:
        self.markers = [m for m in (*triggers, *stops) if m]
        self._hold = max((len(m) for m in self.markers), default=1) - 1
        self._no_loops = no_loops
        self._lines: set[str] = set()
        self._line_start = 0
        self.text = ""
        self.released = 0

    def add(self, piece: str) -> None:
        self.text += piece

    def find(self) -> tuple[int, str] | None:
        """The earliest trigger or stop string, or ("", position) for a complete line that repeats an earlier one."""
        lo = max(0, self.released - self._hold)
        hits = [(at, m) for at, m in ((self.text.find(m, lo), m) for m in self.markers) if at >= 0]
        if hits:
            return min(hits)
        while self._no_loops and (newline := self.text.find("\n", self._line_start)) >= 0:
            line = self.text[self._line_start : newline].strip()
            if line in self._lines:
                return self._line_start, ""
            if len(line) >= _MIN_LOOP_LINE:
                self._lines.add(line)
            self._line_start = newline + 1
        return None

    def release(self) -> str:
        """The text that can no longer become a marker or a repeated line."""
        end = len(self.text)
        for cut in range(min(self._hold, end), 0, -1):
            if any(m.startswith(self.text[end - cut :]) for m in self.markers):
                end -= cut
                break
        line = self.text[self._line_start : end].strip()
        if self._no_loops and line and any(seen.startswith(line) for seen in self._lines):
            end = min(end, self._line_start)
        piece, self.released = self.text[self.released : end], max(self.released, end)
        return piece


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


class CopyBias:
    """Favours argument values copied from the conversation (`source`: the user's, system and tool messages).

    A small model fills arguments from its prior (the example in a description, a round number). Adding `bias` to the
    logits of the tokens that begin a word of the source (at the start of a string value) or finish a word or number
    of the source that the value has begun makes it copy what the user said instead; a string that would begin like
    a name or a quoted example of the tool descriptions (`examples`) that the conversation never used gets `bias`
    taken off. Where the
    value already is a whole word or number of the source, nothing is favoured: going on is the model's call.
    """

    def __init__(self, llama: Any, source: str, bias: float, examples: str = "") -> None:
        self._llama = llama
        self._bias = bias
        self._text = source
        self._lower = source.lower()
        self._word_starts = [m.start() for m in re.finditer(r"(?<![\w])\w", source)]
        self._numbers = numbers_in(source)
        self._first: dict[str, int | None] = {}
        known = set(re.findall(r"\w+", self._lower))
        named = re.findall(r"\b[A-Z]\w{2,}", examples) + re.findall(r"[\"']([^\"'\n]{3,40})[\"']", examples)
        unsaid = {word for word in named if word.lower() not in known}
        starts = {t for t in map(self._first_token, unsaid) if t is not None}
        self._unsaid = sorted(starts - set(self._string_tokens("")))

    def logits(self, kind: str, written: str) -> tuple[list[int], list[float]]:
        """The tokens to favour (or, with a negative value, disfavour) next, and by how much."""
        if kind == "string":
            favoured = self._string_tokens(written)
            if not written:  # a value that begins like a word of the tool descriptions the user never said
                return [*favoured, *self._unsaid], [self._bias] * len(favoured) + [-self._bias] * len(self._unsaid)
            return favoured, [self._bias] * len(favoured)
        if kind == "start":  # a number begins like one the conversation states (the grammar says if one fits)
            favoured = sorted({t for t in map(self._first_token, self._numbers) if t is not None})
            return favoured, [self._bias] * len(favoured)
        if kind == "number" and written not in self._numbers:
            rests = {number[len(written) :] for number in self._numbers if number.startswith(written)}
            favoured = sorted(t for t in map(self._first_token, rests) if t is not None)
            return favoured, [self._bias] * len(favoured)
        return [], []

    def _string_tokens(self, written: str) -> list[int]:
        key = written.lower()
        found = set()
        for at in self._word_starts:
            if not self._lower.startswith(key, at):
                continue
            end = at + len(written)
            inside_word = end < len(self._text) and self._text[end].isalnum() and (not written or written[-1].isalnum())
            if inside_word:
                token = self._first_token(self._text[end : end + 24])
                if token is not None:
                    found.add(token)
        return sorted(found)

    def _first_token(self, text: str) -> int | None:
        if text not in self._first:
            tokens = self._llama.tokenize(text.encode(), add_bos=False, special=False) if text else []
            self._first[text] = tokens[0] if tokens else None
        return self._first[text]


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


CallReview = Callable[[CallSpec, str, bool], "str | None"]


@dataclass(frozen=True)
class TurnPlan:
    """What one request allows: the format's call grammar plus our limits, and the review of each call (given the
    call, its argument JSON and whether text may replace it, it returns the arguments to send, or None: no call)."""

    grammar: CallGrammar
    triggers: tuple[str, ...]
    stops: tuple[str, ...]
    max_calls: int | None
    max_items: int
    max_length: int
    review: CallReview
    prose: bool = False  # steer text segments (see `Decoder.free_text`); for small models that misread the format
    after_result: bool = False  # the conversation ends with a tool result (see `Decoder.free_text`)
    calls_first: bool = False  # where text or a call may come first, try the best call first (the review decides)
    candidates: frozenset[str] | None = None  # with calls_first: the tools that call may be to (None: any)
    # with calls_first and no candidate: how much more likely (log-probability of the first token) the model must
    # find a call than text for a call to any tool to be tried; None: text then
    strong_call: float | None = None
    # given a call just made (name, arguments), the arguments of a further call of the same tool, or None
    further: Callable[[str, str], str | None] | None = None
    copy_source: str = ""  # the conversation's text, for `CopyBias`
    copy_bias: float = 0.0
    copy_examples: str = ""  # the tool descriptions, for `CopyBias`

    def arguments_grammar(self, spec: CallSpec) -> str:
        parameters = _nonempty_required_strings(spec.parameters)
        return arguments_gbnf(replace(spec, parameters=parameters), max_items=self.max_items,
                              max_length=self.max_length, closed_objects=True)


def _nonempty_required_strings(schema: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A required free string may not be empty: "" is a small model's way of not knowing, never a useful value."""
    if not schema or not isinstance(schema.get("properties"), Mapping):
        return schema
    properties = dict(schema["properties"])
    for name in schema.get("required") or ():
        prop = properties.get(name)
        if not isinstance(prop, Mapping) or any(k in prop for k in ("enum", "const", "pattern", "minLength")):
            continue
        if prop.get("type") == "string":
            properties[name] = {**prop, "minLength": 1}
    return {**schema, "properties": properties}


def run_turn(decoder: Decoder, plan: TurnPlan) -> None:
    """The decode loop of `functionary_agent.formats.grammar`: choose an opener, decode its text or call, repeat.
    A JSON call the review rejects is rewound and replaced by free text, where the protocol allows text."""
    grammar = plan.grammar
    openers: Mapping[str, CallSpec | None] = grammar.first_openers()
    calls, may_stop, first = 0, False, plan.calls_first
    while openers:
        mark = decoder.mark()
        decoder.hold()
        target = _open(decoder, _first_openers(decoder, plan, openers) if first else openers, may_stop)
        first = False
        if target is _STOP:
            decoder.release()
            return
        if isinstance(target, CallSpec) and target.parameters is not None:
            outcome = _json_call(decoder, plan, target, _text_opener(openers))
            if outcome is _STOP:
                return
            if outcome is not _REJECTED:
                made = _further_calls(decoder, plan, target, outcome, calls + 1)
                if made > calls + 1 or (plan.max_calls is not None and made >= plan.max_calls):
                    return  # the limit, or a list the further calls have covered: the turn is complete
                calls = made
                openers, may_stop = grammar.openers(), calls >= grammar.min_calls
                continue
            decoder.discard()
            decoder.rewind(mark)
            decoder.force(_text_opener(openers) or "")
            target = None
        decoder.release()
        prose = plan.prose and target is None
        marker = decoder.free_text(plan.triggers, plan.stops, prose, plan.after_result)  # text or raw code
        calls += target is not None
        if marker is None or (plan.max_calls is not None and calls >= plan.max_calls):
            return
        openers, may_stop = grammar.continuations(marker), False


_STOP: Any = object()
_REJECTED: Any = object()


def _further_calls(decoder: Decoder, plan: TurnPlan, spec: CallSpec, arguments: str, calls: int) -> int:
    """Steering: after a call, the further calls of the same tool that `plan.further` derives (the other values
    the user listed), written as the model would write them. Returns the number of calls made so far."""
    openers = plan.grammar.openers().items()
    opener = next((o for o, target in openers if target is not None and target.name == spec.name), None)
    while plan.further is not None and opener is not None and (plan.max_calls is None or calls < plan.max_calls):
        following = plan.further(spec.name, arguments)
        if following is None:
            break
        decoder.force(opener + following + spec.end)
        arguments, calls = following, calls + 1
    return calls


def _open(decoder: Decoder, openers: Mapping[str, CallSpec | None], may_stop: bool) -> Any:
    """The segment the model opens next (a CallSpec, or None for text), or _STOP."""
    if "" in openers:
        return openers[""]
    chosen = decoder.choose(list(openers), may_stop)
    return _STOP if chosen is None else openers[chosen]


def _first_openers(decoder: Decoder, plan: TurnPlan, openers: Mapping[str, CallSpec | None]) -> Any:
    """Calls first: to the candidate tools, or to any tool when none is a candidate but the model strongly prefers
    a call to text at this point."""
    candidates, text = plan.candidates, _text_opener(openers)
    if candidates is None or plan.strong_call is None or text is None:
        return _calls_first(openers, candidates)
    calls = [opener for opener, target in openers.items() if target is not None and target.parameters is not None]
    named = any(target is not None and target.name in candidates for target in openers.values())
    if calls and not named and decoder.preference(calls, text) >= plan.strong_call:
        candidates = None
    return _calls_first(openers, candidates)


def _calls_first(
    openers: Mapping[str, CallSpec | None], candidates: frozenset[str] | None
) -> Mapping[str, CallSpec | None]:
    """Where text is among `openers`: the JSON calls to the candidate tools (the review falls back to text), or
    text alone when no candidate is there."""
    text = _text_opener(openers)
    if text is None:
        return openers
    json_calls = {k: v for k, v in openers.items() if v is not None and v.parameters is not None}
    chosen = {k: v for k, v in json_calls.items() if candidates is None or (v is not None and v.name in candidates)}
    if chosen:
        return chosen
    return {text: None} if json_calls and candidates is not None else openers


def _text_opener(openers: Mapping[str, CallSpec | None]) -> str | None:
    return next((opener for opener, target in openers.items() if target is None), None)


def _json_call(decoder: Decoder, plan: TurnPlan, spec: CallSpec, text_opener: str | None) -> Any:
    """Decode one call's arguments and let the review keep, tidy or reject them; returns the arguments kept."""
    start = decoder.held_size()
    copy = CopyBias(decoder.llama, plan.copy_source, plan.copy_bias, plan.copy_examples) if plan.copy_bias else None
    if not decoder.json_arguments(plan.arguments_grammar(spec), copy):
        decoder.release()
        return _STOP
    arguments = plan.review(spec, decoder.held_text(start), text_opener is not None)
    if arguments is None:
        return _REJECTED
    decoder.release(start, arguments)
    if spec.end:
        decoder.force(spec.end)
    return arguments


def prefill(llama: Any, tokens: Sequence[int]) -> tuple[list[int], int]:
    """Point the context at `tokens`, keeping the longest prefix it already holds. Returns the tokens still to be
    evaluated (at least one: sampling needs fresh logits) and how many were reused."""
    held = llama.input_ids[: llama.n_tokens]
    size = min(len(held), len(tokens) - 1)
    differ = np.flatnonzero(held[:size] != np.asarray(tokens[:size], dtype=held.dtype))
    reused = int(differ[0]) if len(differ) else size
    llama.n_tokens = reused
    return list(tokens[reused:]), reused
