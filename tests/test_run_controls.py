"""Run controls with a scripted model: usage, limits, the failure-loop rule, bounded results, the context budget."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from functionary_agent import (
    ConfigurationError,
    Conversation,
    LimitExceeded,
    Limits,
    MaxTurnsExceeded,
    ModelError,
    Usage,
    UsageLimitExceeded,
)
from functionary_agent._run.repeats import FAILED_BEFORE
from functionary_agent.events import ToolResult
from functionary_agent.testing import ScriptedModel, ScriptedRequest, call


def used(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    details = {"cached_tokens": cached}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "prompt_tokens_details": details}


def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: 21 C"


def test_usage_is_added_up_per_run_and_over_the_conversations_life() -> None:
    model = ScriptedModel([
        {"tool_calls": [call("lookup", {"city": "Oslo"}), call("lookup", {"city": "Rome"})],
         "usage": used(100, 20, 64)},
        {"content": "Oslo 21, Rome 21.", "usage": used(150, 10)},
        {"content": "Bye.", "usage": used(170, 3)},
    ])
    chat = Conversation(model, tools=[lookup])
    chat.submit("Weather in Oslo and Rome?")
    assert chat.last_usage == Usage(requests=2, tool_calls=2, prompt_tokens=250, completion_tokens=30, cached_tokens=64)
    chat.submit("Thanks.")
    assert chat.last_usage == Usage(requests=1, prompt_tokens=170, completion_tokens=3)
    assert chat.usage.to_dict() == {
        "requests": 3, "tool_calls": 2, "prompt_tokens": 420, "completion_tokens": 33, "cached_tokens": 64,
        "total_tokens": 453,
    }
    assert chat.usage.summary() == "3 requests, 2 tool calls, 453 tokens (420 in, 33 out, 64 cached)"


def test_a_server_that_reports_no_usage_still_counts_requests() -> None:
    chat = Conversation(ScriptedModel(["Hi."]))
    chat.submit("Hello")
    assert chat.usage == Usage(requests=1)


@pytest.mark.parametrize(("limits", "name", "requests_sent"), [
    (Limits(max_requests=2), "max_requests", 2),
    (Limits(max_total_tokens=250), "max_total_tokens", 3),
    (Limits(max_tool_calls=3), "max_tool_calls", 2),
])
def test_crossing_a_limit_raises_a_typed_error_and_keeps_every_message(
    limits: Limits, name: str, requests_sent: int
) -> None:
    def busy(request: ScriptedRequest) -> dict[str, Any]:
        turn = len(model.requests)
        if turn == 5:
            return {"content": "Done.", "usage": used(100, 5)}
        return {"tool_calls": [call("lookup", {"city": f"c{turn}"}), call("lookup", {"city": f"d{turn}"})],
                "usage": used(100, 20)}

    model = ScriptedModel(busy)
    chat = Conversation(model, tools=[lookup], limits=limits)
    with pytest.raises(UsageLimitExceeded) as caught:
        chat.submit("Go")
    assert isinstance(caught.value, LimitExceeded)
    assert caught.value.limit == name and name in str(caught.value)
    assert len(model.requests) == requests_sent
    _assert_valid_chat(chat.messages)
    chat.limits = None  # lift the limits (as Conversation(limits=None)): the same conversation goes on
    assert chat.limits == Limits()
    assert chat.submit() == "Done."
    _assert_valid_chat(chat.messages)


def test_calls_past_the_tool_call_budget_are_not_run_and_the_model_is_told() -> None:
    ran: list[str] = []

    def record(city: str) -> str:
        """Record a city."""
        ran.append(city)
        return "ok"

    model = ScriptedModel([
        {"tool_calls": [call("record", {"city": "a"})]},
        {"tool_calls": [call("record", {"city": "b"}), call("record", {"city": "c"})]},
    ])
    chat = Conversation(model, tools=[record], limits=Limits(max_tool_calls=2))
    with pytest.raises(UsageLimitExceeded, match="max_tool_calls=2"):
        chat.submit("Go")
    assert ran == ["a"]
    assert [m["content"] for m in chat.messages[-2:]] == [
        "Error: not run: this run reached its tool-call limit (max_tool_calls=2)"
    ] * 2


def test_max_turns_is_a_limit_too() -> None:
    model = ScriptedModel(lambda request: {"tool_calls": [call("lookup", {"city": str(len(model.requests))})]})
    with pytest.raises(LimitExceeded) as caught:
        Conversation(model, tools=[lookup], max_turns=2).submit("Go")
    assert isinstance(caught.value, MaxTurnsExceeded) and caught.value.limit == "max_turns"


@pytest.mark.parametrize("bad", [
    {"limits": "3"}, {"max_result_chars": 99}, {"max_result_chars": 0}, {"context_window": 0},
    {"context_window": -5}, {"history": "last 10"}, {"max_turns": 0},
])
def test_bad_run_controls_are_refused_at_construction(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Conversation(ScriptedModel([]), **bad)


@pytest.mark.parametrize("bad", [{"max_requests": 0}, {"max_tool_calls": -1}, {"max_total_tokens": 1.5},
                                 {"max_requests": True}])
def test_bad_limits_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(bad))):
        Limits(**bad)


# -- failure loops ---------------------------------------------------------------------------------------------


def test_an_identical_failed_call_is_not_run_again_and_a_turn_of_repeats_asks_for_an_answer() -> None:
    attempts: list[str] = []

    def divide(a: int, b: int) -> float:
        """Divide a by b."""
        attempts.append(f"{a}/{b}")
        return a / b

    same = {"tool_calls": [call("divide", {"a": 1, "b": 0})]}
    reordered = {"tool_calls": [call("divide", '{"b": 0, "a": 1}')]}  # key order does not make a new call
    model = ScriptedModel([same, reordered, "Dividing by zero is undefined."])
    chat = Conversation(model, tools=[divide])
    assert chat.submit("1/0?") == "Dividing by zero is undefined."
    assert attempts == ["1/0"]
    first, second = (m["content"] for m in chat.messages if m["role"] == "tool")
    assert first.startswith("Error: divide raised ZeroDivisionError")
    assert second == f"{first}\n{FAILED_BEFORE}"
    assert [request.tool_choice for request in model.requests] == ["auto", "auto", "none"]


def test_a_changed_call_after_a_failure_runs() -> None:
    attempts: list[int] = []

    def invert(x: int) -> float:
        """1/x."""
        attempts.append(x)
        return 1 / x

    model = ScriptedModel([{"tool_calls": [call("invert", {"x": 0})]}, {"tool_calls": [call("invert", {"x": 2})]},
                           "0.5"])
    assert Conversation(model, tools=[invert]).submit("Go") == "0.5"
    assert attempts == [0, 2]


@pytest.mark.parametrize("fault", [TimeoutError("upstream timed out"), ConnectionError("reset by peer")])
def test_transient_faults_may_be_retried_identically(fault: Exception) -> None:
    attempts: list[int] = []

    def fetch(page: int) -> str:
        """Fetch a page."""
        attempts.append(page)
        if len(attempts) == 1:
            raise fault
        return "page text"

    model = ScriptedModel([{"tool_calls": [call("fetch", {"page": 1})]}] * 2 + ["Got it."])
    assert Conversation(model, tools=[fetch]).submit("Go") == "Got it."
    assert attempts == [1, 1]


def test_a_tool_timeout_is_transient() -> None:
    slow_first = asyncio.Event()

    async def wait_once(n: int) -> str:
        """Wait."""
        if not slow_first.is_set():
            slow_first.set()
            await asyncio.sleep(5)
        return "done"

    chat = Conversation(ScriptedModel([{"tool_calls": [call("wait_once", {"n": 1})]}] * 2 + ["ok"]))
    chat.register(wait_once, timeout=0.2)
    assert chat.submit("Go") == "ok"
    results = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert results == ["Error: wait_once timed out after 0.2 s", "done"]


def test_an_exception_marked_transient_may_be_retried() -> None:
    class Busy(Exception):
        transient = True

    attempts: list[int] = []

    def book(seat: int) -> str:
        """Book a seat."""
        attempts.append(seat)
        if len(attempts) == 1:
            raise Busy("the booking service is busy")
        return "booked"

    model = ScriptedModel([{"tool_calls": [call("book", {"seat": 3})]}] * 2 + ["Booked."])
    assert Conversation(model, tools=[book]).submit("Go") == "Booked."
    assert attempts == [3, 3]


def test_repeats_are_forgotten_between_runs() -> None:
    attempts: list[int] = []

    def flaky(n: int) -> str:
        """Sometimes fails."""
        attempts.append(n)
        raise ValueError("not yet")

    model = ScriptedModel([{"tool_calls": [call("flaky", {"n": 1})]}, "Failed.",
                           {"tool_calls": [call("flaky", {"n": 1})]}, "Failed again."])
    chat = Conversation(model, tools=[flaky])
    chat.submit("Try")
    chat.submit("Try again")
    assert attempts == [1, 1]


# -- bounded results --------------------------------------------------------------------------------------------


def test_long_results_keep_head_and_tail_with_the_conversation_or_tool_bound() -> None:
    def dump(n: int) -> str:
        """A long text."""
        return "H" * 100 + "x" * n + "T" * 100

    model = ScriptedModel([{"tool_calls": [call("dump", {"n": 50_000}), call("short", {"n": 50_000})]}, "ok"])
    chat = Conversation(model, max_result_chars=1_000)
    chat.register(dump)
    chat.register(dump, name="short", max_result_chars=300)
    chat.submit("Go")
    long, short = (m["content"] for m in chat.messages if m["role"] == "tool")
    assert long.startswith("H" * 100) and long.endswith("T" * 100)
    assert "… 49200 characters omitted …" in long and len(long) < 1_100
    assert "… 49900 characters omitted …" in short and len(short) < 400


def test_the_cut_marker_is_the_code_interpreters_word_for_word() -> None:
    from functionary_agent._text import head_and_tail, omitted_marker
    from sandbox.output import omitted_marker as kernel_marker
    from sandbox.output import truncate

    assert omitted_marker(123) == kernel_marker(123)
    text = "a" * 500 + "b" * 500
    assert head_and_tail(text, 200) == truncate(text, 200)


# -- the context budget ------------------------------------------------------------------------------------------


def _assert_valid_chat(messages: list[dict[str, Any]]) -> None:
    """Every assistant call has its tool message right after it, in order."""
    for index, message in enumerate(messages):
        for offset, tool_call in enumerate(message.get("tool_calls") or (), start=1):
            assert messages[index + offset]["role"] == "tool"
            assert messages[index + offset]["tool_call_id"] == tool_call["id"]


def test_older_results_are_elided_in_the_request_only_oldest_first() -> None:
    def page(n: int) -> str:
        """A page of a book."""
        return f"page {n} " + "words " * 1_500

    script = [{"tool_calls": [call("page", {"n": n})]} if n < 4 else "Read." for n in range(1, 5)]
    model = ScriptedModel(script)
    chat = Conversation(model, tools=[page], context_window=8_000)
    assert chat.submit("Read pages 1-3.") == "Read."
    last = model.requests[-1].messages
    results = [m["content"] for m in last if m["role"] == "tool"]
    assert results[0].startswith("[earlier result of page elided to fit the context window")
    assert results[-1].startswith("page 3 ")  # what the model reads now is kept
    _assert_valid_chat(last)
    kept = [m["content"] for m in chat.messages if m["role"] == "tool"]
    assert all(text.startswith("page ") and len(text) > 9_000 for text in kept)  # the conversation keeps all


def test_a_trailing_result_too_big_for_the_window_is_shortened_head_and_tail() -> None:
    model = ScriptedModel([{"tool_calls": [call("big", {})]}, "Summarised."])
    chat = Conversation(model, context_window=2_000, max_result_chars=None)
    chat.register(lambda: "START " + "filler " * 10_000 + " END", name="big")
    assert chat.submit("Summarise.") == "Summarised."
    sent = next(m["content"] for m in model.requests[-1].messages if m["role"] == "tool")
    assert sent.startswith("START") and sent.endswith("END") and "characters omitted" in sent
    assert len(sent) < 6_000


def test_a_request_that_cannot_fit_is_a_clear_model_error_with_nothing_lost() -> None:
    model = ScriptedModel(["never sent"])
    chat = Conversation(model, context_window=256)
    with pytest.raises(ModelError, match="context holds 256"):
        chat.submit("word " * 2_000)
    assert model.requests == [] and chat.messages[-1]["content"].startswith("word")


def test_the_history_hook_picks_what_a_request_sends() -> None:
    seen: list[int] = []

    def last_two(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.append(len(messages))
        return messages[-2:]

    model = ScriptedModel(["one", "two", "three"])
    chat = Conversation(model, system="Be brief.", history=last_two)
    for text in ("a", "b", "c"):
        chat.submit(text)
    assert seen == [2, 4, 6]
    assert [len(request.messages) for request in model.requests] == [2, 2, 2]
    assert len(chat.messages) == 7


def test_an_async_history_hook_works() -> None:
    async def only_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [m for m in messages if m["role"] == "user"]

    model = ScriptedModel(["one", "two"])
    chat = Conversation(model, history=only_user)
    chat.submit("a")
    chat.submit("b")
    assert [m["role"] for m in model.requests[-1].messages] == ["user", "user"]


@pytest.mark.parametrize(("hook", "message"), [
    (lambda messages: 1 / 0, "raised ZeroDivisionError"),
    (lambda messages: "all of them", "must return a list of message dicts"),
    (lambda messages: [{"content": "no role"}], "must return a list of message dicts"),
])
def test_a_broken_history_hook_is_a_model_error_naming_it_and_nothing_is_lost(hook: Any, message: str) -> None:
    chat = Conversation(ScriptedModel(["unused"]), history=hook)
    with pytest.raises(ModelError, match=message) as caught:
        chat.submit("Hello")
    assert "history hook" in str(caught.value) and "lambda" in str(caught.value)
    assert chat.messages == [{"role": "user", "content": "Hello"}]


def test_stream_events_are_unchanged_by_the_controls() -> None:
    model = ScriptedModel([{"tool_calls": [call("lookup", {"city": "Oslo"})], "usage": used(5, 5)}, "Oslo: 21 C."])
    chat = Conversation(model, tools=[lookup], limits=Limits(max_requests=5))
    events = list(chat.stream("Oslo?"))
    assert [e.content for e in events if isinstance(e, ToolResult)] == ["Oslo: 21 C"]
    assert chat.last_usage.requests == 2 and chat.last_usage.tool_calls == 1
    assert json.loads(json.dumps(chat.usage.to_dict()))["total_tokens"] == 10
