"""How the embedded engine writes a raw-code call (a `python` cell): how it may open, and where it ends.

A small model writes a cell the way it writes an answer: a ```python fence, a sentence, then maybe code, then an
explanation. The tool's code phase (`functionary_agent._run.code_cell`) repairs what arrives; this module keeps the
engine from writing most of it in the first place, which saves the tokens and the seconds:

- **Opening** (`code_opening`): the cell's first token starts with a character a Python cell opens with: a letter
  or `_` (a name or a keyword: `import`, `print`, `x`), a digit (`2**16`), `(`, `[`, a quote, `#` (a comment) or `@`
  (a decorator). Not a space (an unexpected indent), not a backtick (a Markdown fence), not `>` (the format's
  `>>>`), not `{` (small models open the `{"code": ...}` wrapper with it, a dict literal rarely opens a cell), not `-`
  or `*` (a Markdown list or bold, a negative number rarely opens a cell), not `%`/`!` (IPython magics and shell
  commands, which are not Python). Words that open English sentences, a language tag (`python`) and the words a
  copied tool result opens with (`Traceback`) are banned as the first token: they parse as names, but no cell opens
  with them.
- **End** (`CodeEnd`): after each completed line, when the text before that line parses into at least one statement
  and the text with the line is a SyntaxError that is not merely an unfinished statement (`codeop`), the cell ends
  before that line: the line is prose (`The sum is 385.`), a closing fence, or a typo, and the code phase would
  leave prose out anyway. One parse per line, and none past `max_lines` lines or `max_chars` characters.
- **Guide** (`code_guide`): a small model has never seen the `python` tool used, and wrote answers
  (`13 * 17 * 19 = 310`) as cells. With the code interpreter on, the steered engine's prompt (never what a format
  renders for a server or a Functionary model) gets one short instruction (`CODE_GUIDE`) and worked examples
  (`CODE_EXAMPLE`: requests, cells that print their result, the outputs, answers that state them) before the
  conversation.
- **Cell first** (`CODE_PURPOSE`): a request that names what the code interpreter is for (`Python`, `compute`,
  `plot`, ...) gets a python cell first (`_steering.Relevance` reads it as the tool's purpose); with the examples in
  the prompt the model otherwise answered from its own head ("The result is 1.").
- **Answer** (`cell_output`): after a cell whose output is a result (no error, not empty), the turn opens with the
  answer to the user rather than another cell: the model otherwise ran the same cell again and again.

`FUNCTIONARY_AGENT_CODE_STEERING=off` turns these three off (a switch for measuring them).
"""

from __future__ import annotations

import ast
import codeop
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

# the first character of a cell's first token (see the module's docstring for why these and no others)
CODE_OPENING_GRAMMAR = "root ::= [a-zA-Z_0-9(\\[\"'#@] [^\\x00]*"
# first tokens that open a sentence or name a language rather than code (banned alone and after a space)
CODE_OPENING_BAN = (
    "The", "Here", "Sure", "Let", "To", "This", "That", "These", "There", "It", "I", "We", "You", "In", "First",
    "Okay", "Ok", "OK", "Certainly", "Below", "Using", "Use", "Step", "Answer", "Output", "Result", "Solution",
    "Yes", "No", "Note", "Now", "Then", "Next", "Finally", "Explanation", "Code", "Example", "Python", "python",
    "py", "Sorry", "Unfortunately", "What", "How", "If", "For", "Since", "Because", "Therefore", "So",
    # a copy of the last tool result, not code: seen after an error ("Traceback (most recent call ...")
    "Trace", "Traceback", "Error", "File",  # `Traceback` is two tokens: `Trace` + `back`
)
DEFAULT_MAX_LINES = 200
DEFAULT_MAX_CHARS = 20_000


CODE_GUIDE = (
    "To use python, send only Python code, no text: write the numbers and words of the request into the code, "
    "compute the answer and print() it. If python shows an error, send corrected code. When python has printed "
    "the result, tell it to the user."
)
# what the code interpreter is for, as `_steering.Relevance` reads a tool's purpose: a request that names one of
# these (by its first five letters) gets a python cell first
CODE_PURPOSE = "python code program script jupyter notebook compute calculate plot matplotlib"


