"""The `functionary-agent` command: `run`, `chat`, `batch` and `serve` (`app.py`), the terminal REPL (`repl.py`) and
the reporter that writes untrusted text to a terminal (`terminal.py`) and the batch progress line (`progress.py`). A
front end: it imports the core, never the reverse."""

from functionary_agent.cli.app import main

__all__ = ["main"]
