"""Where the notebook front end runs: the IPython shell, whether it is a Jupyter kernel, and its global names.

IPython is never imported here: if no one has loaded it, no kernel runs, and plain Python never needs it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


def in_notebook() -> bool:
    """True inside a running Jupyter kernel (JupyterLab, Notebook, VS Code, Colab); False in plain Python and in
    terminal IPython, whose screen cannot show HTML. Never imports IPython: if it is not loaded, no kernel runs."""
    shell = ipython_shell()
    return shell is not None and getattr(shell, "kernel", None) is not None


def ipython_shell() -> Any:
    """The running IPython shell (None when IPython is not loaded or no shell runs)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython() if get_ipython is not None else None


def notebook_namespace() -> Mapping[str, Any]:
    """The notebook's global names (empty outside IPython)."""
    namespace = getattr(ipython_shell(), "user_ns", None)
    return namespace if isinstance(namespace, Mapping) else {}
