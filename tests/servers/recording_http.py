"""Plain HTTP servers on loopback that record what reaches them, for the credential and redirect tests.

`recording_server(answer)` runs a `ThreadingHTTPServer` on 127.0.0.1 at a free port (each server is its own
origin) and yields a `Recorder`: its `url`, and every request it received (method, path, headers in lower case,
body). `answer(request)` says what to send back; by default 200 with a short text body.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Recorder:
    url: str = ""
    requests: list[Received] = field(default_factory=list)

    def header_values(self, name: str) -> list[str | None]:
        return [r.headers.get(name.lower()) for r in self.requests]


def _default_answer(request: Received) -> Answer:
    return 200, {"Content-Type": "text/plain"}, b"answer from " + request.path.encode()


@contextlib.contextmanager
def recording_server(answer: Callable[[Received], Answer] = _default_answer) -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = Received(self.command, self.path, headers, self.rfile.read(length) if length else b"")
            recorder.requests.append(request)
            status, extra, body = answer(request)
            self.send_response(status)
            for name, value in {"Content-Length": str(len(body)), **extra}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def redirect(location: str, status: int = 302) -> Answer:
    return status, {"Location": location, "Content-Type": "text/plain"}, b"moved"
