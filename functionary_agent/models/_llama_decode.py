"""Token-level decoding for the embedded engine, what any GGUF model needs: a sampler, and a decoder whose phases
(a choice of opener, argument JSON, free text) append to one llama.cpp context. The turn loop is `_turn`; the
small-model policy (copy bias, relevance, review, how text may open) is `_steering`, and reaches the decoder only
as arguments (a `ValueBias`, words a text may not open with).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import llama_cpp
import numpy as np

from functionary_agent.errors import ModelError
from functionary_agent.formats.grammar import gbnf_literal

_MIN_LOOP_LINE = 12  # shorter lines (a closing brace, "Yes.") may well repeat on purpose
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


class ValueBias(Protocol):
    """Logit changes while an argument value is written: given the kind of value ("string", "number", "start" before
    a value, "" elsewhere) and its text so far, the tokens to change and by how much. Steering supplies one."""

    def logits(self, kind: str, written: str) -> tuple[list[int], list[float]]: ...


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

    def json_arguments(self, gbnf: str, copy: ValueBias | None = None) -> bool:
        """Argument JSON under `gbnf`, up to the moment it is a complete value; False if it was cut short.
        `copy` changes logits as values are written (steering's copy bias, for small models)."""
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
        self,
        triggers: Sequence[str],
        stops: Sequence[str],
        *,
        opening_ban: Sequence[str] = (),
        opening_grammar: str | None = None,
        no_loops: bool = False,
    ) -> str | None:
        """Unconstrained text up to the end of the turn (None) or a trigger, which is returned once written.
        The first token is none of the words in `opening_ban` and follows `opening_grammar` (GBNF), if given;
        with `no_loops` a repeated line ends the text."""
        self.sampler.use_grammar(opening_grammar)
        ban = self._single_tokens(opening_ban) if opening_ban else None
        scan = _TextScan(triggers, stops, no_loops=no_loops)
        while (token := self._next(ban)) is not None and not self._is_end(token):
            if opening_grammar is not None:
                self.sampler.use_grammar(None)
                opening_grammar = None
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

    def _single_tokens(self, banned: Sequence[str]) -> np.ndarray:
        """The tokens that spell one of `banned` (or it after a space) on their own."""
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


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def prefill(llama: Any, tokens: Sequence[int]) -> tuple[list[int], int]:
    """Point the context at `tokens`, keeping the longest prefix it already holds. Returns the tokens still to be
    evaluated (at least one: sampling needs fresh logits) and how many were reused."""
    held = llama.input_ids[: llama.n_tokens]
    size = min(len(held), len(tokens) - 1)
    differ = np.flatnonzero(held[:size] != np.asarray(tokens[:size], dtype=held.dtype))
    reused = int(differ[0]) if len(differ) else size
    llama.n_tokens = reused
    return list(tokens[reused:]), reused