def _example_call(number: int, code: str) -> dict[str, Any]:
    call = {"id": f"example_{number}", "type": "function", "function": {"name": "python", "arguments": code}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _example_result(number: int, output: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"example_{number}", "content": output}


# the worked examples: requests, cells that print their result (a string method, a list from the request's numbers,
# a power, an integer division), answers that state it. Their numbers and words are none that a
# task's answer holds (benchmarks/code_tasks.py and its development set), so a copy is never right by chance.
_EXAMPLES = (
    ("Use Python to replace the spaces in 'big red box' with underscores.",
     'print("big red box".replace(" ", "_"))', "big_red_box"),
    ("With Python, how many of the numbers 14, 3, 27 and 8 are greater than 10?",
     "numbers = [14, 3, 27, 8]\nprint(len([n for n in numbers if n > 10]))", "2"),
    ("Use Python to compute the cube of 2.5.", "print(2.5 ** 3)", "15.625"),
    ("How many whole weeks are in 365 days? Use Python.", "print(365 // 7)", "52"),
)
CODE_EXAMPLE: tuple[dict[str, Any], ...] = tuple(
    message
    for number, (request, code, output) in enumerate(_EXAMPLES, 1)
    for message in (
        {"role": "user", "content": request},
        _example_call(number, code),
        _example_result(number, output),
        {"role": "assistant", "content": f"The result is {output}."},
    )
)
# a line of a tool result that reports an error: a Python exception (`NameError: ...`) or the tool's own refusal
_ERROR_LINE = re.compile(r"^(?:\w*(?:Error|Exception|Interrupt)\b|Error:)", re.MULTILINE)


def code_steering_on() -> bool:
    """Whether the guide and the answer rule are on: they are unless `FUNCTIONARY_AGENT_CODE_STEERING` is off."""
    return os.environ.get("FUNCTIONARY_AGENT_CODE_STEERING", "").strip().lower() not in {"off", "0", "false"}


def _has_code_interpreter(tools: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(tool, Mapping) and tool.get("type") == "code_interpreter" for tool in tools)


def code_guide(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages the engine renders for a small model: with the code interpreter on, `CODE_GUIDE` and the worked
    example (`CODE_EXAMPLE`) after the caller's leading system messages; otherwise the messages as they are."""
    if not _has_code_interpreter(tools) or not code_steering_on():
        return list(messages)
    lead = 0
    while lead < len(messages) and messages[lead].get("role") == "system":
        lead += 1
    guide = {"role": "system", "content": CODE_GUIDE}
    return [*messages[:lead], guide, *CODE_EXAMPLE, *messages[lead:]]


def cell_output(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The output of the `python` cell the conversation ends with, when it is a result to report: no error, not
    empty. None otherwise (no cell, an error, `[no output]`), and always with code steering off."""
    text = _last_python_result(messages)
    if text is None or not text.strip() or text.strip().startswith("[no output]") or _is_error(text):
        return None
    return text


def _last_python_result(messages: Sequence[Mapping[str, Any]]) -> str | None:
    """The text of the tool result the conversation ends with, when it answers a `python` call; else None."""
    if not messages or messages[-1].get("role") != "tool" or not code_steering_on():
        return None
    call_id = messages[-1].get("tool_call_id")
    calls = [call for message in messages[:-1] if message.get("role") == "assistant"
             for call in message.get("tool_calls") or ()]
    if not any(call.get("id") == call_id and call.get("function", {}).get("name") == "python" for call in calls):
        return None
    content = messages[-1].get("content")
    return content if isinstance(content, str) else ""


def _is_error(result: str) -> bool:
    return bool(_ERROR_LINE.search(result))


def code_opening() -> tuple[tuple[str, ...], str]:
    """What a steered code cell may not open with (whole first tokens), and the grammar its first token follows."""
    return CODE_OPENING_BAN, CODE_OPENING_GRAMMAR


class CodeEnd:
    """Where a cell stops being Python, found line by line as the text grows (see the module's docstring).

    Called with the text up to the end of its last complete line (it ends with a newline), each time more lines
    are complete; returns the offset where the cell ends (the start of the first line that is not Python), or None
    while the cell goes on."""

    def __init__(self, max_lines: int = DEFAULT_MAX_LINES, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._checked = 0  # the text up to here was judged, line by line
        self._lines = 0
        self._code_before = False  # the text up to `_checked` parses into at least one statement
        self.line = ""  # the line the cell ended before, once it ended

    def __call__(self, lines: str) -> int | None:
        while (newline := lines.find("\n", self._checked)) >= 0:
            start, self._checked = self._checked, newline + 1
            if self._lines >= self._max_lines or newline >= self._max_chars:
                self._checked = len(lines)  # past the bound: the rest is the code phase's to judge
                return None
            self._lines += 1
            if self._ends_before(lines[: newline + 1], lines[start:newline]):
                self.line = lines[start:newline]
                return start
        return None

    def _ends_before(self, source: str, line: str) -> bool:
        """Whether the cell ends before `line`, the last line of `source`; updates what the text so far is."""
        if not line.strip():
            return False  # a blank line changes nothing
        body = _statements(source)
        if body is not None:
            self._code_before = bool(body)
            return False
        if self._code_before and not _unfinished(source):
            return True
        self._code_before = False
        return False


def _statements(source: str) -> list[ast.stmt] | None:
    """The statements `source` parses into, or None when it does not parse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like: the kernel warns, not us
        try:
            return ast.parse(source).body
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return None


def _unfinished(source: str) -> bool:
    """Whether `source` (which does not parse) is a statement still going on (`print(`, `for x in y:`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return codeop.compile_command(source, "<cell>", "exec") is None
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return False
