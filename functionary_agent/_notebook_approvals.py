"""What a notebook shows when a run pauses for approval: the waiting calls, and buttons to answer them when
`ipywidgets` is installed (otherwise the `chat.resume(...)` line to run). Imported only by `notebook`."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from functionary_agent._text import compact_json, cut
from functionary_agent.models.base import ToolCall

if TYPE_CHECKING:
    from functionary_agent.conversation import Conversation

_AMBER = "#b26a00"
_ARGUMENTS_SHOWN = 500


def pending_bundle(calls: Sequence[ToolCall], *, with_buttons: bool) -> dict[str, str]:
    """The box that lists the waiting calls and says how to answer them."""
    lines = [f"{call.name}({cut(compact_json(call.arguments), _ARGUMENTS_SHOWN)})" for call in calls]
    resume = "chat.resume({" + ", ".join(f"{json.dumps(call.id)}: True" for call in calls) + "})"
    how = "Answer with the buttons below, or run:" if with_buttons else "Run (True runs a call, False declines it):"
    plain = "⏸ Waiting for your approval:\n" + "\n".join(f"  {line}" for line in lines) + f"\n{how}\n  {resume}"
    items = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in lines)
    box = (f'<div class="fa-approval" style="margin:4px 0;padding:2px 8px;border-left:3px solid {_AMBER}">'
           f"<b>⏸ Waiting for your approval</b><ul>{items}</ul>{html.escape(how)}<pre>{html.escape(resume)}</pre>"
           "</div>")
    return {"text/html": box, "text/plain": plain}


def widgets_available() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def approval_panel(chat: Conversation, calls: Sequence[ToolCall]) -> Any:
    """A row of Run / Decline buttons per waiting call; once every call has an answer, the run resumes and its
    answer shows below the buttons (errors too)."""
    import ipywidgets as widgets

    decisions: dict[str, bool] = {}
    output = widgets.Output()

    def decide(call: ToolCall, decision: bool, row: Any) -> Callable[[Any], None]:
        def on_click(_: Any) -> None:
            decisions[call.id] = decision
            for button in row.children[1:]:
                button.disabled = True
            if len(decisions) == len(calls):
                _resume(chat, decisions, output)

        return on_click

    rows = []
    for call in calls:
        label = widgets.Label(f"{call.name}({cut(compact_json(call.arguments), 80)})")
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

    from functionary_agent.errors import ApprovalRequired, FunctionaryAgentError
    from functionary_agent.notebook import error_bundle, failure_text, image_resolver, text_bundle

    with output:
        try:
            answer = str(chat.resume(decisions))
        except ApprovalRequired as paused:  # the resumed run paused again: ask again
            display(pending_bundle(paused.calls, with_buttons=True), raw=True)
            display(approval_panel(chat, paused.calls))
        except FunctionaryAgentError as exc:  # a limit, a model failure: said here, not raised into the void
            display(error_bundle(failure_text(exc)), raw=True)
        else:
            display(text_bundle(answer, image_resolver(chat)), raw=True)
