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
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from copy import copy as shallow_copy
from dataclasses import dataclass
from typing import Any, Protocol

import llama_cpp
import numpy as np

from functionary_agent.errors import ModelError
from functionary_agent.formats.grammar import gbnf_literal

_MIN_LOOP_LINE = 12  # shorter lines (a closing brace, "Yes.") may well repeat on purpose
# The cycle detector (`_Cycles`): the longest period it looks for, in tokens (a short paragraph), and the length in
# characters from which a period counts as a sentence or a line, a loop once it appears 3 times in a row
_MAX_CYCLE = 128
_LONG_CYCLE = 24
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)

logger = logging.getLogger(__name__)

# Token healing of argument values (`_Healing`) and enum values named by a synonym (`_steering.named_enum_values`)
# are on unless this is "0": a private switch for measuring them (benchmarks/embedded_values.py)
VALUE_REPAIR_SWITCH = "FUNCTIONARY_AGENT_VALUE_REPAIR"
_HEALING_REACH = 6.0  # healing looks ahead only where a longer token's logit is within this of the picked one's
_LOOK_AHEAD = 256  # the tokens its look-ahead weighs (nearly all the probability; the grammar checks each)


def value_repair() -> bool:
    """Whether argument values are repaired (see VALUE_REPAIR_SWITCH)."""
    return os.environ.get(VALUE_REPAIR_SWITCH, "1") != "0"


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

    def refused_after(self, token: int, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` (those of the tokens `ids`) with -inf for the tokens the grammar would refuse if
        `token` came next (a clone of the grammar takes `token`; the grammar itself does not move)."""
        if self._grammar is None:
            return logits.copy()
        probe = llama_cpp.llama_sampler_clone(self._grammar)
        try:
            llama_cpp.llama_sampler_accept(probe, token)
            self._all.fill(logits, ids)
            llama_cpp.llama_sampler_apply(probe, self._all.pointer)
            return np.array(self._all.view["logit"][: len(logits)])
        finally:
            llama_cpp.llama_sampler_free(probe)

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
    a value, "" elsewhere) and its text so far, the tokens to change and by how much. Steering supplies one.
    Token healing also asks with kind "opener" and the text that opens a value (` "`): the tokens that write that
    text and more at once (` "/`) to change."""

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
        self.repetition = False  # free text was cut where the model began to repeat itself
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

    def logits(self) -> np.ndarray:
        """A copy of the logits of the next token (what is pending is evaluated first)."""
        if self._pending:
            self.llama.eval(self._pending)
            self._pending = []
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, -1), shape=(self._n_vocab,)).copy()

    def logits_after(self, token: int) -> np.ndarray:
        """The logits of the token after `token`, as if `token` came next; the context is left as it was (the last
        token waits to be evaluated again, with whatever comes next, in one batch)."""
        self.logits()
        size = int(self.llama.n_tokens)
        self.llama.eval([token])
        after = self.logits()
        self.llama.n_tokens = size - 1
        self._pending = [int(self.llama.input_ids[size - 1])]
        return after

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
        `copy` changes logits as values are written (steering's copy bias, for small models). Where a token opens
        a value, token healing (`_Healing`) may replace it by one that merges the opening with what follows."""
        self.sampler.use_grammar(gbnf)
        written = ""
        values = _JsonValues()
        healing = _Healing(self, values, copy) if value_repair() else None
        while True:
            closing = values.closing()
            if closing is not None and self._budget - self.generated <= len(closing):
                self.force(closing)  # out of tokens: end the JSON rather than cut it (it may miss a property)
                return _parses_as_json(written + closing)
            boost, bias = copy.logits(*values.current()) if copy is not None else ((), ())
            token = self._next(boost=boost, bias=bias)
            if token is None or self._is_end(token):
                break
            if healing is not None:
                token = healing.token(token, boost, bias)
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
        cycles: bool = False,
        stop_after: Callable[[str], int | None] | None = None,
    ) -> str | None:
        """Unconstrained text up to the end of the turn (None) or a trigger, which is returned once written.
        The first token is none of the words in `opening_ban` and follows `opening_grammar` (GBNF), if given;
        with `no_loops` a repeated line ends the text, with `cycles` a run of repeated tokens (`_Cycles`) does,
        after its first occurrence; either sets `repetition`. With `stop_after` (given the text up to the end of
        its last complete line, the offset where the text ends, or None) text is passed on in whole lines only, and
        the text ends where `stop_after` says (None: the end of the turn); a line the text ends with is complete."""
        self.sampler.use_grammar(opening_grammar)
        ban = self._single_tokens(opening_ban) if opening_ban else None
        scan = _TextScan(triggers, stops, no_loops=no_loops, cycles=cycles)
        sent = 0  # the text is passed on up to here
        while (token := self._next(ban)) is not None and not self._is_end(token):
            if opening_grammar is not None:
                self.sampler.use_grammar(None)
                opening_grammar = None
            ban = None
            start = len(scan.text)
            scan.add(self._take(token), token)
            found = scan.find()
            if found is None:
                if (end := _lines_end(stop_after, scan.text)) is not None:
                    self._emit(scan.text[sent:end])
                    return None
                sent = self._pass_on(scan, sent, whole_lines=stop_after is not None)
                continue
            position, marker = found
            self._emit(scan.text[sent : _lines_end(stop_after, scan.text[:position], final=True, default=position)])
            if not marker:
                self._note_repetition(scan)
            if marker not in triggers:  # a stop string, or a repetition
                return None
            self._cut_last_token(scan.text[start : position + len(marker)])
            self._emit(marker)
            return marker
        self._emit(scan.text[sent : _lines_end(stop_after, scan.text, final=True, default=len(scan.text))])
        return None

    def _pass_on(self, scan: _TextScan, sent: int, *, whole_lines: bool) -> int:
        """Emit what `scan` lets through from `sent` on (with `whole_lines`, up to the last complete line only);
        returns the offset the text is passed on to."""
        scan.release()
        end = min(scan.released, scan.text.rfind("\n") + 1) if whole_lines else scan.released
        self._emit(scan.text[sent:end])
        return max(sent, end)

    def _note_repetition(self, scan: _TextScan) -> None:
        self.repetition = True
        if scan.loop is not None:
            logger.info("free text cut after %d tokens: the model wrote %r %d times in a row",
                        self.generated, scan.loop.period, scan.loop.repeats)
        else:
            logger.info("free text cut after %d tokens: the model repeated a line", self.generated)

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
    with `no_loops`, not a line that is so far a copy of an earlier one (a small model's loops end at the copy),
    and with `cycles`, not text that may turn out to be a copy in a run of repeated tokens (see `_Cycles`)."""

    def __init__(self, triggers: Sequence[str], stops: Sequence[str], no_loops: bool, cycles: bool = False) -> None:
        self.markers = [m for m in (*triggers, *stops) if m]
        self._hold = max((len(m) for m in self.markers), default=1) - 1
        self._no_loops = no_loops
        self._lines: set[str] = set()
        self._line_start = 0
        self._cycles = _Cycles() if cycles else None
        self._cycle_start: int | None = None
        self.text = ""
        self.released = 0

    @property
    def loop(self) -> _Cycles | None:
        """The cycle detector, once it found a loop (its `period` and `repeats`)."""
        return self._cycles if self._cycle_start is not None else None

    def add(self, piece: str, token: int | None = None) -> None:
        """The next piece of text, with the token it came from (the cycle detector needs it)."""
        if self._cycles is not None and token is not None and self._cycle_start is None:
            self._cycle_start = self._cycles.add(token, piece)
        self.text += piece

    def find(self) -> tuple[int, str] | None:
        """The earliest trigger or stop string, or (position, "") where a loop begins: a run of repeated tokens
        (after its first occurrence) or a complete line that repeats an earlier one."""
        lo = max(0, self.released - self._hold)
        hits = [(at, m) for at, m in ((self.text.find(m, lo), m) for m in self.markers) if at >= 0]
        if self._cycle_start is not None:
            hits.append((self._cycle_start, ""))
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
        """The text that can no longer become a marker or a repetition."""
        end = len(self.text)
        for cut in range(min(self._hold, end), 0, -1):
            if any(m.startswith(self.text[end - cut :]) for m in self.markers):
                end -= cut
                break
        line = self.text[self._line_start : end].strip()
        if self._no_loops and line and any(seen.startswith(line) for seen in self._lines):
            end = min(end, self._line_start)
        if self._cycles is not None:
            end = min(end, self._cycles.held_from())
        piece, self.released = self.text[self.released : end], max(self.released, end)
        return piece


def _lines_end(
    stop_after: Callable[[str], int | None] | None, text: str, final: bool = False, default: int | None = None
) -> int | None:
    """Where `stop_after` ends `text`, judged on its complete lines (with `final`, its last line is complete too);
    `default` where it does not."""
    if stop_after is None:
        return default
    lines = text + "\n" if final else text[: text.rfind("\n") + 1]  # a blank line changes nothing
    end = stop_after(lines)
    return default if end is None else min(end, len(text))


def _repeats_needed(period: str, tokens: int) -> int:
    """How many times in a row a period of `tokens` tokens spelling `period` must appear before it is a loop.
    Legitimate text repeats too: table borders and rules (`|---|---|`, `=====`), rows of numbers (`0, 0, 0`) have
    no letters and need 16; one repeated word ("very very", "ha ha") needs 10; a sentence or a line (24+ characters)
    3; anything else with letters ("LIMA\\n", "Sent:\\n", "the realm of ") 4."""
    if not any(char.isalpha() for char in period):
        return 16
    if tokens == 1:
        return 10
    return 3 if len(period) >= _LONG_CYCLE else 4


def _boundary_rank(text: str, at: int) -> int:
    """How good a place to end `text` offset `at` is: 0 at the end of a line, 1 between words, else 2."""
    before, after = text[at - 1 : at] if at else "", text[at : at + 1]
    if before == "\n":
        return 0
    return 1 if before.isspace() or after.isspace() else 2


class _Cycles:
    """Runs of repeated tokens at the end of a text: the last tokens repeat a period of p tokens (1 <= p <=
    `max_period`) r times in a row, as when a small model loops ("LIMA\\nLIMA\\n...", "the realm of the realm of").
    For every p, `_runs[p]` counts how many tokens in a row equal the token p places before them, so each token costs
    one vectorised comparison. A loop begins after the period's first occurrence: that is where the text is cut.
    The first occurrence may differ from its copies in the spacing of its first token ("The" then " The"), so the
    token before the copies is held back too."""

    def __init__(self, max_period: int = _MAX_CYCLE) -> None:
        self._tokens = np.zeros(256, dtype=np.int64)
        self._runs = np.zeros(max_period + 1, dtype=np.int64)
        self._offsets = [0]  # where each token's text starts in the text, then where the text ends
        self._pieces: list[str] = []
        self.period = ""  # the text repeated, once a loop is found
        self.repeats = 0

    def add(self, token: int, piece: str) -> int | None:
        """Take the next token and its text; returns the offset in the text where a loop begins, once there is one."""
        count = len(self._pieces)
        if count == len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.zeros_like(self._tokens)])
        periods = min(count, len(self._runs) - 1)
        if periods:
            before = self._tokens[count - periods : count][::-1]  # the token 1, 2, ... places back
            self._runs[1 : periods + 1] = np.where(before == token, self._runs[1 : periods + 1] + 1, 0)
        self._tokens[count] = token
        self._pieces.append(piece)
        self._offsets.append(self._offsets[-1] + len(piece))
        return self._loop_start()

    def _loop_start(self) -> int | None:
        count = len(self._pieces)
        sizes = np.arange(len(self._runs))
        for size in np.flatnonzero((self._runs >= 2 * sizes) & (sizes > 0)).tolist():  # 3 periods in a row at least
            run = int(self._runs[size])
            period = "".join(self._pieces[count - size :])
            if run + size >= _repeats_needed(period, size) * size and self._primitive(size):
                self.repeats = (run + size) // size
                return self._cut(self._first_copy(count - run, size), size)
        return None

    def _first_copy(self, first: int, size: int) -> int:
        """The token where the copies of the loop begin: `first`, or the token before it where the first occurrence
        began with the same word spaced otherwise ("The capital ... The capital": the copy begins at " The")."""
        word = self._pieces[first - 1].strip()
        return first - 1 if first > size and word and self._pieces[first - size - 1].strip() == word else first

    def _primitive(self, size: int) -> bool:
        """Whether the loop of period `size` is not a loop of a shorter period too ("ah ah ah" is one of "ah")."""
        run = self._runs[size]
        return all(self._runs[d] < run + size - d for d in range(1, size // 2 + 1) if size % d == 0)

    def _cut(self, first: int, size: int) -> int:
        """Where the text ends: after the period's first occurrence (before token `first`), moved on by less than
        one period to the end of a line, else to a word boundary, where there is one (`Sent:\n`, not `:\nSent`)."""
        text = "".join(self._pieces)
        cuts = self._offsets[first : first + size]
        index = min(range(size), key=lambda i: (_boundary_rank(text, cuts[i]), i))
        self.period = text[cuts[index] : self._offsets[first + index + size]]
        return cuts[index]

    def held_from(self) -> int:
        """The offset from which the text may still be a copy in a loop, to be held back until that is settled."""
        return self._offsets[max(0, len(self._pieces) - int(self._runs.max()) - 1)]


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


def prefill(llama: Any, tokens: Sequence[int]) -> tuple[list[int], int]:
    """Point the context at `tokens`, keeping the longest prefix it already holds. Returns the tokens still to be
    evaluated (at least one: sampling needs fresh logits) and how many were reused."""
    held = llama.input_ids[: llama.n_tokens]
    size = min(len(held), len(tokens) - 1)
    differ = np.flatnonzero(held[:size] != np.asarray(tokens[:size], dtype=held.dtype))
    reused = int(differ[0]) if len(differ) else size
    llama.n_tokens = reused
    return list(tokens[reused:]), reused
