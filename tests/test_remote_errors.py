"""An unreachable or misnamed server fails at once with one line that says what to check; what can recover is
retried. Real sockets on loopback only: a closed port, a TLS handshake against a plain-HTTP server, a listener that
never answers, a server that resets the connection, and the scripted OpenAI-compatible server."""

from __future__ import annotations

import email.utils
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from functionary_agent import Conversation, ModelError, OpenAICompatibleModel
from functionary_agent.errors import ConfigurationError
from tests.openai_server import ScriptedServer, reply

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]
NO_RETRY_BOUND = 3.0  # the default policy's four waits add up to 7.5 s or more: under 3 s means no retry happened


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: the kernel refuses connections to it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fast(base_url: str, **kwargs: Any) -> OpenAICompatibleModel:
    return OpenAICompatibleModel("m", base_url=base_url, retry_initial_delay=0.01, retry_max_delay=0.05, **kwargs)


def cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """The real command line, and the seconds it took."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "functionary_agent.cli", *args], capture_output=True, text=True,
                          timeout=120, env=clean, cwd=ROOT)
    return done, time.perf_counter() - started


def refused(url: str, port: int) -> str:
    where = f"127.0.0.1:{port}"
    return f"cannot reach {url}: connection refused at {where}; is the server running and listening on port {port}?"


# --- what cannot recover fails at once -----------------------------------------------------------------------------


def test_a_closed_port_fails_at_once_with_the_default_retry_policy() -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    model = OpenAICompatibleModel("m", base_url=url)  # max_retries=4: before, 0.5+1+2+4 s of backoff and jitter
    started = time.perf_counter()
    with pytest.raises(ModelError) as info:
        model.complete(HI)
    assert time.perf_counter() - started < NO_RETRY_BOUND
    assert str(info.value) == refused(url, port)


def test_a_conversation_without_a_model_name_fails_at_once_too() -> None:
    """No model name: the model list is asked first (and the context window); each failed after its own retries."""
    port = closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    with Conversation(base_url=url) as chat, pytest.raises(ModelError) as info:
        chat.submit("hi")
    assert time.perf_counter() - started < NO_RETRY_BOUND
    assert str(info.value) == refused(url, port)


def test_the_cli_reports_a_closed_port_in_one_line_within_seconds() -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    _, startup = cli("run", "hi", "--base-url", f"127.0.0.1:{port}/v1")  # refused before any request: startup cost
    done, seconds = cli("run", "hi", "--base-url", url)
    assert done.returncode == 1
    assert done.stderr == f"functionary-agent: error: {refused(url, port)}\n"
    assert seconds < startup + NO_RETRY_BOUND, (seconds, startup)  # before: startup + about 17 s


def test_a_url_without_a_scheme_is_refused_before_any_request_with_the_fix() -> None:
    with pytest.raises(ConfigurationError) as info:
        Conversation(base_url="localhost:8000/v1")
    assert str(info.value) == (
        "the server URL 'localhost:8000/v1' has no http:// or https://; did you mean 'http://localhost:8000/v1'?"
    )
    done, _ = cli("run", "hi", "--base-url", "localhost:8000/v1")
    assert done.returncode != 0  # 1 today; whether a bad --base-url is a usage error (2) is the CLI's to decide
    assert done.stderr == f"functionary-agent: error: {info.value}\n"


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("127.0.0.1:8000/v1", "has no http:// or https://; did you mean 'http://127.0.0.1:8000/v1'?"),
        ("ftp://127.0.0.1:8000/v1", "must start with http:// or https://"),
        ("http:///v1", "names no host"),
        ("http://127.0.0.1:99999/v1", "has an invalid port; ports are 1 to 65535"),  # before: an ExceptionGroup
        ("http://127.0.0.1:0/v1", "has an invalid port"),
        ("http://127.0.0.1:80a/v1", "has an invalid port"),
        ("http://local host:8000/v1", "contains blanks"),
    ],
)
def test_urls_that_cannot_work_are_refused_by_the_constructor(base_url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^the server URL '{base_url}' .*") as info:
        OpenAICompatibleModel("m", base_url=base_url)
    assert message in str(info.value)


def test_surrounding_blanks_and_a_trailing_slash_are_forgiven() -> None:
    assert OpenAICompatibleModel("m", base_url=" http://127.0.0.1:8000/v1/\n").base_url == "http://127.0.0.1:8000/v1"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="relies on glibc refusing the name without a query")
def test_a_host_name_that_does_not_resolve_fails_at_once() -> None:
    """glibc refuses a name with an empty label before sending any query (checked with strace: no socket but
    nscd's Unix one), so this lookup fails for real without a packet leaving the machine."""
    url = "http://bad..host/v1"
    started = time.perf_counter()
    with pytest.raises(ModelError) as info:
        OpenAICompatibleModel("m", base_url=url).complete(HI)
    assert time.perf_counter() - started < NO_RETRY_BOUND
    assert str(info.value).startswith(f"cannot reach {url}: cannot resolve the host name 'bad..host' (")
    assert str(info.value).endswith("); check its spelling and the network")


def test_https_against_a_plain_http_server_fails_at_once_naming_tls() -> None:
    with ScriptedServer([reply("never")]) as server:
        url = server.base_url.replace("http://", "https://")
        started = time.perf_counter()
        with pytest.raises(ModelError) as info:
            OpenAICompatibleModel("m", base_url=url).complete(HI)
        seconds = time.perf_counter() - started
    assert seconds < NO_RETRY_BOUND
    assert str(info.value).startswith(f"cannot reach {url}: TLS failed (")
    assert str(info.value).endswith("; check https:// against http:// and the server's certificate")
    assert server.requests == []


# --- a 404 from a base URL that misses /v1 -------------------------------------------------------------------------


def not_found(body: dict[str, Any]) -> dict[str, Any]:
    return {"status": 404, "body": {"detail": "Not Found"}}  # what vLLM (FastAPI) answers for an unknown route


def test_a_404_from_a_base_url_without_v1_suggests_it() -> None:
    with ScriptedServer(handler=not_found) as server:
        base = server.base_url.removesuffix("/v1")
        with pytest.raises(ModelError) as info:
            fast(base).complete(HI)
        assert str(info.value) == f"{base} answered 404: Not Found; did you mean {base}/v1?"
        with pytest.raises(ModelError) as info:  # the endpoint pasted as the base URL
            fast(f"{server.base_url}/chat/completions").complete(HI)
        assert str(info.value) == (
            f"{server.base_url}/chat/completions answered 404: Not Found; the URL should stop before "
            f"/chat/completions: did you mean {server.base_url}?"
        )
    assert len(server.requests) == 2  # a 404 is never retried


def test_a_404_from_a_versioned_base_url_gets_no_hint() -> None:
    unknown_model = {"status": 404, "body": {"error": {"message": "The model `m` does not exist."}}}
    with ScriptedServer([unknown_model]) as server, pytest.raises(ModelError) as info:
        fast(server.base_url).complete(HI)
    assert str(info.value) == f"{server.base_url} answered 404: The model `m` does not exist."


# --- what can recover is retried, as configured --------------------------------------------------------------------


@contextmanager
def silent_listener() -> Iterator[tuple[str, list[socket.socket]]]:
    """A server that accepts connections and never answers; yields its base URL and the connections it took."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                taken.append(listener.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", taken
    finally:
        listener.close()
        for connection in taken:
            connection.close()


def test_a_server_that_does_not_answer_in_time_is_retried_then_named() -> None:
    with silent_listener() as (url, taken):
        with pytest.raises(ModelError) as info:
            fast(url, timeout=0.5, max_retries=2).complete(HI)
        assert len(taken) == 3
    assert str(info.value) == (
        f"cannot reach {url}: no answer within 0.5 s; is the server overloaded? (a slow model needs more timeout) "
        "(gave up after 3 attempts)"
    )


def read_request(connection: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = int(lengths[0])
    while len(body) < length:
        body += connection.recv(65536)


@contextmanager
def resetting_server(then: bytes) -> Iterator[str]:
    """Resets (TCP RST) the first connection after reading its request, then answers the next with `then`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        first, _ = listener.accept()
        read_request(first)
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()
        second, _ = listener.accept()
        with second:
            read_request(second)
            second.sendall(then)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_connection_reset_mid_request_is_retried() -> None:
    body = json.dumps(reply("after the reset")["json"]).encode()
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
    with resetting_server(answer % (len(body), body)) as url:
        assert fast(url, timeout=10).complete(HI).content == "after the reset"


@pytest.mark.parametrize(
    "headers",
    [{"retry-after-ms": "400"}, {"Retry-After": "0.4"}],
    ids=["retry-after-ms", "retry-after-seconds"],
)
def test_429_waits_as_long_as_the_server_asks(headers: dict[str, str]) -> None:
    slow_down = {"status": 429, "headers": headers, "body": {"error": {"message": "slow down"}}}
    with ScriptedServer([slow_down, reply("after waiting")]) as server:
        started = time.perf_counter()
        assert fast(server.base_url).complete(HI).content == "after waiting"
    assert time.perf_counter() - started >= 0.4  # the backoff alone would be 0.01 to 0.02 s


def test_retry_after_as_an_http_date_is_honoured() -> None:
    def slow_down_until_two_seconds_from_now(body: dict[str, Any]) -> dict[str, Any]:
        when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
        return {"status": 503, "headers": {"Retry-After": when}, "body": {"error": {"message": "busy"}}}

    replies: list[Callable[[dict[str, Any]], dict[str, Any]]] = [slow_down_until_two_seconds_from_now,
                                                                 lambda body: reply("back")]
    with ScriptedServer(handler=lambda body: replies.pop(0)(body)) as server:
        started = time.perf_counter()
        assert fast(server.base_url).complete(HI).content == "back"
    assert time.perf_counter() - started >= 0.9


def test_the_retry_policy_is_set_on_the_model_a_conversation_uses() -> None:
    down = {"status": 503, "body": {"error": {"message": "down"}}}
    with ScriptedServer([down] * 5) as server:
        with Conversation(fast(server.base_url, max_retries=0)) as chat, pytest.raises(ModelError) as info:
            chat.submit("hi")
        assert str(info.value) == f"{server.base_url} answered 503: down" and len(server.requests) == 1
        with Conversation(fast(server.base_url, max_retries=2)) as chat, pytest.raises(ModelError) as info:
            chat.submit("hi")
        assert str(info.value) == f"{server.base_url} answered 503: down (gave up after 3 attempts)"
        assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_retries": -1}, "max_retries must be a whole number, 0 or more, got -1"),
        ({"max_retries": "3"}, "max_retries must be a whole number, 0 or more, got '3'"),
        ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
        ({"retry_initial_delay": -1.0}, "retry delays must be 0 or more seconds"),
    ],
)
def test_a_retry_policy_that_cannot_work_is_refused(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        OpenAICompatibleModel("m", base_url="http://127.0.0.1:8000/v1", **setting)
