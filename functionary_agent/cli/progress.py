"""The `batch` command's progress line: done / failed / rate / time left, drawn by rich on a terminal."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from functionary_agent.batch import Record


class TerminalProgress:
    """Done / failed / rate / time left for the command line, drawn by rich on a terminal; with `live` False it
    shows nothing. Call it with each record as it is written."""

    def __init__(self, total: int, *, live: bool, out: TextIO) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self._started = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=Console(file=out),
            )
            self._task = self._bar.add_task("batch", total=total, failed=0, rate="")

    def __enter__(self) -> TerminalProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, record: Record) -> None:
        self.done += 1
        self.failed += record.get("error") is not None
        if self._bar is not None:
            rate = self.done / max(time.perf_counter() - self._started, 1e-9)
            self._bar.update(self._task, advance=1, failed=self.failed, rate=f"{rate:,.1f} items/s")
