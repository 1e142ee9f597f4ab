"""Showing a conversation's events on a terminal or in a pipe: calls, results and the answer.

On a terminal (rich) text streams as it is written, calls are styled, and a spinner says what is being waited
for (the model thinking, a slow tool); in a pipe the output is plain lines a script can read:
`name(arguments)`, `  -> result`, then the answer.

What the program did not write itself is untrusted: the model's text, its calls' names and arguments, tool results,
tool listings, error messages quoting any of them. All of it goes through `_text.visible_controls` before it is
written, in a pipe as on a terminal, so an escape sequence in it is shown rather than obeyed (OSC 52 clipboard
writes, window titles, hyperlinks, clearing the screen, moving the cursor up to paint over what the user saw). The
visible forms: C0 controls and DEL in caret notation (ESC `^[`, BEL `^G`, backspace `^H`, DEL `^?`, and CR `^M`
unless it ends a line as CR LF); C1 controls (U+0080-U+009F: CSI U+009B, OSC U+009D, ...), the bidirectional-text
controls (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069) and lone surrogates as `<U+XXXX>`, e.g. `<U+009B>`;
newline and tab are kept. It works character by character, so a sequence split across streamed pieces cannot slip
through half by half. rich reads no markup and no emoji codes here: `[bold]` or `:warning:` shows as written.
`--json` output escapes the same characters as JSON `\\uXXXX` (`json_for_terminal`), so it stays the same data.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from functionary_agent._text import compact_json, cut, visible_controls
from functionary_agent.events import FinalAnswer, TextDelta, ToolCallStarted, ToolResult

_SCREEN = 2000  # characters of a tool result shown on the terminal


@functools.cache
def _json_escapes() -> dict[int, str]:
    """What JSON leaves raw with ensure_ascii=False (it escapes only C0) that `visible_controls` would change: DEL,
    C1, the bidi controls, lone surrogates; as `\\uXXXX` escapes. Built on first use: `run` without --json skips it."""
    return {code: f"\\u{code:04x}" for code in range(0x7F, 0xE000) if visible_controls(chr(code)) != chr(code)}


def json_for_terminal(value: Any) -> str:
    """`value` as indented JSON, non-ASCII kept, with every character a terminal would act on as a `\\uXXXX`
    escape: the same data for a program reading it, nothing for a terminal showing it to obey."""
    return json.dumps(value, ensure_ascii=False, indent=2).translate(_json_escapes())


class _VisibleWarnings(logging.Handler):
    """Stands in for `logging.lastResort`: when nothing else handles the library's warnings (the CLI sets up no
    logging), the message alone on stderr, as Python prints it, but with its controls shown: a warning may quote an
    MCP server's error or an OpenAPI document."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # someone set up logging (a host program, vLLM, pytest): theirs to show
            return
        if getattr(record, "run_ending", False):  # how the run ended: the CLI says it itself, once
            return
        try:
            print(visible_controls(self.format(record)), file=sys.stderr)
        except Exception:
            self.handleError(record)


def show_library_warnings() -> None:
    """For the CLI's run and chat: `functionary_agent`'s warnings through `_VisibleWarnings` (added once)."""
    logger = logging.getLogger("functionary_agent")
    if not any(isinstance(handler, _VisibleWarnings) for handler in logger.handlers):
        logger.addHandler(_VisibleWarnings(logging.WARNING))


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

            self._console = Console(file=out, highlight=False, markup=False, emoji=False)

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
                print(visible_controls(event.content), file=self._out)

    def _wait(self, what: str) -> None:
        """A spinner with `what` (which names the model's calls), on a terminal only; any output stops it first."""
        if self._console is None:
            return
        from rich.text import Text

        label = Text(visible_controls(what))
        if self._status is None:
            self._status = self._console.status(label, spinner="dots")
            self._status.start()
        else:
            self._status.update(label)

    def _stop_waiting(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def notice(self, text: str, *, error: bool = False) -> None:
        """A line from the program itself (chat commands, interruptions), set apart from the model's words; what it
        quotes (an error's message, a tool's description, a call to approve) is shown with its controls visible."""
        self._stop_waiting()
        self._end_line()
        text = visible_controls(text)
        if self._console is None:
            print(text, file=self._out)
        else:
            self._console.print(text, style="bold red" if error else "dim", markup=False)
        self._out.flush()

    def _call(self, result: ToolResult) -> None:
        name = visible_controls(result.name)
        arguments = visible_controls(compact_json(result.arguments))
        content = visible_controls(cut(result.content, _SCREEN))
        if self._console is None:
            print(f"{name}({arguments})\n  -> {content}", file=self._out)
            return
        from rich.text import Text

        style = "bold red" if result.is_error else "green"
        self._console.print(Text.assemble((name, "bold cyan"), (f"({arguments})", "cyan")))
        self._console.print(Text.assemble(("  -> ", "dim"), (content, style)))

    def _write(self, text: str) -> None:
        text = visible_controls(text)
        if self._console is not None:
            self._console.print(text, end="", markup=False)
        else:
            self._out.write(text)
        self._out.flush()

    def _end_line(self) -> None:
        if self._mid_line:
            self._write("\n")
            self._mid_line = False
