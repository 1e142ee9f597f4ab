"""What one execution produced, and the text the model reads about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .output import truncate


@dataclass(frozen=True)
class CellError:
    """An exception raised by the executed code; `traceback` is plain text (ANSI codes removed).

    Attributes:
        ename: The exception's class name (e.g. "ZeroDivisionError").
        evalue: The exception's message.
        traceback: The traceback as the kernel formatted it, one text without ANSI colour codes.
    """

    ename: str
    evalue: str
    traceback: str


@dataclass
class ExecutionResult:
    """Everything one `execute` call saw. Faults of the code (errors, timeouts, a dead kernel) live here.

    `images` and `files` are paths on the host; `to_model_text` shows them as the code sees them
    (under /mnt/data when that mount exists).

    Attributes:
        stdout: What the code printed to standard output (head and tail kept past `max_chars`).
        stderr: What the code printed to standard error (head and tail kept past `max_chars`).
        result: The text form (`text/plain`) of the cell's last expression value; None when it has none.
        data: Every non-image form of that value by MIME type ("text/plain", "text/html", ...); empty when the
            cell has no value.
        displays: The texts of displayed outputs that are not images (`display(...)`), in order.
        error: The exception the code raised; None when it raised none.
        images: The images the cell displayed (a plot, say), saved as files in the workdir on the host.
        files: The files in the workdir that the cell created or changed (images left out), as host paths;
            always empty for a gateway's kernel.
        timed_out: Whether the cell ran past its timeout (it was interrupted, or its kernel restarted).
        restarted: Whether the kernel was replaced during or before this execution (variables are lost).
        kernel_died: Whether the kernel died (or, on a gateway, was lost) while the cell ran.
        memory_exceeded: Whether the sandbox went over its memory cap and was killed, while the cell ran or since
            the last one (local kernels only).
        overflowed: Whether the kernel sent more output than the host accepts, so it was restarted.
        notes: What the sandbox did or noticed (a timeout, a restart, output left out), one sentence each.
        execution_count: The kernel's count for this cell; None when the kernel reported none.
        duration: Seconds the execution took on the host (a restart of a dead kernel included).
        workdir: The workdir's path on the host; None when no engine filled it in.
        visible_workdir: The workdir's path as the code names it ("/mnt/data" when mounted there); None when
            no engine filled it in.
        max_chars: The bound on each output, in characters (the sandbox's `max_output_chars`).
    """

    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    displays: list[str] = field(default_factory=list)
    error: CellError | None = None
    images: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    timed_out: bool = False
    restarted: bool = False
    kernel_died: bool = False
    memory_exceeded: bool = False  # the sandbox went over its memory cgroup's cap and was killed (see notes)
    overflowed: bool = False  # the kernel sent more than the host accepts; it was restarted (see notes)
    notes: list[str] = field(default_factory=list)
    execution_count: int | None = None
    duration: float = 0.0
    workdir: Path | None = None
    visible_workdir: str | None = None
    max_chars: int = 20_000

    @property
    def ok(self) -> bool:
        """True when the code ran to completion without an exception."""
        return self.error is None and not self.timed_out and not self.kernel_died and not self.overflowed

    def visible_path(self, path: Path) -> str:
        """The path as the code inside the kernel names it."""
        if self.workdir is not None and self.visible_workdir is not None:
            try:
                return str(Path(self.visible_workdir) / path.relative_to(self.workdir))
            except ValueError:
                pass
        return str(path)

    def to_model_text(self) -> str:
        """One string for the model: output, result, error, saved files, then what the sandbox did."""
        parts = [text.rstrip("\n") for text in (self.stdout, self.stderr, *self.displays) if text.strip()]
        if self.result is not None:
            parts.append(self.result)
        if self.error is not None:
            parts.append(self.error.traceback or f"{self.error.ename}: {self.error.evalue}")
        parts += [f"[image saved: {self.visible_path(p)}]" for p in self.images]
        if self.files:
            parts.append("[files written: " + ", ".join(self.visible_path(p) for p in self.files) + "]")
        parts += [f"[{note}]" for note in self.notes]
        text = "\n".join(parts) if parts else "[no output]"
        return truncate(text, self.max_chars + 1_000)
