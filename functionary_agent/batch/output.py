"""The batch's output file: `BatchOutput` reads what an earlier run wrote (resume), appends one whole line per
`Record` and holds the lock that lets one run at a time write it; `refuse_output_as_input` keeps the results out
of the input file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from functionary_agent.batch.items import BatchItem
from functionary_agent.errors import ConfigurationError

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, one run per output file is then up to the user
    fcntl = None  # type: ignore[assignment]

Record = dict[str, Any]  # one line of the output: {"id", "answer", "error", "usage", "seconds", "messages"}


def refuse_output_as_input(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str]) -> None:
    """`ConfigurationError` when the output names the input file, by any name (a link, another path): the run
    would read its own items as answered results. Compared by file identity, not by name."""
    try:
        same = os.path.samefile(input_path, output_path)
    except OSError:  # one of them does not exist (yet): not the same file
        return
    if same:
        suggestion = Path(input_path).with_name(Path(input_path).stem + ".answers.jsonl")
        alias = "" if str(output_path) == str(input_path) else f" (the same file as {input_path})"
        raise ConfigurationError(
            f"--output {output_path} is the batch input{alias}; give the results a file of their own, e.g. "
            f"--output {suggestion}"
        )


class BatchOutput:
    """The batch's output JSONL: read when opened (a half-written last line is cut away), then appended to a whole
    line at a time by `write`. Use as a context manager.

    One run at a time: opening takes an exclusive lock on `lock_path` (the output's name + ".lock", beside it) and
    holds it until the block ends, the rewrite that drops retried failures included. The lock file is never
    replaced or removed (the output is, by that rewrite), so every run contends for the same file; it is empty and
    stays after the run. `answered` and `failed` count this run's lines; `cut_bytes` is what opening cut off a
    killed run's last line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.answered = self.failed = self.cut_bytes = 0
        self._file: Any = None
        self._lock: int | None = None  # the lock file's descriptor while this run holds it
        self._lines: list[tuple[str, bool, bytes]] = []  # (id key, answered?, the line) as read on open
        self._answered_keys: set[str] = set()

    def __enter__(self) -> BatchOutput:
        self._lock = _hold_lock(self.lock_path, self.path)
        try:
            try:
                self._file = open(self.path, "a+b", buffering=0)  # closed in __exit__
            except OSError as exc:
                raise ConfigurationError(f"cannot open batch output {self.path}: {exc.strerror or exc}") from None
            self._read_existing()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        """The output first, then the lock: another run may open the file only once this one is done with it."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def pending(self, items: Iterable[BatchItem]) -> list[BatchItem]:
        """The items still to run: not answered in the file. Lines of earlier failures of these items are removed
        now (atomically), so their new lines do not duplicate them."""
        todo = [item for item in items if item.key not in self._answered_keys]
        retried = {item.key for item in todo}
        kept = [(key, answered, line) for key, answered, line in self._lines if answered or key not in retried]
        if len(kept) < len(self._lines):
            self._rewrite(b"".join(line for _, _, line in kept))
            self._lines = kept
        return todo

    def write(self, record: Record) -> bool:
        """Append one result as one whole line; False (nothing written) when its id is answered in the file
        already, as when a retried Ray shard sends an item again."""
        key = json.dumps(record["id"])
        if key in self._answered_keys:
            return False
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one write() in practice; a short write of a huge line is finished, never interleaved
            view = view[os.write(self._file.fileno(), view) :]
        if record.get("error") is None:
            self._answered_keys.add(key)
            self.answered += 1
        else:
            self.failed += 1
        return True

    def _read_existing(self) -> None:
        self._file.seek(0)
        data = self._file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a run killed mid-write: the partial line goes
            self._file.truncate(end)
            self.cut_bytes, data = len(data) - end, data[:end]
            logger.warning("%s ended in a partial line (%d bytes, from a run killed mid-write): it was cut, and its "
                           "item is asked again", self.path, self.cut_bytes)
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, answered = json.dumps(record["id"]), record.get("error") is None
            except (ValueError, TypeError, KeyError):
                raise ConfigurationError(
                    f"{self.path} line {number} is not a batch result; give another output file or remove the line"
                ) from None
            if "answer" not in record and ("prompt" in record or "messages" in record):
                raise ConfigurationError(
                    f"{self.path} line {number} is a batch input item, not a result (is it the input file?); give "
                    "the results a file of their own"
                )
            self._lines.append((key, answered, line))
            if answered:
                self._answered_keys.add(key)

    def _rewrite(self, content: bytes) -> None:
        """Replace the file's content: written beside it, synced, then renamed over it (the lock file stays)."""
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        replacement = os.fdopen(handle, "a+b", buffering=0)
        try:
            replacement.write(content)
            os.fsync(replacement.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            replacement.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._file.close()
        self._file = replacement


def _hold_lock(lock_path: Path, output: Path) -> int | None:
    """The descriptor of `lock_path`, created if need be and locked for this process (None without `fcntl`);
    `ConfigurationError` when another run holds it or it cannot be opened."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigurationError(f"cannot open batch output {output}: {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigurationError(
            f"{output} is being written by another batch run (it holds {lock_path}); wait for it to finish or "
            "stop it, or give another output file"
        ) from None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor
