"""A remote engine that fails mid-answer (issue 26, item 4), over real HTTP with the real `openai` client: the
scripted server on loopback closes the connection or is killed with SIGKILL mid-stream or mid-body, sends a line that
is not JSON or an error event, answers 429 asking for an hour, stops sending, or sends a tool call whose JSON is cut.
Each fault ends the run with one clear `ModelError` (a finished answer whose arguments are broken goes back to the
model instead); `messages` never keep half an answer, and the next submit works once the server is back."""

from __future__ import annotations

import email.utils
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from functionary_agent import Conversation, ModelError, OpenAICompatibleModel
from functionary_agent.errors import ConfigurationError
from functionary_agent.events import Event, FinalAnswer, TextDelta
from tests.openai_server import ScriptedServer, chunk, function_call, reply

ROOT = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]
HALF = [chunk({"role": "assistant", "content": "Half an ans"})]  # the first chunk of "Half an answer."
DROPPED = "the partial answer was dropped"
NO_RETRY_BOUND = 3.0  # the default policy's four waits add up to 7.5 s or more: under 3 s means no retry happened
CLOSED = {"until_close": True}  # a body framed by closing the connection: a cut looks like a clean end


def fast(url: str, **kwargs: Any) -> OpenAICompatibleModel:
    settings: dict[str, Any] = {"retry_initial_delay": 0.01, "retry_max_delay": 0.05, "timeout": 10, **kwargs}
    return OpenAICompatibleModel("m", base_url=url, **settings)


def port_of(url: str) -> int:
    return int(urlsplit(url).port or 0)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def events_until_error(events: Iterator[Event]) -> tuple[list[Event], ModelError]:
    seen: list[Event] = []
    with pytest.raises(ModelError) as info:
        for event in events:
            seen.append(event)
    return seen, info.value


# --- (a) the server goes away mid-answer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "message"),
    [
        (CLOSED, "the stream from {url} ended after 1 chunk without a finish_reason (the server closed the "
                 "connection mid-answer?); " + DROPPED),
        ({}, "the stream from {url} broke off after 1 chunk: peer closed connection without sending complete "
             "message body (incomplete chunked read); " + DROPPED),
    ],
    ids=["body-framed-by-closing", "chunked"],
)
def test_a_stream_cut_after_its_first_chunk_raises_instead_of_answering_half(
    framing: dict[str, Any], message: str
) -> None:
    """Before: with the body framed by closing, the SDK saw a clean end and "Half an ans" was the final answer."""
    with ScriptedServer([{"sse": HALF, "drop": True, **framing}, reply("not asked")]) as server:
        with pytest.raises(ModelError) as info:
            list(fast(server.base_url).stream(HI))
        assert len(server.requests) == 1  # deltas reached the caller: a retry would repeat them
    assert str(info.value) == message.format(url=server.base_url)


def test_a_conversation_keeps_no_half_answer_and_goes_on_once_the_server_is_back() -> None:
    with ScriptedServer([{"sse": HALF, "drop": True, **CLOSED}]) as server:
        url = server.base_url
        chat = Conversation(fast(url))
        events, error = events_until_error(chat.stream("hi"))
    assert "without a finish_reason" in str(error)
    assert events == [TextDelta("Half an ans")]  # shown as it came, never final
    assert chat.messages == [user("hi")]  # the question stays; no partial assistant message
    with pytest.raises(ModelError, match="connection refused"):  # while the server is down
        chat.submit("still there?")
    with ScriptedServer([reply("A whole answer.")], port=port_of(url)) as back:
        assert chat.submit("again") == "A whole answer."
    chat.close()
    assert chat.messages == [user("hi"), user("still there?"), user("again"),
                             {"role": "assistant", "content": "A whole answer."}]
    assert "Half" not in json.dumps(back.requests[0]["messages"])


