"""The `python` tool's code phase: a model's cell is cleaned to its Python before the kernel sees it.

Pure tests of `clean_cell` for each shape models write (fences, prose around or after code, prose alone, English
that parses, a cut-off last line, a JSON wrapper), then the real loop: a scripted model sends those cells through
`Conversation(code_interpreter=...)` to a real sandboxed kernel, whose input history shows what it was sent.
"""

from __future__ import annotations

import ast
from typing import Any

import pytest

from functionary_agent import Conversation
from functionary_agent._run.code_cell import clean_cell
from functionary_agent._run.interpreter import PythonTool
from functionary_agent.events import ToolResult
from functionary_agent.testing import ScriptedModel, call

FENCED = "Here is the code:\n```python\ntotal = sum(i * i for i in range(1, 11))\nprint(total)\n```\nIt prints 385."


@pytest.mark.parametrize(
    ("cell", "code", "note_has"),
    [
        ("```python\nx = 2\nprint(x)\n```", "x = 2\nprint(x)", "fence"),
        ("```\nprint('plain fence')\n```", "print('plain fence')", "fence"),
        ("~~~py\nprint(3)\n~~~", "print(3)", "fence"),
        (FENCED, "total = sum(i * i for i in range(1, 11))\nprint(total)", "'Here is the code:'"),
        ("```python\nprint(1)\n```\n```bash\npip install x\n```\n```python\nprint(2)\n```", "print(1)\nprint(2)", "2 "),
        ("```python\nprint('cut off by max_tokens')", "print('cut off by max_tokens')", "fence"),
        ("print(1)```\nthat prints one", "print(1)", "'that prints one'"),
        ("20\n```\n\nThe 20th Fibonacci number is 6765.", "20", "'The 20th Fibonacci number is 6765.'"),
    ],
)
def test_fenced_code_is_taken_and_the_text_around_it_named(cell: str, code: str, note_has: str) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.runs and cleaned.code == code
    assert note_has in cleaned.note and "\n" not in cleaned.note


@pytest.mark.parametrize(
    ("cell", "code", "note_has"),
    [
        ("x = 3\nprint(x * 2)\nThe output will be 6, the double of 3.", "x = 3\nprint(x * 2)", "text after the code"),
        ("import math\nprint(math.sqrt(16))\nDone", "import math\nprint(math.sqrt(16))", "'Done'"),
        ("x = 1; Done", "x = 1", "'Done'"),
        ("Sure! Let's compute it.\nprint(2 ** 10)", "print(2 ** 10)", "text before the code"),
        ("To reverse it:\n    s = 'agent'\n    print(s[::-1])", "s = 'agent'\nprint(s[::-1])", "'To reverse it:'"),
        ("python\nprint('tag without backticks')", "print('tag without backticks')", "'python'"),
        (">>> x = 2\n>>> x * 3\n6", "x = 2\nx * 3", ">>> prompts"),
    ],
)
def test_prose_before_and_after_unfenced_code_is_left_out(cell: str, code: str, note_has: str) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.runs and cleaned.code == code
    assert note_has in cleaned.note and "\n" not in cleaned.note


@pytest.mark.parametrize(
    "cell",
    [
        "x = 1\nprint(x)\nfor i in range(3):",  # cut off after a block's header
        "x = 1\nprint(x)\nprint(x",  # cut off inside a call
        "x = 1\nprint(x)\nrows = [\n  1,\n  2,",  # cut off inside a list spanning lines
    ],
)
def test_an_unfinished_last_statement_is_left_out_and_named(cell: str) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.code == "x = 1\nprint(x)"
    assert "unfinished last statement" in cleaned.note


@pytest.mark.parametrize(
    ("cell", "code"),
    [
        ('{"code": "print(2 + 2)"}', "print(2 + 2)"),
        ('{"code": "```python\\nprint(5)\\n```"}', "print(5)"),
        ('{"code": "print(2 + 2)', "print(2 + 2)"),  # the closing quote and brace cut off
    ],
)
def test_a_json_wrapper_sent_as_the_code_is_unwrapped(cell: str, code: str) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.code == code and "wrapper" in cleaned.note


@pytest.mark.parametrize(
    "cell",
    [
        "Sure! I can help with that.",
        "The sum of squares from 1 to 10 is 385.",
        "Here's how: first square each number, then add them up.",
        # English that parses as Python: a capitalised word, words joined by keywords, a bare annotation
        "Done",
        "Thanks",
        "not sure",
        "yes or no",
        "this is it",
        "Answer: 385",
        "Note: see above",
        "# only a comment",
        "```python\n```",
    ],
)
def test_a_cell_with_no_python_is_refused_with_what_to_send(cell: str) -> None:
    cleaned = clean_cell(cell)
    assert not cleaned.runs and cleaned.code == ""
    assert cleaned.refusal.startswith("Error: the python cell was not run")
    assert "Send only Python source" in cleaned.refusal and "normal message" in cleaned.refusal


@pytest.mark.parametrize(
    "cell",
    [
        "print(1)",
        "total",  # a lone lowercase name shows a variable: code
        "42",
        "X",
        "df.head()",
        "def f(x):\n    return x + 1\n\nf(2)",
        "# square it\nprint(3 ** 2)",
        "not_done = False\nnot not_done",
        "items = ['```python']\nprint(len(items))",
    ],
)
def test_clean_code_is_sent_as_written_without_a_note(cell: str) -> None:
    cleaned = clean_cell(cell)
    assert (cleaned.code, cleaned.note, cleaned.refusal) == (cell, "", "")


def test_a_syntax_error_inside_code_is_refused_with_the_parser_message() -> None:
    cleaned = clean_cell("```python\nfor i in range(3):\n```")
    assert not cleaned.runs and "line 1: expected an indented block" in cleaned.refusal
    assert "unfinished" not in cleaned.note


