"""Conversations in Jupyter: a live display fed by stream events, and a static rendering of the messages.

In a notebook a run shows up as it happens: the assistant's text as Markdown, each tool call as a collapsible
block that fills in when the call finishes, interpreter images inline, failures in red, a pause for approval as a
pause. Model text is hostile input, so nothing it writes makes the browser send a request, and nothing a tool
returned becomes markup. One job per module:

- `kernel.py`: where we are (the IPython shell, whether it is a notebook kernel, its global names);
- `sandbox_files.py`: reading the conversation's sandbox files (interpreter images) without following links;
- `markdown.py`: the one guarded Markdown renderer, and Markdown no viewer turns into a request;
- `render.py`: a tool call's block, text and error bundles, the static `render_markdown` / `render_html`;
- `display.py`: `LiveDisplay`, one run drawn from its events;
- `approvals.py`: the pause box, its buttons, `resume`, and the kernel's handler that shows a pause;
- `hook.py`: the live `submit` and `NotebookDisplay`, the hook `Conversation` calls through `_display`.

Importing this package registers that hook (the core never imports a front end; `functionary_agent` imports this
package by itself when IPython is already loaded). IPython is imported only when something is displayed, so plain
Python never loads it or needs it.
"""

from __future__ import annotations

from functionary_agent._display import register_display
from functionary_agent.notebook.approvals import install_pause_display, resume
from functionary_agent.notebook.display import LiveDisplay, Show
from functionary_agent.notebook.hook import NotebookDisplay, submit_with_display
from functionary_agent.notebook.kernel import in_notebook, ipython_shell, notebook_namespace
from functionary_agent.notebook.render import (
    Bundle,
    error_bundle,
    failure_text,
    render_html,
    render_markdown,
    text_bundle,
)
from functionary_agent.notebook.sandbox_files import ImageResolver, image_resolver

__all__ = [
    "Bundle",
    "ImageResolver",
    "LiveDisplay",
    "NotebookDisplay",
    "Show",
    "error_bundle",
    "failure_text",
    "image_resolver",
    "in_notebook",
    "notebook_namespace",
    "render_html",
    "render_markdown",
    "resume",
    "submit_with_display",
    "text_bundle",
]


def _install_at_import() -> None:
    """Register the notebook's display hook; in a kernel, a pause shows as a pause from the first `submit`, typed
    ones (not displayed live) included."""
    register_display(NotebookDisplay())
    if in_notebook():
        install_pause_display(ipython_shell())


_install_at_import()
