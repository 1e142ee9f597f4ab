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
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import llama_cpp
import numpy as np

from functionary_agent.formats.grammar import gbnf_literal
from functionary_agent.models._json_values import (
    _Healing,
    _JsonValues,
    _parses_as_json,
    _ValueLoops,
    _Vocabulary,
    value_repair,
)
from functionary_agent.models._sampler import Sampler
from functionary_agent.models._text_scan import _lines_end, _TextScan

logger = logging.getLogger(__name__)


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

    def _truncate_held(self, size: int) -> None:
        """Drop the held pieces from `size` on (held text is what a rewind may take back)."""
        if self._held is None:
            raise RuntimeError("only held output can be taken back")
        del self._held[size:]

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

    def json_arguments(self, gbnf: str, copy: ValueBias | None = None, *, cycles: bool = False) -> bool:
        """Argument JSON under `gbnf`, up to the moment it is a complete value; False if it was cut short.
        `copy` changes logits as values are written (steering's copy bias, for small models). Where a token opens
        a value, token healing (`_Healing`) may replace it by one that merges the opening with what follows.
        With `cycles`, a value that starts to loop (`_ValueLoops`) ends after the loop's first occurrence: its
        copies are taken back and the value is closed (this sets `repetition`)."""
        self.sampler.use_grammar(gbnf)
        values = _JsonValues()
        call = _CallTokens(self)
        healing = _Healing(self, values, copy) if value_repair() else None
        loops = _ValueLoops() if cycles and self._held is not None else None  # held output can be taken back
        while True:
            closing = values.closing()
            if closing is not None and self._budget - self.generated <= len(closing):
                self.force(closing)  # out of tokens: end the JSON rather than cut it (it may miss a property)
                return _parses_as_json(call.text + closing)
            boost, bias = copy.logits(*values.current()) if copy is not None else ((), ())
            token = self._next(boost=boost, bias=bias)
            if token is None or self._is_end(token):
                break
            if healing is not None:
                token = healing.token(token, boost, bias)
            piece = call.take(token)
            values.feed(piece)
            if loops is not None and (cut := loops.add(len(call.tokens) - 1, token, piece, values)) is not None:
                self._end_loop(call, values, gbnf, cut, loops)
            if call.text.rstrip().endswith("}") and _parses_as_json(call.text):
                return True
        return _parses_as_json(call.text)

    def _end_loop(self, call: _CallTokens, values: _JsonValues, gbnf: str, cut: tuple[int, str],
                  loops: _ValueLoops) -> None:
        """A looping value ends where `cut` says (the first token to drop, the text that closes the value): the
        tokens from there on leave the context, the output and the grammar (it takes the kept tokens again), and
        the closing text is written through the grammar, as far as the grammar allows (the model goes on from
        there, under the grammar). Unlike a rewind, the tokens taken back still count as generated."""
        keep, closing = cut
        dropped, generated = len(call.tokens) - keep, self.generated
        call.rewind(keep, values)
        self.generated = generated  # the copies were generated all the same: they count (the budget bounds work)
        self.sampler.replay(gbnf, call.tokens)
        vocabulary = _Vocabulary.of(self.llama)
        for char in closing:
            token = vocabulary.token_of(char)
            if token is None or not self.sampler.allows(token):
                break
            values.feed(call.take(token))
        self.repetition = True
        logger.warning("a call's argument value began to loop: the model wrote %r %d times in a row; it ends after "
                       "the first (%d tokens taken back), the call so far: %r", loops.period, loops.repeats, dropped,
                       call.text)

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


class _CallTokens:
    """The tokens of one call's argument JSON as they are taken, with what it takes to go back to any of them: the
    decoder's checkpoint, how much output was held and the text before each."""

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self.tokens: list[int] = []
        self.text = ""
        self._marks: list[tuple[tuple[int, int], int, int]] = []  # (checkpoint, held pieces, text) before each

    def take(self, token: int) -> str:
        """Take `token` as the decoder's next (in the context, the grammar and the output); returns its text."""
        decoder = self._decoder
        self._marks.append((decoder.mark(), decoder.held_size(), len(self.text)))
        piece = decoder._take(token)
        self.tokens.append(token)
        self.text += piece
        decoder._emit(piece)
        return piece

    def rewind(self, keep: int, values: _JsonValues) -> None:
        """Back to before token `keep`: the later tokens leave the context and the output (held output only: a
        call's output is held until it is reviewed), and `values` stands where it stood then."""
        checkpoint, held, length = self._marks[keep]
        decoder = self._decoder
        decoder.rewind(checkpoint)
        decoder._truncate_held(held)
        decoder._utf8.reset()
        values.restore(_json_state(self.text[:length]))
        del self.tokens[keep:], self._marks[keep:]
        self.text = self.text[:length]


def _json_state(text: str) -> _JsonValues:
    values = _JsonValues()
    values.feed(text)
    return values


def prefill(llama: Any, tokens: Sequence[int]) -> tuple[list[int], int]:
    """Point the context at `tokens`, keeping the longest prefix it already holds. Returns the tokens still to be
    evaluated (at least one: sampling needs fresh logits) and how many were reused."""
    held = llama.input_ids[: llama.n_tokens]
    size = min(len(held), len(tokens) - 1)
    differ = np.flatnonzero(held[:size] != np.asarray(tokens[:size], dtype=held.dtype))
    reused = int(differ[0]) if len(differ) else size
    llama.n_tokens = reused
    return list(tokens[reused:]), reused
