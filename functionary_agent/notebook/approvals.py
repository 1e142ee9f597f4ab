"""What a notebook shows when a run pauses for approval: the waiting calls, the line that answers them, and buttons
to answer them when `ipywidgets` is installed, and `resume`, which answers a paused run from any cell.

A pause is not a failure, so it never shows as a traceback: the kernel's shell gets a handler for an uncaught
`ApprovalRequired` (`install_pause_display`), which shows the box (or nothing more, when the live display already
did). The cell still ends as failed, so "Run all" stops at a pause rather than running on without the answer.

The resume line names the conversation by a global name that refers to it (`assistant.resume({...})`), looked up
when the box is shown. A conversation that no global name holds (in a dict, in a function) gets
`from functionary_agent.notebook import resume; resume({...})`, which finds the conversation waiting on those call
ids among the global ones and those shown paused (remembered weakly).
"""

from __future__ import annotations

import html
import json
import keyword
import sys
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from functionary_agent._run.approvals import Decision, PendingCall, pending_calls
from functionary_agent._text import compact_json, cut
from functionary_agent.errors import ApprovalRequired, ConfigurationError, FunctionaryAgentError
from functionary_agent.notebook.kernel import notebook_namespace
from functionary_agent.notebook.render import error_bundle, failure_text, text_bundle
from functionary_agent.notebook.sandbox_files import image_resolver

if TYPE_CHECKING:
    from functionary_agent.conversation import Conversation

_AMBER = "#b26a00"
_ARGUMENTS_SHOWN = 500
_SHOWN: weakref.WeakSet[ApprovalRequired] = weakref.WeakSet()  # pauses whose box is on screen already
_PAUSED: weakref.WeakSet[Conversation] = weakref.WeakSet()  # conversations shown paused (resume may find them)
FALLBACK_RESUME = "from functionary_agent.notebook import resume; resume"


# -- the box -------------------------------------------------------------------------------------------------
def pending_bundle(calls: Sequence[PendingCall], *, with_buttons: bool, resume_line: str) -> dict[str, str]:
    """The box that lists the waiting calls and says how to answer them."""
    lines = [f"{call.name}({cut(compact_json(call.raw_arguments), _ARGUMENTS_SHOWN)})" for call in calls]
    how = "Answer with the buttons below, or run:" if with_buttons else "Run (True runs a call, False declines it):"
    plain = "⏸ Waiting for your approval:\n" + "\n".join(f"  {line}" for line in lines) + f"\n{how}\n  {resume_line}"
    items = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in lines)
    box = (f'<div class="fa-approval" style="margin:4px 0;padding:2px 8px;border-left:3px solid {_AMBER}">'
           f"<b>⏸ Waiting for your approval</b><ul>{items}</ul>{html.escape(how)}"
           f"<pre>{html.escape(resume_line)}</pre></div>")
    return {"text/html": box, "text/plain": plain}


def resume_line(chat: Conversation | None, calls: Sequence[PendingCall], namespace: Mapping[str, Any]) -> str:
    """The line that runs every waiting call: `NAME.resume({...})` where a global name in `namespace` (the
    notebook's) refers to `chat`, else the module function that finds the conversation by its call ids (`chat`
    must then be `remember`ed)."""
    decisions = "{" + ", ".join(f"{json.dumps(call.id)}: True" for call in calls) + "}"
    if chat is None:  # a pause whose conversation is not known here
        return f"<the paused conversation>.resume({decisions})"
    name = global_name(chat, namespace)
    return f"{name}.resume({decisions})" if name else f"{FALLBACK_RESUME}({decisions})"


def global_name(value: object, namespace: Mapping[str, Any]) -> str | None:
    """A public name bound to `value` itself in `namespace`: the first one defined (IPython's `_`, `_1`... and
    anything private are left out)."""
    for name, bound in list(namespace.items()):
        if bound is value and name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_"):
            return name
    return None


# -- which conversation waits on a call ----------------------------------------------------------------------
def remember(chat: Conversation, calls: Sequence[PendingCall]) -> None:
    """Note that `chat` was shown paused, for `functionary_agent.notebook.resume` (weakly: this keeps nothing alive)."""
    if calls:
        _PAUSED.add(chat)


def conversations_waiting_on(call_ids: Collection[str], namespace: Mapping[str, Any]) -> list[Conversation]:
    """The conversations, shown paused here or held by a global name, whose waiting calls include `call_ids` (read
    from their messages: no `approve=` predicate runs)."""
    from functionary_agent.conversation import Conversation

    candidates = {id(chat): chat for chat in list(_PAUSED)}
    candidates.update((id(value), value) for value in list(namespace.values()) if isinstance(value, Conversation))
    wanted = set(call_ids)
    return [chat for chat in candidates.values() if wanted <= {call.id for call in pending_calls(chat.messages)}]


def conversation_of(calls: Sequence[PendingCall], namespace: Mapping[str, Any]) -> Conversation | None:
    """The one conversation that waits on `calls` (None when none or several do)."""
    found = conversations_waiting_on([call.id for call in calls], namespace)
    return found[0] if len(found) == 1 else None