def test_a_server_killed_with_sigkill_mid_stream_is_a_clear_error_and_a_restarted_one_answers() -> None:
    stalled = {"sse": HALF, "stall": 60}  # the first chunk, then nothing until the process is killed
    server = subprocess.Popen([sys.executable, "-m", "tests.openai_server", json.dumps([stalled])],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        chat = Conversation(fast(url, timeout=60))
        events = chat.stream("hi")
        assert next(event for event in events if isinstance(event, TextDelta)) == TextDelta("Half an ans")
        os.kill(server.pid, signal.SIGKILL)
        started = time.perf_counter()
        _, error = events_until_error(events)
        assert time.perf_counter() - started < 10  # seen when the connection closed, not after the 60 s timeout
    finally:
        server.kill()
        server.wait(timeout=10)
    assert str(error).startswith(f"the stream from {url} broke off after 1 chunk: peer closed connection")
    assert chat.messages == [user("hi")]
    with ScriptedServer([reply("Restarted and whole.")], port=port_of(url)):
        assert chat.submit("again") == "Restarted and whole."
    chat.close()
    assert [m["role"] for m in chat.messages] == ["user", "user", "assistant"]


@pytest.mark.parametrize(
    ("framing", "message"),
    [
        ({}, "the answer from {url} broke off: peer closed connection without sending complete message body "
             "(received 40 bytes, expected {size})"),
        (CLOSED, "{url} answered with a body that is not valid JSON (Unterminated string starting at, character "
                 "{at}): {start!r}; the server may have died mid-answer, or the URL is not an OpenAI-compatible API"),
    ],
    ids=["content-length", "body-framed-by-closing"],
)
def test_a_server_dying_mid_body_of_a_plain_answer_is_a_clear_error(framing: dict[str, Any], message: str) -> None:
    """Before: the body framed by closing raised json's JSONDecodeError, a traceback to the user."""
    body = json.dumps(reply("A whole answer, cut.")["json"])
    half = {**reply("A whole answer, cut."), "cut_at": 40, **framing}
    with ScriptedServer([half, reply("Back.")]) as server:
        url = server.base_url
        with Conversation(fast(url, max_retries=0)) as chat:
            with pytest.raises(ModelError) as info:
                chat.submit("hi")
            assert chat.messages == [user("hi")]
            assert chat.submit("again") == "Back."
    at = body[:40].rindex('"')
    assert str(info.value) == message.format(url=url, size=len(body), at=at, start=body[:40])


def test_a_plain_answer_cut_mid_body_is_retried_and_used_once() -> None:
    half = {**reply("A whole answer, cut."), "cut_at": 40}
    with ScriptedServer([half, reply("The whole answer.")]) as server, Conversation(fast(server.base_url)) as chat:
        assert chat.submit("hi") == "The whole answer."
        assert len(server.requests) == 2
    assert chat.messages == [user("hi"), {"role": "assistant", "content": "The whole answer."}]


# --- (b) a line that is not JSON, an error event ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("data: {not json\n\n", "{url} sent a stream line that is not JSON after 1 chunk (Expecting property name "
                                "enclosed in double quotes): '{{not json'; " + DROPPED),
        ('data: {"error": {"message": "engine crashed: out of memory"}}\n\n',
         "{url} sent an error mid-stream: engine crashed: out of memory; " + DROPPED),
    ],
    ids=["not-json", "error-event"],
)
def test_a_bad_line_mid_stream_is_one_clear_model_error(line: str, message: str) -> None:
    """Before: a line that is not JSON said "broke off: Expecting property name ..." (json's words, not ours)."""
    stream = {"sse": [*HALF, line, chunk({}, "stop")]}
    with ScriptedServer([stream, reply("Fine.")]) as server, Conversation(fast(server.base_url)) as chat:
        _, error = events_until_error(chat.stream("hi"))
        assert chat.messages == [user("hi")]
        assert chat.submit("again") == "Fine."
    assert str(error) == message.format(url=server.base_url)


# --- (c) a 429 that asks for too long a wait ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "3600"},
        {"retry-after-ms": "3600000"},
        {"Retry-After": "HTTP-DATE"},  # an hour from when the test runs, not from when it was collected
    ],
    ids=["seconds", "milliseconds", "http-date"],
)
def test_a_429_that_asks_for_an_hour_fails_at_once_and_says_so(headers: dict[str, str]) -> None:
    """Before: it waited a minute (a silent cap), retried into the same 429, and so on four times."""
    if headers.get("Retry-After") == "HTTP-DATE":
        headers = {"Retry-After": email.utils.formatdate(time.time() + 3601, usegmt=True)}
    slow_down = {"status": 429, "headers": headers, "body": {"error": {"message": "rate limited"}}}
    with ScriptedServer([slow_down, reply("not asked")]) as server:
        started = time.perf_counter()
        with pytest.raises(ModelError) as info:
            OpenAICompatibleModel("m", base_url=server.base_url).complete(HI)  # the default policy
        assert time.perf_counter() - started < NO_RETRY_BOUND
        assert len(server.requests) == 1
    assert str(info.value).startswith(f"{server.base_url} answered 429: rate limited; it asks to wait ")
    assert str(info.value).endswith(
        " s before retrying, more than max_retry_after=60 s, so it was not retried: try again later"
    )
    assert 3590 <= float(str(info.value).split("asks to wait ")[1].split(" s")[0]) <= 3610


