"""Run controls with the real bundled model and the real code interpreter: the loops and context overflows a
small model actually produces, run to an answer."""

from __future__ import annotations

import pytest

from functionary_agent import Conversation

pytestmark = pytest.mark.slow


def test_a_small_model_that_repeats_failing_code_is_stopped_and_answers() -> None:
    chat = Conversation(code_interpreter=True)
    try:
        answer = chat.submit("Compute 2**100 with Python.")
    finally:
        chat.close()
    assert isinstance(answer, str)
    assert chat.last_usage.requests <= 4
    assert chat.messages[-1]["role"] == "assistant" and not chat.messages[-1].get("tool_calls")


def test_a_30_kb_result_then_more_questions_all_fit_the_context() -> None:
    def read_log() -> str:
        """Read the server's request log."""
        lines = (f"12:{i % 60:02d}:00 INFO request {i} served in {i % 7} ms by worker {i % 4}" for i in range(600))
        return "\n".join(lines)

    assert len(read_log()) > 30_000
    chat = Conversation(tools=[read_log], max_tokens=200)
    questions = ["Read the server log.", "What is the capital of France?", "Name a colour.", "What is 2 plus 2?"]
    answers = [chat.submit(question) for question in questions]
    assert all(isinstance(answer, str) for answer in answers)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == questions
    result = next(m["content"] for m in chat.messages if m["role"] == "tool")
    assert len(result) < 21_000 and "characters omitted" in result  # bounded by the conversation's default
