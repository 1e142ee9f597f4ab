"""Free text as it is decoded: where a trigger or stop string appears, and where the text starts to loop (a repeated
line, or a run of tokens that repeats itself back to back: `_Cycles`), so the decoder can end it there."""


from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_MIN_LOOP_LINE = 12  # shorter lines (a closing brace, "Yes.") may well repeat on purpose
# The cycle detector (`_Cycles`): the longest period it looks for, in tokens (a short paragraph), and the length in
# characters from which a period counts as a sentence or a line, a loop once it appears 3 times in a row
_MAX_CYCLE = 128
_LONG_CYCLE = 24


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

    def __init__(self, max_period: int = _MAX_CYCLE, needed: Callable[[str, int], int] = _repeats_needed) -> None:
        self._needed = needed  # given a period's text and its length in tokens, the repeats that make a loop
        self._tokens = np.zeros(256, dtype=np.int64)
        self._runs = np.zeros(max_period + 1, dtype=np.int64)
        self._offsets = [0]  # where each token's text starts in the text, then where the text ends
        self._pieces: list[str] = []
        self.period = ""  # the text repeated, once a loop is found
        self.repeats = 0
        self.copies_from = 0  # the token where the copies of the loop begin, once a loop is found
        self.size = 0  # the loop's period in tokens, once a loop is found

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
        """The offset where the text is to end, once the tokens end with a loop."""
        count = len(self._pieces)
        sizes = np.arange(len(self._runs))
        for size in np.flatnonzero((self._runs >= 2 * sizes) & (sizes > 0)).tolist():  # 3 periods in a row at least
            run = int(self._runs[size])
            period = "".join(self._pieces[count - size :])
            if run + size >= self._needed(period, size) * size and self._primitive(size):
                self.repeats, self.size = (run + size) // size, size
                self.copies_from = self._first_copy(count - run, size)
                return self._cut(self.copies_from, size)
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
