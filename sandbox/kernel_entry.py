"""The kernel process's main: ipykernel, with output bounded before it is sent.

Truncating in the parent is not enough: a cell that prints 1 GB would still push 1 GB through ZeroMQ and JSON
into the parent. So the kernel keeps the head of each stream live, holds only the last part in a bounded buffer,
and at the end of the cell sends "… N characters omitted …" plus that tail. Large text display data is cut the
same way. Run by file path (python kernel_entry.py MAX_CHARS -f CONNECTION_FILE), stdlib and ipykernel only.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    del sys.path[0]  # sandbox/ must not shadow the user's imports (`import output` …)

_MAX_BINARY_CHARS = 32_000_000  # an image bundle larger than this is dropped rather than sent


def _load_output_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_sandbox_output", _HERE / "output.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_output = _load_output_module()


class _StreamLimiter:
    """Wraps one OutStream's write: the first half of the budget goes out live, the rest waits as a tail."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._forward = stream.write
        self._head = limit // 2
        self._tail = limit - limit // 2
        self._lock = threading.Lock()  # ipykernel's fd-watcher thread writes too
        self._buffer = self._fresh()
        stream.write = self.write

    def _fresh(self) -> Any:
        return _output.HeadTail(self._head, self._tail)

    def write(self, text: Any) -> int | None:
        if not isinstance(text, str):
            return int(self._forward(text))  # OutStream raises the right TypeError
        with self._lock:
            live = self._buffer.write(text)
        if live:
            self._forward(live)
        return len(text)

    def start_cell(self) -> None:
        with self._lock:
            self._buffer = self._fresh()

    def end_cell(self) -> None:
        with self._lock:
            buffer, self._buffer = self._buffer, self._fresh()
        rest = buffer.tail_text()
        if buffer.omitted:
            rest = _output.omitted_marker(buffer.omitted) + rest
        if rest:
            self._forward(rest)


def _bound_bundle(data: Any, limit: int) -> Any:
    if not isinstance(data, dict):
        return data
    bounded = {}
    for mime, value in data.items():
        if isinstance(value, str):
            if mime.startswith("text/") and len(value) > limit:
                value = _output.truncate(value, limit)
            elif len(value) > _MAX_BINARY_CHARS:
                continue
        bounded[mime] = value
    return bounded


def _install_limits(shell: Any, limit: int) -> None:
    limiters = [_StreamLimiter(stream, limit) for stream in (sys.stdout, sys.stderr)]
    for limiter in limiters:
        shell.events.register("pre_execute", limiter.start_cell)
        shell.events.register("post_execute", limiter.end_cell)

    publish = shell.display_pub.publish
    shell.display_pub.publish = lambda data, *args, **kw: publish(_bound_bundle(data, limit), *args, **kw)
    write_format = shell.displayhook.write_format_data
    shell.displayhook.write_format_data = lambda data, *args, **kw: write_format(
        _bound_bundle(data, limit), *args, **kw
    )


def main() -> None:
    limit = int(sys.argv.pop(1))
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(sys.argv[1:])
    _install_limits(app.shell, limit)
    app.start()


if __name__ == "__main__":
    main()
