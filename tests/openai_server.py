"""A small OpenAI-compatible HTTP server on loopback, scripted by the tests.

Real HTTP, real SSE, real dropped connections: the `openai` client in our remote model talks to it exactly as it
would to vLLM or llama.cpp. Each request takes the next scripted action:

- `reply(...)` / `{"json": body}`: a 200 JSON chat completion (`"cut_at": n` sends only its first n bytes, then
  closes the connection, as a server killed mid-body);
- `{"sse": [chunk, ...]}`: a 200 event stream (optionally `"drop": True` to cut it after the chunks, with no
  `[DONE]`; `"stall": seconds` to send nothing more for that long after the chunks, as a stuck server); a chunk
  that is a `str` is sent as it is (`"data: {not json\n\n"`);
- `{"status": 500, "body": {...}, "headers": {...}}`: an error response;
- `{"drop": True}`: close the connection without answering.

`"until_close": True` on a JSON or SSE answer frames its body by closing the connection (no content-length, no
chunked encoding), as simple servers and some proxies do: a client then sees a cut as a clean end of the body.
`ScriptedServer(port=...)` listens on a given port (a server "back" after it died); `python -m tests.openai_server
ACTIONS_JSON` runs one in its own process (prints its base URL, serves until killed).

A request whose body is cut short (its client was killed after sending the headers) is neither recorded in
`requests` nor handed to the handler or the script: it is noted in `cut_requests` (path, bytes announced, bytes
received) and its connection closed, as a real server drops a request it never fully received.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Action = dict[str, Any]


def reply(
    content: str | None = None, tool_calls: Iterable[dict[str, Any]] = (), finish_reason: str | None = None
) -> Action:
    calls = list(tool_calls)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    default_finish = "tool_calls" if calls else "stop"
    if calls:
        message["tool_calls"] = calls
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason or default_finish}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return {"json": body}


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def as_chunks(completion: dict[str, Any], include_usage: bool = False) -> list[dict[str, Any]]:
    """A JSON chat completion as the stream chunks a server would send for it; with `include_usage` (the client's
    `stream_options`) a last chunk with no choices carries the usage, as OpenAI and vLLM send it."""
    choice = completion["choices"][0]
    message = choice["message"]
    chunks = [chunk({"role": "assistant", "content": message.get("content") or ""})]
    for index, call in enumerate(message.get("tool_calls") or []):
        head = {**call, "index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
        chunks.append(chunk({"tool_calls": [head]}))
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 7):
            piece = {"index": index, "function": {"arguments": arguments[start : start + 7]}}
            chunks.append(chunk({"tool_calls": [piece]}))
    chunks.append(chunk({}, choice["finish_reason"]))
    if include_usage and completion.get("usage"):
        chunks.append({**chunk({}), "choices": [], "usage": completion["usage"]})
    return chunks


def function_call(name: str, arguments: str, id: str = "call_test") -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


class ScriptedServer:
    """Start with `with ScriptedServer(actions) as server:`; `server.base_url` ends in /v1."""

    def __init__(
        self,
        actions: Iterable[Action] = (),
        handler: Callable[[dict[str, Any]], Action] | None = None,
        model_card: dict[str, Any] | None = None,
        port: int = 0,
    ):
        self.model_card = {"id": "test-model", "object": "model", **(model_card or {})}  # what GET /models lists
        self.actions = list(actions)
        self.handler = handler
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.cut_requests: list[tuple[str, int, int]] = []  # (path, content-length, bytes received)
        self._lock = threading.Lock()
        self.closing = threading.Event()  # ends the stalls of scripted answers when the server stops
        self._httpd = _LoopbackServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def note_cut_request(self, path: str, announced: int, received: int) -> None:
        with self._lock:
            self.cut_requests.append((path, announced, received))

    def next_action(self, body: dict[str, Any], headers: dict[str, str]) -> Action:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            if self.handler is not None:
                return self.handler(body)
            if not self.actions:
                return {"status": 500, "body": {"error": {"message": "the test server ran out of scripted replies"}}}
            return self.actions.pop(0)


class _LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 1024  # benchmarks open hundreds of connections at once; the default backlog is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, or it stopped reading) is no error of the server's; others print."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"scripted": server})


class _Handler(BaseHTTPRequestHandler):
    """Serves one ScriptedServer (`scripted`, set by `_make_handler`)."""

    scripted: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [self.scripted.model_card]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        try:
            data = self.rfile.read(length)
        except ConnectionError:
            data = b""
        if len(data) < length:  # the client died between its headers and its body (a killed worker)
            self.scripted.note_cut_request(self.path, length, len(data))
            self.close_connection = True
            return
        try:
            body = json.loads(data or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "request body is not JSON"}})
            return
        action = self.scripted.next_action(body, {k.lower(): v for k, v in self.headers.items()})
        if body.get("stream") and "json" in action:  # a scripted reply, asked for as a stream
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            action = {"sse": as_chunks(action["json"], include_usage=usage)}
        if "sse" in action:
            try:
                self._send_sse(action)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Ctrl-C, a test)
                self.close_connection = True
        elif action.get("drop"):
            self.close_connection = True
        elif "json" in action and ("cut_at" in action or action.get("until_close")):
            self._send_json_framed_or_cut(action)
        elif "json" in action:
            self._send_json(200, action["json"])
        else:
            self._send_json(action["status"], action.get("body", {}), action.get("headers", {}))

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_json_framed_or_cut(self, action: Action) -> None:
        """A JSON answer cut after `cut_at` bytes (the server died mid-body), or framed by closing the connection."""
        data = json.dumps(action["json"]).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        if not action.get("until_close"):
            self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: action.get("cut_at", len(data))])
        self.wfile.flush()
        self.close_connection = True

    def _send_sse(self, action: Action) -> None:
        drop, until_close = bool(action.get("drop")), bool(action.get("until_close"))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        if not until_close:
            self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        events = [c if isinstance(c, str) else f"data: {json.dumps(c)}\n\n" for c in action["sse"]]
        for event in events:
            self._send_event(event, until_close)
        if action.get("stall"):  # a stuck server: the connection stays open, nothing more comes
            self.scripted.closing.wait(float(action["stall"]))
        if not drop:
            self._send_event("data: [DONE]\n\n", until_close)
        if drop or until_close:  # cut mid-stream (no terminating chunk), or the end of a body framed by closing
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def _send_event(self, event: str, until_close: bool) -> None:
        data = event.encode()
        self.wfile.write(data if until_close else f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def main(argv: list[str]) -> None:
    """`python -m tests.openai_server ACTIONS_JSON [PORT]`: serve the actions until killed; prints the base URL."""
    actions = json.loads(argv[0]) if argv else []
    with ScriptedServer(actions, port=int(argv[1]) if len(argv) > 1 else 0) as server:
        print(server.base_url, flush=True)
        threading.Event().wait()  # until the process is killed


if __name__ == "__main__":
    main(sys.argv[1:])