def waiting_conversation(decisions: Mapping[str, Decision], namespace: Mapping[str, Any]) -> Conversation:
    """The one conversation that waits on the calls `decisions` answers, or a clear error."""
    if not isinstance(decisions, Mapping) or not decisions:
        raise ConfigurationError("resume(): give the decisions as {call_id: True/False/reason}, as the box shows them")
    found = conversations_waiting_on([str(call_id) for call_id in decisions], namespace)
    ids = ", ".join(str(call_id) for call_id in decisions)
    if not found:
        raise ConfigurationError(f"resume(): no paused conversation in this notebook waits on {ids}; "
                                 "check the call ids in the box, or call resume({...}) on the conversation itself")
    if len(found) > 1:
        raise ConfigurationError(f"resume(): {len(found)} conversations wait on {ids}; "
                                 "call resume({...}) on the one you mean")
    return found[0]


def resume(decisions: Mapping[str, Decision]) -> Any:
    """Answer a run shown paused in this notebook, whatever holds its conversation: `resume({call_id: True})`
    (False or a reason string declines) finds the conversation that waits on those calls and resumes it, as
    `Conversation.resume` does. The pause box offers this line when no global name refers to the conversation."""
    chat = waiting_conversation(decisions, notebook_namespace())
    try:
        return chat.resume(decisions)
    except ApprovalRequired as paused:  # it paused again: the next box offers this line again
        remember(chat, paused.calls)
        raise


# -- showing a pause -----------------------------------------------------------------------------------------
def mark_shown(paused: ApprovalRequired) -> None:
    _SHOWN.add(paused)


def was_shown(paused: ApprovalRequired) -> bool:
    return paused in _SHOWN


def show_pause(chat: Conversation | None, paused: ApprovalRequired, namespace: Mapping[str, Any]) -> None:
    """The box for a pause no live display showed (a `resume` that paused again, a typed `submit`), with buttons
    when the conversation is known and `ipywidgets` is installed."""
    from IPython.display import display

    buttons = chat is not None and widgets_available()
    line = resume_line(chat, paused.calls, namespace)
    display(pending_bundle(paused.calls, with_buttons=buttons, resume_line=line), raw=True)
    if chat is not None:
        remember(chat, paused.calls)
        if buttons:
            display(approval_panel(chat, paused.calls))
    mark_shown(paused)


def install_pause_display(shell: Any) -> None:
    """Make an uncaught `ApprovalRequired` in this kernel show as a pause, not a traceback. A handler the user
    set for other exceptions stays (IPython keeps one): pauses then show as tracebacks."""
    if shell is None or getattr(shell, "kernel", None) is None:
        return
    if tuple(getattr(shell, "custom_exceptions", ())) in ((), (ApprovalRequired,)):
        shell.set_custom_exc((ApprovalRequired,), _uncaught_pause)


def _uncaught_pause(shell: Any, etype: type[BaseException], value: BaseException, tb: Any,
                    tb_offset: int | None = None) -> list[str]:
    """IPython's handler for a cell that ended with `ApprovalRequired`: the box if it is not on screen yet."""
    if not isinstance(value, ApprovalRequired) or was_shown(value):
        return []
    try:
        namespace = getattr(shell, "user_ns", {})
        show_pause(conversation_of(value.calls, namespace), value, namespace)
    except Exception as exc:  # the pause must not be lost: IPython would drop this handler and show a traceback
        print(f"⏸ {value} (the approval box failed: {type(exc).__name__}: {exc})", file=sys.stderr)
    return []


# -- buttons ---------------------------------------------------------------------------------------------------
def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def approval_panel(chat: Conversation, calls: Sequence[PendingCall]) -> Any:
    """A row of Run / Decline buttons per waiting call; once every call has an answer, the run resumes and its
    answer shows below the buttons (errors too)."""
    import ipywidgets as widgets

    decisions: dict[str, bool] = {}
    output = widgets.Output()

    def decide(call: PendingCall, decision: bool, row: Any) -> Callable[[Any], None]:
        def on_click(_: Any) -> None:
            decisions[call.id] = decision
            for button in row.children[1:]:
                button.disabled = True
            if len(decisions) == len(calls):
                _resume(chat, decisions, output)

        return on_click

    rows = []
    for call in calls:
        label = widgets.Label(f"{call.name}({cut(compact_json(call.raw_arguments), 80)})")
        row = widgets.HBox([label, widgets.Button(description="Run", button_style="success"),
                            widgets.Button(description="Decline", button_style="danger")])
        row.children[1].on_click(decide(call, True, row))
        row.children[2].on_click(decide(call, False, row))
        rows.append(row)
    return widgets.VBox([*rows, output])


def _resume(chat: Conversation, decisions: dict[str, bool], output: Any) -> None:
    """Resume the run and show its outcome below the buttons. The answer is model text and an error can quote
    it, so both are shown as the live display shows them (`text_bundle`, `error_bundle`), never as Markdown."""
    from IPython.display import display

    with output:
        try:
            answer = str(chat.resume(decisions))
        except ApprovalRequired as paused:  # the resumed run paused again: ask again
            show_pause(chat, paused, notebook_namespace())
        except FunctionaryAgentError as exc:  # a limit, a model failure: said here, not raised into the void
            display(error_bundle(failure_text(exc)), raw=True)
        else:
            display(text_bundle(answer, image_resolver(chat)), raw=True)
