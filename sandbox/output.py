"""Bounded text: keep the head and the tail of a stream, count what was dropped in between.

A cell may print a gigabyte; the model only needs the start (what happened) and the end (how it finished). This
module is stdlib-only because the kernel process loads it by file path, where the `sandbox` package may not be
importable.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def strip_ansi(text: str) -> str:
    """Remove terminal colour and cursor codes (IPython tracebacks are coloured)."""
    return _ANSI.sub("", text)


def omitted_marker(count: int) -> str:
    """The line that stands where output was dropped; one wording everywhere so the model learns it."""
    return f"\n… {count} characters omitted …\n"


class HeadTail:
    """Keeps the first `head` and the last `tail` characters written; memory stays O(head + tail).

    Writes after the head is full only append a reference; the tail list is cut back to `tail` characters when it
    holds twice that, so the per-write cost stays a list append (10^7 prints go through quickly) and a single 1 GB
    write costs one slice of `tail` characters, never a copy of the whole string.
    """

    def __init__(self, head: int, tail: int) -> None:
        if head < 0 or tail < 0:
            raise ValueError("head and tail must be >= 0")
        self.head_limit = head
        self.tail_limit = tail
        self._compact_at = max(2 * tail, 4096)
        self._head: list[str] = []
        self._head_len = 0
        self._tail: list[str] = []
        self._tail_len = 0
        self._omitted = 0

    def write(self, text: str) -> str:
        """Absorb `text`; return the part of it that went into the head (callers may forward that part live)."""
        if self._head_len >= self.head_limit:
            self._tail.append(text)
            self._tail_len += len(text)
            if self._tail_len > self._compact_at:
                self._compact()
            return ""
        room = self.head_limit - self._head_len
        taken = text[:room]
        self._head.append(taken)
        self._head_len += len(taken)
        rest = len(text) - len(taken)
        if rest > self.tail_limit:
            self._omitted += rest - self.tail_limit
            self._tail.append(text[len(text) - self.tail_limit :] if self.tail_limit else "")
            self._tail_len += min(rest, self.tail_limit)
        elif rest:
            self._tail.append(text[room:])
            self._tail_len += rest
        return taken

    def _compact(self) -> None:
        """Cut the tail list back to its last `tail_limit` characters, slicing only the pieces at the cut."""
        keep: list[str] = []
        need = self.tail_limit
        for piece in reversed(self._tail):
            if need <= 0:
                break
            if len(piece) > need:
                piece = piece[len(piece) - need :]
            keep.append(piece)
            need -= len(piece)
        kept = self.tail_limit - need
        self._omitted += self._tail_len - kept
        self._tail = ["".join(reversed(keep))] if keep else []
        self._tail_len = kept

    @property
    def omitted(self) -> int:
        return self._omitted + max(0, self._tail_len - self.tail_limit)

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def head_text(self) -> str:
        return "".join(self._head)

    def tail_text(self) -> str:
        if self._tail_len > self.tail_limit:
            self._compact()
        return "".join(self._tail)

    def getvalue(self) -> str:
        """Head, the omission marker when something was dropped, then tail."""
        tail = self.tail_text()
        middle = omitted_marker(self.omitted) if self.omitted else ""
        return self.head_text() + middle + tail

    def __len__(self) -> int:
        return self._head_len + min(self._tail_len, self.tail_limit)


def truncate(text: str, limit: int) -> str:
    """Head and tail of an already complete string, split evenly around the marker."""
    if len(text) <= limit:
        return text
    buffer = HeadTail(limit // 2, limit - limit // 2)
    buffer.write(text)
    return buffer.getvalue()
