"""The one downward seam to a display front end: the notebook registers a hook here, the core calls it.

The core never imports a front end. `functionary_agent.notebook` registers its hook when it is imported (and the
package imports it by itself when IPython is already loaded, so in Jupyter it is always there); `Conversation`
asks `display_hook()` whether to show a run as it happens and how to render itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from functionary_agent.conversation import Content, Conversation


class DisplayHook(Protocol):
    """What a display front end offers the core."""

    def in_notebook(self) -> bool:
        """Whether runs should be shown as they happen (a notebook kernel with a front end)."""
        ...

    def submit(self, conversation: Conversation, content: Content) -> Any:
        """Run `conversation` to its answer, showing it live; returns what `submit` returns."""
        ...

    def markdown(self, conversation: Conversation) -> str:
        """The conversation as Markdown (its `_repr_markdown_`)."""
        ...

    def html(self, conversation: Conversation) -> str:
        """The conversation as HTML (its `_repr_html_`)."""
        ...


_hook: DisplayHook | None = None


def register_display(hook: DisplayHook | None) -> None:
    """Make `hook` the display front end (None: no live display)."""
    global _hook
    _hook = hook


def display_hook() -> DisplayHook | None:
    """The registered display front end, if any."""
    return _hook
