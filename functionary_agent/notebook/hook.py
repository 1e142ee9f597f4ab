"""What `Conversation.submit` runs in a notebook: the run shown live, its answer not echoed twice, and the hook
object the core calls (`NotebookDisplay`, registered in `functionary_agent._display` when the package is imported).

A pause for approval ends the cell without a traceback: the kernel's handler for an uncaught `ApprovalRequired`
shows it as a pause (`approvals.install_pause_display`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from functionary_agent.errors import ApprovalRequired
from functionary_agent.notebook import approvals
from functionary_agent.notebook.display import LiveDisplay, no_show
from functionary_agent.notebook.kernel import in_notebook, ipython_shell, notebook_namespace
from functionary_agent.notebook.render import render_html, render_markdown
from functionary_agent.notebook.sandbox_files import image_resolver

if TYPE_CHECKING:
    from functionary_agent._run.approvals import PendingCall
    from functionary_agent.conversation import Content, Conversation

logger = logging.getLogger(__name__)


class _ShownAnswer(str):
    """The answer of a run the live display has already shown. It is a plain `str`, except that the cell that
    produced it does not echo it a second time as the cell's result; shown from a later cell, it displays."""

    cell: object = None

    def _ipython_display_(self) -> None:
        shell = ipython_shell()
        if shell is not None and self.cell is not None and getattr(shell, "execution_count", None) == self.cell:
            return
        from IPython.display import display

        display(str(self))


def _live_display(chat: Conversation) -> LiveDisplay:
    if ipython_shell() is None:
        logger.warning("no IPython shell is running: the run is not displayed")
        return LiveDisplay(show=no_show)
    ask = None
    if approvals.widgets_available():
        def ask(calls: list[PendingCall]) -> None:
            from IPython.display import display

            display(approvals.approval_panel(chat, calls))

    def line(calls: Sequence[PendingCall]) -> str:
        return approvals.resume_line(chat, calls, notebook_namespace())

    return LiveDisplay(resolve_image=image_resolver(chat), ask=ask, resume_line=line)


def _shown(answer: str) -> str:
    shown = _ShownAnswer(answer)
    shown.cell = getattr(ipython_shell(), "execution_count", None)
    return shown


@contextlib.contextmanager
def _displayed_run(chat: Conversation) -> Iterator[LiveDisplay]:
    """The live display of one run: the caller feeds it the run's events; a failure is shown, then raised (a
    pause too, which the kernel then shows as no traceback: see `approvals.install_pause_display`)."""
    approvals.install_pause_display(ipython_shell())
    live = _live_display(chat)
    try:
        yield live
    except BaseException as exc:
        live.fail(exc)
        if isinstance(exc, ApprovalRequired):
            approvals.remember(chat, exc.calls)
        raise
    live.finish()


def submit_with_display(chat: Conversation, content: Content = None) -> str:
    """`chat.submit(content)`, shown live in the notebook; returns the final answer."""
    with _displayed_run(chat) as live:
        for event in chat.stream(content):
            live.handle(event)
    return _shown(live.answer)


class NotebookDisplay:
    """The notebook's display hook: what `Conversation` asks of a display front end (`_display.DisplayHook`)."""

    def in_notebook(self) -> bool:
        return in_notebook()

    def submit(self, conversation: Conversation, content: Content) -> str:
        return submit_with_display(conversation, content)

    def markdown(self, conversation: Conversation) -> str:
        return render_markdown(conversation.messages)

    def html(self, conversation: Conversation) -> str:
        return render_html(conversation.messages, resolve_image=image_resolver(conversation))
