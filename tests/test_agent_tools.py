"""Agents as tools: `Conversation.as_tool` runs a configured agent on a fresh copy for each call."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from functionary_agent import ConfigurationError, Conversation
from functionary_agent.testing import ScriptedModel, ScriptedRequest, call


def test_each_call_runs_on_a_fresh_copy_and_concurrent_calls_share_no_history() -> None:
    seen: list[list[str]] = []

    def specialist(request: ScriptedRequest) -> str:
        seen.append([str(m["content"]) for m in request.messages])
        return f"done: {request.messages[-1]['content']}"

    sub = Conversation(ScriptedModel(specialist, delay=0.05), system="You are the specialist.")
    parent_model = ScriptedModel([{"tool_calls": [call("helper", {"task": "A"}), call("helper", {"task": "B"})]},
                                  "Both done."])
    parent = Conversation(parent_model, tools=[sub.as_tool("helper", "Does one task.")])
    assert parent.submit("Do A and B") == "Both done."
    assert sorted(seen) == [["You are the specialist.", "A"], ["You are the specialist.", "B"]]
    assert sorted(m["content"] for m in parent.messages if m["role"] == "tool") == ["done: A", "done: B"]
    assert sub.messages == [{"role": "system", "content": "You are the specialist."}]  # the agent itself unchanged
    tool = parent.tools[0]
    assert tool.parameters["properties"].keys() == {"task"} and tool.description == "Does one task."


def test_the_sub_agents_usage_counts_into_the_callers_run() -> None:
    sub = Conversation(ScriptedModel([{"content": "fact", "usage": {"prompt_tokens": 30, "completion_tokens": 5}}]))
    parent = Conversation(ScriptedModel([
        {"tool_calls": [call("fact_finder", {"task": "find"})], "usage": {"prompt_tokens": 10, "completion_tokens": 2}},
        {"content": "ok", "usage": {"prompt_tokens": 20, "completion_tokens": 1}},
    ]), tools=[sub.as_tool("fact_finder", "Finds facts.")])
    parent.submit("go")
    assert parent.last_usage.requests == 3 and parent.last_usage.tool_calls == 1
    assert (parent.last_usage.prompt_tokens, parent.last_usage.completion_tokens) == (60, 8)


def test_a_failing_sub_agent_is_a_tool_error_for_the_caller() -> None:
    sub = Conversation(ScriptedModel([]))  # no replies: its model fails
    parent = Conversation(ScriptedModel([{"tool_calls": [call("broken", {"task": "x"})]}, "It failed."]),
                          tools=[sub.as_tool("broken", "Always fails.")])
    assert parent.submit("go") == "It failed."
    result = parent.messages[-2]["content"]
    assert result.startswith("Error: broken raised ModelError: ScriptedModel has 0 replies")


class Verdict(pydantic.BaseModel):
    approved: bool
    reason: str


def test_a_typed_sub_agent_answers_with_json() -> None:
    sub = Conversation(ScriptedModel([{"tool_calls": [call("final_result", {"approved": True, "reason": "fine"})]}]))
    parent = Conversation(ScriptedModel([{"tool_calls": [call("reviewer", {"task": "review"})]}, "Approved."]),
                          tools=[sub.as_tool("reviewer", "Reviews.", output_type=Verdict)])
    parent.submit("go")
    assert parent.messages[-2]["content"] == '{"approved":true,"reason":"fine"}'


def test_an_agent_that_calls_itself_stops_at_the_depth_bound() -> None:
    def always_delegate(request: ScriptedRequest) -> dict[str, Any]:
        last = request.messages[-1]
        if last["role"] == "tool":
            return {"content": f"gave up: {last['content']}"}
        return {"tool_calls": [call("myself", {"task": "again"})]}

    agent = Conversation(ScriptedModel(always_delegate))
    agent.register(agent.as_tool("myself", "Delegates to itself.", max_depth=2))
    answer = agent.submit("go")  # depth 0 calls a copy (1), which calls a copy (2), whose call is refused
    assert answer.startswith("gave up: " * 3 + "Error: myself raised LimitExceeded: agents called agents 3 deep")
    assert answer.endswith("the bound is max_depth=2")


def test_bad_agent_tool_settings() -> None:
    class Opaque:
        pass

    agent = Conversation(ScriptedModel([]))
    with pytest.raises(ConfigurationError, match="max_depth"):
        agent.as_tool("a", "b", max_depth=0)
    with pytest.raises(ConfigurationError, match="no JSON schema"):
        agent.as_tool("a", "b", output_type=Opaque)


def test_closing_a_fork_leaves_the_originals_sandbox_running() -> None:
    agent = Conversation(ScriptedModel([]), code_interpreter=True)
    try:
        agent.fork().close()
        python = next(tool for tool in agent.tools if tool.name == "python")
        assert python.execute("print(6 * 7)").strip() == "42"  # type: ignore[attr-defined]
    finally:
        agent.close()
