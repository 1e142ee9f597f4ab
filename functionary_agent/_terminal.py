"""Showing a conversation's events on a terminal or in a pipe: calls, results and the answer.

On a terminal (rich) text streams as it is written, calls are styled, and a spinner says what is being waited
for (the model thinking, a slow tool); in a pipe the output is plain lines a script can read:
`name(arguments)`, `  -> result`, then the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from functionary_agent._text import compact_json, cut
from functionary_agent.events import FinalAnswer, TextDelta, ToolCallStarted, ToolResult

_SCREEN = 2000  # characters of a tool result shown on the terminal


class Reporter:
    """Calls, results and the answer: styled and streamed on a terminal (rich), plain text in a pipe."""

    def __init__(self, out: TextIO, *, quiet: bool, live: bool) -> None:
        self._quiet = quiet
        self._live = live
        self._out = out
        self._console: Any = None
        self._status: Any = None
        self._running: dict[str, str] = {}  # call id -> name, while the call runs
        self._mid_line = False
        if live and not quiet:
            from rich.console import Console  # only terminals pay for rich

            self._console = Console(file=out, highlight=False)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Around one question: the spinner starts as "thinking" and is gone afterwards, whatever happened."""
        self._running.clear()
        self._wait("thinking…")
        try:
            yield
        finally:
            self._stop_waiting()
            self._end_line()

    def show(self, event: object) -> None:
        if self._quiet:
            return
        if isinstance(event, TextDelta) and self._live:
            self._stop_waiting()
            self._write(event.text)
            self._mid_line = not event.text.endswith("\n")
        elif isinstance(event, ToolCallStarted):
            self._running[event.id] = event.name
            self._wait(f"calling {', '.join(self._running.values())}…")
        elif isinstance(event, ToolResult):
            self._stop_waiting()
            self._end_line()
            self._call(event)
            self._running.pop(event.id, None)
            self._wait(f"waiting for {', '.join(self._running.values())}…" if self._running else "thinking…")
        elif isinstance(event, FinalAnswer):
            self._stop_waiting()
            if self._live:
                self._end_line()
            else:
                print(event.content, file=self._out)

    def _wait(self, what: str) -> None:
        """A spinner with `what`, on a terminal only; any output stops it first."""
        if self._console is None:
            return
        if self._status is None:
            self._status = self._console.status(what, spinner="dots")
            self._status.start()
        else:
            self._status.update(what)

    def _stop_waiting(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def notice(self, text: str, *, error: bool = False) -> None:
        """A line from the program itself (chat commands, interruptions), set apart from the model's words."""
        self._stop_waiting()
        self._end_line()
        if self._console is None:
            print(text, file=self._out)
        else:
            self._console.print(text, style="bold red" if error else "dim", markup=False)
        self._out.flush()

    def _call(self, result: ToolResult) -> None:
        arguments = compact_json(result.arguments)
        content = cut(result.content, _SCREEN)
        if self._console is None:
            print(f"{result.name}({arguments})\n  -> {content}", file=self._out)
            return
        from rich.text import Text

        style = "bold red" if result.is_error else "green"
        self._console.print(Text.assemble((result.name, "bold cyan"), (f"({arguments})", "cyan")))
        self._console.print(Text.assemble(("  -> ", "dim"), (content, style)))

    def _write(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, end="", markup=False)
        else:
            self._out.write(text)
        self._out.flush()

    def _end_line(self) -> None:
        if self._mid_line:
            self._write("\n")
            self._mid_line = False
