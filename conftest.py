"""Executes the Python examples in docs/ and README.md with Sybil, so the docs cannot drift from the code.

Each ```python block runs in order in one namespace per page, in a fresh temporary folder (the page's working
directory), with no FUNCTIONARY_* variables from the environment. A block that cannot run here (it needs a GPU, a
server or a cluster) is marked just before it with `<!-- skip: next "why" -->`; set-up a reader does not need to
see goes in `<!-- invisible-code-block: python ... -->`. Other fences (bash, json, text) are not run.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from sybil import Sybil
from sybil.parsers.markdown import ClearNamespaceParser, PythonCodeBlockParser, SkipParser


def _enter_a_fresh_folder(namespace: dict[str, Any]) -> None:
    """One temporary working folder per page, and no FUNCTIONARY_* settings leaking in from the environment."""
    folder = tempfile.TemporaryDirectory(prefix="docs-page-")
    environment = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("FUNCTIONARY_"):
            del os.environ[name]
    namespace["__page__"] = (folder, os.getcwd(), environment)
    os.chdir(folder.name)


def _leave_the_folder(namespace: dict[str, Any]) -> None:
    for value in list(namespace.values()):
        close = getattr(value, "close", None)
        if type(value).__name__ in {"Conversation", "KernelSandbox", "SandboxPool"} and callable(close):
            close()
    folder, cwd, environment = namespace.pop("__page__")
    os.chdir(cwd)
    os.environ.clear()  # what a page set or removed does not leak into the next page
    os.environ.update(environment)
    folder.cleanup()


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser(), ClearNamespaceParser()],
    patterns=["docs/*.md", "docs/**/*.md", "README.md"],
    setup=_enter_a_fresh_folder,
    teardown=_leave_the_folder,
).pytest()
