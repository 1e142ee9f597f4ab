"""Turns the iopub messages of one execution into an `ExecutionResult`.

Only messages whose parent is our execute request reach this class (the caller routes by
`parent_header.msg_id`). Streams go through a head+tail buffer again: the kernel already bounds them, this is the
safety net for output that bypasses the kernel-side limiter.
"""

from __future__ import annotations

import binascii
import logging
from typing import Any

from .output import HeadTail, strip_ansi, truncate
from .result import CellError, ExecutionResult
from .workdir import IMAGE_TYPES, ImageSaver

logger = logging.getLogger(__name__)

_SLACK = 256  # room for the kernel's own omission marker, so one cut never becomes two
MAX_IMAGES_PER_CELL = 20  # checked here, on the host: a hostile kernel can publish as many as it likes


class OutputCollector:
    def __init__(self, images: ImageSaver, max_chars: int) -> None:
        half = max_chars // 2 + _SLACK
        self.result = ExecutionResult(max_chars=max_chars)
        self._streams = {"stdout": HeadTail(half, half), "stderr": HeadTail(half, half)}
        self._images = images
        self._max_chars = max_chars
        self._skipped_images = 0

    def add(self, msg: dict[str, Any]) -> bool:
        """Take one message; True once the kernel reports idle (the execution is over)."""
        kind = msg["msg_type"]
        content = msg.get("content", {})
        if kind == "stream":
            self._streams.get(content.get("name"), self._streams["stdout"]).write(content.get("text", ""))
        elif kind == "execute_input":
            self.result.execution_count = content.get("execution_count")
        elif kind == "execute_result":
            self._add_result(content.get("data", {}))
        elif kind in ("display_data", "update_display_data"):
            self._add_display(content.get("data", {}))
        elif kind == "error":
            self._add_error(content)
        elif kind == "status":
            return bool(content.get("execution_state") == "idle")
        return False

    def _save_images(self, data: dict[str, Any]) -> bool:
        saved = False
        for mime in IMAGE_TYPES:
            payload = data.get(mime)
            if not isinstance(payload, str):
                continue
            if len(self.result.images) >= MAX_IMAGES_PER_CELL:
                self._skipped_images += 1
                continue
            try:
                self.result.images.append(self._images.save(mime, payload))
                saved = True
            except (OSError, binascii.Error, ValueError) as exc:
                logger.warning("could not save %s output: %s", mime, exc)
                self.result.notes.append(f"an {mime} output was not saved: {exc}")
        return saved

    def _add_result(self, data: dict[str, Any]) -> None:
        self._save_images(data)
        self.result.data = {mime: value for mime, value in data.items() if mime not in IMAGE_TYPES}
        text = data.get("text/plain")
        if isinstance(text, str):
            self.result.result = truncate(text, self._max_chars + _SLACK)

    def _add_display(self, data: dict[str, Any]) -> None:
        if self._save_images(data):
            return
        text = data.get("text/plain")
        if isinstance(text, str):
            self.result.displays.append(truncate(text, self._max_chars + _SLACK))

    def _add_error(self, content: dict[str, Any]) -> None:
        traceback = strip_ansi("\n".join(content.get("traceback", [])))
        self.result.error = CellError(
            ename=str(content.get("ename", "")),
            evalue=truncate(strip_ansi(str(content.get("evalue", ""))), self._max_chars + _SLACK),
            traceback=truncate(traceback, self._max_chars + _SLACK),
        )

    def finish(self) -> ExecutionResult:
        self.result.stdout = self._streams["stdout"].getvalue()
        self.result.stderr = self._streams["stderr"].getvalue()
        if self._skipped_images:
            self.result.notes.append(
                f"{self._skipped_images} more images were not saved (at most {MAX_IMAGES_PER_CELL} per execution)"
            )
        return self.result
