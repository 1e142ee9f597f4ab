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
"""

from __future__ import annotations

import ast
import codeop
import warnings

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