@pytest.mark.parametrize(
    "cell",
    [
        "x = 1\nprint(x))\ny = 2",  # an extra bracket
        "total = 0\nfor i in range(3)\n    total += i",  # a missing colon
        "print(x))",
    ],
)
def test_code_with_a_typo_is_sent_whole_so_the_kernel_reports_the_syntax_error(cell: str) -> None:
    cleaned = clean_cell(cell)
    assert (cleaned.code, cleaned.note, cleaned.refusal) == (cell, "", "")  # never half a cell that runs quietly


def test_a_huge_cell_is_bounded_and_sent_as_written() -> None:
    cell = "\n".join(["x = 1"] * 2000 + ["print(x"])
    cleaned = clean_cell(cell)
    assert cleaned.runs and cleaned.code == cell  # not searched line by line: the kernel reports the error


# --- the real loop: scripted model, real sandboxed kernel -----------------------------------------------------


def python(code: str, id: str) -> dict[str, Any]:
    return {"tool_calls": [call("python", {"code": code}, id=id)]}


def _run(cells: list[str], code_phase: bool = True) -> tuple[dict[str, ToolResult], list[str]]:
    """Send `cells` through a conversation with a real kernel; the tool results and the kernel's input history."""
    model = ScriptedModel([python(cell, id=f"c{n}") for n, cell in enumerate(cells)] + ["finished"])
    with Conversation(model, code_interpreter={"timeout": 30}) as chat:
        tool = next(t for t in chat.tools if isinstance(t, PythonTool))
        tool.code_phase = code_phase
        events = list(chat.stream("compute"))
        history = tool.sandbox.execute("print(repr(_ih[1:]))").stdout
    results = {e.id: e for e in events if isinstance(e, ToolResult)}
    return results, [cell for cell in ast.literal_eval(history) if "_ih" not in cell]


def test_a_fenced_cell_with_prose_runs_as_code_and_the_note_says_what_was_left_out() -> None:
    results, history = _run([FENCED, "print(total + 1)"])
    assert not results["c0"].is_error
    first_line, note = results["c0"].content.split("\n")
    assert first_line == "385"
    assert note.startswith("[code phase:") and "'Here is the code:'" in note
    assert results["c1"].content == "386"  # the cleaned cell ran in the stateful kernel
    assert history == ["total = sum(i * i for i in range(1, 11))\nprint(total)", "print(total + 1)"]


def test_a_prose_cell_is_refused_and_never_reaches_the_kernel() -> None:
    results, history = _run(["Done", "The sum of squares is 385.", "x = 6\nprint(x * 7)\nThe output is 42."])
    for refused in ("c0", "c1"):
        assert results[refused].is_error
        assert results[refused].content.startswith("Error: the python cell was not run")
    assert results["c2"].content.split("\n")[0] == "42"
    assert history == ["x = 6\nprint(x * 7)"]  # the kernel saw only the Python


def test_without_the_code_phase_a_fenced_cell_dies_on_a_syntax_error() -> None:
    """The failure the phase removes, shown on the same kernel: the cell as the model wrote it does not parse."""
    results, _ = _run([FENCED], code_phase=False)
    assert results["c0"].is_error and "SyntaxError" in results["c0"].content


def test_calling_the_tool_directly_cleans_the_cell_too() -> None:
    tool = PythonTool.start({"timeout": 30})
    try:
        assert tool.execute("```python\nprint(6 * 7)\n```").split("\n")[0] == "42"
        assert tool.execute("Sure").startswith("Error: the python cell was not run")
    finally:
        tool.sandbox.close()


@pytest.mark.parametrize(
    ("cell", "imported"),
    [
        ("print(math.sqrt(1764))", ["math"]),
        ("print(mean([4, 8]))\nprint(sqrt(16))", ["mean", "sqrt"]),
        ("x = np.arange(3)\nprint(statistics.median(x))", ["np", "statistics"]),
    ],
)
def test_a_module_or_function_used_without_its_import_is_imported_where_the_kernel_lacks_it(
    cell: str, imported: list[str]
) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.code.endswith(cell)
    assert all(f"try: {name}\nexcept NameError: " in cleaned.code for name in imported)
    assert f"imported {', '.join(imported)} where the kernel lacks it" in cleaned.note


@pytest.mark.parametrize(
    "cell",
    ["import math\nprint(math.pi)", "def mean(v):\n    return 1\nprint(mean([1]))", "from math import sqrt\nsqrt(4)",
     "for sqrt in range(3):\n    print(sqrt)", "print(len('x'))",
     "from __future__ import annotations\nprint(math.pi)"],  # nothing may come before a __future__ import
)
def test_a_cell_that_imports_or_binds_the_name_itself_is_left_alone(cell: str) -> None:
    cleaned = clean_cell(cell)
    assert cleaned.code == cell and "imported" not in cleaned.note


def test_the_imports_run_in_the_kernel_and_never_replace_what_an_earlier_cell_defined() -> None:
    """Before: `print(math.sqrt(1764))` and `print(mean([1, 2]))` died on a NameError. An earlier cell's own `mean`
    and a variable named `string` must survive: the import happens only where the kernel lacks the name."""
    results, _ = _run([
        "print(math.sqrt(1764))",
        "print(mean([1, 2]))",
        "def mean(values):\n    return 'own mean'\nstring = 'abc'",
        "print(mean([1, 2]), string.upper())",
    ])
    assert results["c0"].content.split("\n")[0] == "42.0"
    assert results["c1"].content.split("\n")[0] == "1.5"
    assert results["c3"].content.split("\n")[0] == "own mean ABC"
    assert not any(result.is_error for result in results.values())