def test_a_wait_within_max_retry_after_is_honoured_and_one_beyond_it_is_not() -> None:
    slow_down = {"status": 429, "headers": {"Retry-After": "1"}, "body": {"error": {"message": "slow down"}}}
    with ScriptedServer([slow_down, reply("After a second.")]) as server:
        started = time.perf_counter()
        assert fast(server.base_url).complete(HI).content == "After a second."
        assert time.perf_counter() - started >= 1.0
    with ScriptedServer([slow_down, reply("not asked")]) as server:
        with pytest.raises(ModelError, match=r"it asks to wait 1 s before retrying, more than max_retry_after=0.5 s"):
            fast(server.base_url, max_retry_after=0.5).complete(HI)
        assert len(server.requests) == 1


def test_a_negative_max_retry_after_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="max_retry_after must be 0 or more seconds, got -1"):
        OpenAICompatibleModel("m", base_url="http://127.0.0.1:8000/v1", max_retry_after=-1)


# --- (d) a server that stops sending --------------------------------------------------------------------------------


def test_a_server_that_stops_sending_mid_stream_times_out_with_a_clear_error() -> None:
    with ScriptedServer([{"sse": HALF, "stall": 30}, reply("Awake again.")]) as server:
        url = server.base_url
        with Conversation(fast(url, timeout=0.5)) as chat:
            started = time.perf_counter()
            _, error = events_until_error(chat.stream("hi"))
            assert time.perf_counter() - started < 10  # the 0.5 s timeout, not the 30 s stall
            assert len(server.requests) == 1
            assert chat.messages == [user("hi")]
            assert chat.submit("again") == "Awake again."
    assert str(error) == (
        f"the stream from {url} stopped: no data for 0.5 s after 1 chunk (is the server overloaded or stuck? a slow "
        f"model needs more timeout); {DROPPED}"
    )


# --- (e) a tool call whose JSON is cut ------------------------------------------------------------------------------


class Deleter:
    """A tool that must not run on a call the server never finished."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete_file(self, path: str) -> str:
        """Delete one file."""
        self.deleted.append(path)
        return f"deleted {path}"


def test_tool_calls_cut_by_the_connection_run_nothing_and_keep_nothing() -> None:
    """Before: the first call (whole) and the second (cut) were both taken as the model's answer and the first ran."""
    whole = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "delete_file", "arguments": '{"path": "/tmp/a.txt"}'}}
    cut = {"index": 1, "id": "call_2", "type": "function",
           "function": {"name": "delete_file", "arguments": '{"path": "/tmp/impor'}}
    stream = {"sse": [chunk({"tool_calls": [whole]}), chunk({"tool_calls": [cut]})], "drop": True, **CLOSED}
    tool = Deleter()
    with ScriptedServer([stream]) as server, Conversation(fast(server.base_url), tools=[tool.delete_file]) as chat:
        _, error = events_until_error(chat.stream("tidy up"))
    assert "ended after 2 chunks without a finish_reason" in str(error)
    assert tool.deleted == []
    assert chat.messages == [user("tidy up")]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_a_finished_answer_whose_tool_call_json_is_cut_goes_back_to_the_model(streamed: bool) -> None:
    """The server finished (here at its token limit): the model wrote bad arguments and can fix them, so it gets a
    tool message that says so and the run goes on; nothing runs on the cut arguments."""
    cut = function_call("delete_file", '{"path": "/tmp/impor', id="call_1")
    answers = [reply(None, [cut], finish_reason="length"), reply("I will send shorter arguments.")]
    tool = Deleter()
    with ScriptedServer(answers) as server, Conversation(fast(server.base_url), tools=[tool.delete_file]) as chat:
        if streamed:
            final = list(chat.stream("tidy up"))[-1]
            assert isinstance(final, FinalAnswer) and final.content == "I will send shorter arguments."
        else:
            assert chat.submit("tidy up") == "I will send shorter arguments."
    assert tool.deleted == []
    note = server.requests[1]["messages"][-1]
    assert note["role"] == "tool" and note["tool_call_id"] == "call_1"
    assert "the arguments are not valid JSON" in note["content"]


def test_the_cli_reports_a_stream_cut_mid_answer_in_one_line_and_exits_1() -> None:
    """The command line over the same fault: one line on stderr, no traceback, and no half answer in --json."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    with ScriptedServer([{"sse": HALF, "drop": True, **CLOSED}]) as server:
        done = subprocess.run(
            [sys.executable, "-m", "functionary_agent.cli", "run", "hi", "--json", "--base-url", server.base_url],
            capture_output=True, text=True, timeout=120, env=clean, cwd=ROOT,
        )
    assert done.returncode == 1
    assert done.stderr == (
        f"functionary-agent: error: the stream from {server.base_url} ended after 1 chunk without a finish_reason "
        f"(the server closed the connection mid-answer?); {DROPPED}\n"
    )
    assert "Half" not in done.stdout
