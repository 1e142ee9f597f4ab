"""The live display: one run shown in the notebook as its events arrive.

The assistant's text appears as Markdown that grows as it streams. Each tool call is a collapsible block, with its
arguments and result, that fills in when the call finishes; images from the code interpreter appear inline, and
failures are marked in red. A run that waits for a person's yes shows as paused, not as a failure: its calls say
"waiting for your approval", and a box lists them with the line (or buttons) that answers them (`approvals.py`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from functionary_agent._run.interpreter import PYTHON
from functionary_agent.errors import ApprovalRequired
from functionary_agent.events import (
    ApprovalRequested,
    Event,
    FinalAnswer,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    ToolResult,
)
from functionary_agent.notebook.approvals import mark_shown, pending_bundle, resume_line, was_shown
from functionary_agent.notebook.render import Bundle, ShownCall, call_bundle, error_bundle, failure_text, text_bundle
from functionary_agent.notebook.sandbox_files import ImageResolver, load_images

if TYPE_CHECKING:
    from functionary_agent._run.approvals import PendingCall

Show = Callable[[Bundle], Callable[[Bundle], None]]
"""Displays a bundle and returns the function that replaces it in place."""


class _Output:
    """One display in the cell, replaced in place. Updates closer together than `interval` are merged, so a
    fast stream does not flood the frontend with a message per token; an update is given as the function that
    makes its bundle, called only when it is shown (rendering Markdown per token would be wasted)."""

    def __init__(self, show: Show, bundle: Bundle, clock: Callable[[], float], interval: float) -> None:
        self._update = show(bundle)
        self._clock = clock
        self._interval = interval
        self._shown_at = clock()
        self._pending: Callable[[], Bundle] | None = None

    def set(self, bundle: Callable[[], Bundle], *, now: bool = False) -> None:
        self._pending = bundle
        if now or self._clock() - self._shown_at >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is not None:
            self._update(self._pending())
            self._pending = None
            self._shown_at = self._clock()


@dataclass
class _LiveCall:
    """A call's block on screen: the call's id in the stream, what the block shows, and the display it is in."""

    id: str
    call: ShownCall
    output: _Output

    def refresh(self, *, now: bool = False) -> None:
        self.output.set(functools.partial(call_bundle, self.call), now=now)


class LiveDisplay:
    """Shows one run in the notebook as `Conversation.stream` events arrive: `handle` each event, then `finish`
    (or `fail` with the exception that ended the run).

    Text goes into a Markdown display that grows as it streams; each call gets its own display, created when
    the model starts it and completed when its result arrives (results come in completion order and are matched
    by call id). `show` displays a bundle and returns its updater; the default uses IPython display handles.
    """

    def __init__(self, *, resolve_image: ImageResolver | None = None, show: Show | None = None,
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 ask: Callable[[list[PendingCall]], Any] | None = None,
                 resume_line: Callable[[Sequence[PendingCall]], str] | None = None) -> None:
        self._ask = ask  # shows the buttons for calls that wait for approval (None: the resume line only)
        self._resume_line = resume_line  # the line that answers them (None: the one for any variable name)
        self._show = show or _ipython_show
        self._resolve = resolve_image
        self._interval = min_interval
        self._clock = clock
        self._outputs: list[_Output] = []
        self._text: _Output | None = None
        self._text_value = ""
        self._turn_text = ""  # all text streamed in the current model turn
        self._calls: list[_LiveCall] = []  # the current turn's calls
        self._by_index: dict[int, _LiveCall] = {}
        self._results_seen = False
        self.answer = ""

    def handle(self, event: Event) -> None:
        """Draw one event of the run: text grows the answer's display, a started call opens its block, a result
        completes the block of its call, a pause shows the approval box, the final answer flushes everything."""
        if isinstance(event, ToolResult):
            self._on_result(event)
            return
        if self._results_seen:  # the first event after a turn's results opens the next turn
            self._results_seen = False
            self._calls, self._by_index, self._turn_text = [], {}, ""
            self._close_text()
        if isinstance(event, TextDelta):
            self._on_text(event.text)
        elif isinstance(event, ToolCallStarted):
            self._on_call_started(event)
        elif isinstance(event, ToolCallArgumentsDelta):
            live = self._by_index.get(event.index)
            if live is not None:
                live.call.arguments += event.delta
                live.refresh()
        elif isinstance(event, ApprovalRequested):
            self._on_approval(event.calls)
        elif isinstance(event, FinalAnswer):
            self.answer = event.content
            if not self._turn_text.strip() and event.content.strip():  # a model that did not stream its text
                self._on_text(event.content)
            if event.truncated:
                note = f"✂ Cut short (finish_reason={event.finish_reason}): the answer may be incomplete."
                self._new_output(error_bundle(note, "fa-truncated"))
            self.finish()

    def finish(self) -> None:
        """Bring every display up to date (merged updates may be pending)."""
        for output in self._outputs:
            output.flush()

    def fail(self, error: BaseException) -> None:
        """Mark the run as stopped: calls still running are cancelled, and a red box says what ended it. A pause
        for approval is no failure: it gets the approval box (if the run's events did not show it already)."""
        if isinstance(error, ApprovalRequired):
            if not was_shown(error):
                self._show_pause(error)
            self.finish()
            return
        for live in self._calls:
            if live.call.state == "running":
                live.call.state = "cancelled"
                live.refresh(now=True)
        if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
            self._new_output(error_bundle("⏹ Interrupted: the run was stopped.", "fa-interrupted"))
        else:
            self._new_output(error_bundle(failure_text(error)))
        self.finish()

    def _on_text(self, text: str) -> None:
        self._turn_text += text
        self._text_value += text
        if self._text is None:
            if self._text_value.strip():  # no empty display for the whitespace before a call
                self._text = self._new_output(text_bundle(self._text_value, self._resolve))
        else:
            self._text.set(functools.partial(text_bundle, self._text_value, self._resolve))

    def _on_approval(self, calls: list[PendingCall]) -> None:
        """The run paused: show what waits and how to answer, then end the run the way `submit` does."""
        paused = ApprovalRequired(calls)
        self._show_pause(paused)
        raise paused

    def _show_pause(self, paused: ApprovalRequired) -> None:
        """The turn's calls stop showing as running (those that wait say so, the others run on resume), then
        the box with the waiting calls and the line (or buttons) that answers them."""
        waiting = {call.id for call in paused.calls}
        names = {call.name for call in paused.calls}
        for live in self._calls:
            if live.call.state == "running":
                asked = live.id in waiting if live.id else live.call.name in names
                live.call.state = "waiting" if asked else "paused"
                live.refresh(now=True)
        line = self._resume_line(paused.calls) if self._resume_line else resume_line(None, paused.calls, {})
        self._new_output(pending_bundle(paused.calls, with_buttons=self._ask is not None, resume_line=line))
        self.finish()
        if self._ask is not None:
            self._ask(paused.calls)
        mark_shown(paused)

    def _on_call_started(self, event: ToolCallStarted) -> None:
        self._close_text()
        call = ShownCall(event.name)
        live = _LiveCall(event.id, call, self._new_output(call_bundle(call)))
        self._calls.append(live)
        self._by_index[event.index] = live

    def _on_result(self, event: ToolResult) -> None:
        self._results_seen = True
        live = self._match(event)
        call = live.call
        call.name, call.arguments, call.content = event.name, event.arguments, event.content
        call.state = "error" if event.is_error else "repeated" if event.repeated else "ok"
        call.duration = event.duration or None
        if event.name == PYTHON:
            call.images = load_images(event.content, self._resolve)
        live.refresh(now=True)

    def _match(self, event: ToolResult) -> _LiveCall:
        """The block this result completes: by id, else (ids missing from the stream) the first unanswered
        call of that name; a result with no started call gets a new block."""
        waiting = [live for live in self._calls if live.call.content is None]
        for live in waiting:
            if live.id and live.id == event.id:
                return live
        for live in waiting:
            if live.call.name == event.name:
                return live
        call = ShownCall(event.name, event.arguments)
        live = _LiveCall(event.id, call, self._new_output(call_bundle(call)))
        self._calls.append(live)
        return live

    def _close_text(self) -> None:
        if self._text is not None:
            self._text.flush()
        self._text, self._text_value = None, ""

    def _new_output(self, bundle: Bundle) -> _Output:
        self.finish()  # a new display goes below the others: bring those up to date first
        output = _Output(self._show, bundle, self._clock, self._interval)
        self._outputs.append(output)
        return output


def _ipython_show(bundle: Bundle) -> Callable[[Bundle], None]:
    from IPython.display import display

    handle = display(bundle, raw=True, display_id=True)

    def update(new: Bundle) -> None:
        handle.update(new, raw=True)

    return update


def no_show(bundle: Bundle) -> Callable[[Bundle], None]:
    """Shows nothing (no IPython shell runs): the run still goes to its end."""
    return lambda new: None
