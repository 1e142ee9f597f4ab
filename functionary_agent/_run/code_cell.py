"""The code phase of the `python` tool: which part of a model's cell is Python, decided before the kernel sees it.

Small models write a cell the way they write an answer: a ```python fence, a sentence before the code, an
explanation after it, sometimes the `{"code": ...}` wrapper inside the code. `clean_cell` keeps the code and says in
one line what it left out (never silently); a cell with no Python in it is refused with a reason the model can act
on. The rules, in order:
- a `{"code": "..."}` wrapper sent as the code is unwrapped;
- fenced blocks (```python, ```py, bare ```) are the code, the text around them is left out; a lone bare ``` after
  code closes it (the opening fence was never written); a stray ``` at a line's end is removed;
- `>>>` / `...` prompts are removed (the lines without one are the session's output, left out);
- text before the code is left out, line by line, while a line is prose (does not start a Python statement and
  reads as words);
- the longest prefix of the remaining lines that parses (`ast`) is the code; what follows is left out when it is
  prose or an unfinished last statement (`codeop` says which); when it is code with a typo (`print(x))`), the
  whole cell is sent, so that the kernel reports the SyntaxError instead of half the cell running;
- statements at the end that are English words which happen to parse (`Done`, `not sure`, `Answer: 42`) are prose;
- a cell left with no statement is refused;
- a standard module the cell uses without importing it (`math.sqrt(2)`, `np.arange(5)` for numpy's usual alias) or
  a well-known function of `math` / `statistics` it calls by its bare name (`sqrt`, `mean`) is imported first,
  only where the kernel does not know the name yet (an earlier cell's `string = "abc"` or own `mean` wins).
Pure functions: no kernel, no I/O.
"""

from __future__ import annotations

import ast
import codeop
import json
import keyword
import re
import textwrap
from dataclasses import dataclass

# the longest prefix is searched from the end; a cell longer than this many lines is only tried whole, then sent as
# written (the kernel reports its SyntaxError): bounds the work on a huge cell
_MAX_PREFIX_TRIES = 400
_PYTHON_FENCES = frozenset({"", "python", "py", "python3", "ipython", "ipython3", "pycon", "jupyter"})
# an opening fence, its language, then the body up to the same fence (at a line's start or end) or the text's end
_FENCE = re.compile(
    r"(?:^|(?<=[\s:]))(?P<fence>`{3,}|~{3,})[ \t]*(?P<language>[\w+.-]*)[^\n]*\n"
    r"(?P<body>.*?)(?:(?P<close>(?P=fence))|\Z)",
    re.DOTALL,
)
_STRAY_FENCE = re.compile(r"^[ \t]*(?:`{3,}|~{3,})[\w+.-]*[ \t]*$|(?:`{3,}|~{3,})[ \t]*$", re.MULTILINE)
_SENTENCE_START = re.compile(r"[A-Z][A-Za-z']*[,:]?[ \t]+[A-Za-z]")
_LIST_ITEM = re.compile(r"(?:\d+[.)]|[-*\u2022])[ \t]+[A-Za-z]")
_WORD_RUN = re.compile(r"[A-Za-z']+(?:[ \t]+[A-Za-z']+){2,}")
_WORD = re.compile(r"[A-Z][a-z]+")  # `Done`, `Sure`, `Answer`: a capitalised word, not a variable like `df` or `X`
_WORD_NODES = (ast.Name, ast.BoolOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Load, ast.And, ast.Or, ast.Not,
               ast.Is, ast.IsNot, ast.In, ast.NotIn)


@dataclass(frozen=True)
class CodeCell:
    """What the code phase made of a cell: `code` to run, `note` (one line: what was left out, empty when the cell
    runs as written) and `refusal` (why nothing runs; empty when `code` runs)."""

    code: str
    note: str = ""
    refusal: str = ""

    @property
    def runs(self) -> bool:
        return not self.refusal


def clean_cell(text: str) -> CodeCell:
    """The Python of a model's cell, a one-line note of what was left out, or a refusal saying why none runs."""
    removed: list[str] = []
    text = _unwrap_json(text.replace("\r\n", "\n"), removed)
    text = _strip_prompts(_take_fenced(text, removed), removed)
    lines = _skip_leading_prose(text.strip("\n").splitlines(), removed)
    lines = textwrap.dedent("\n".join(lines)).splitlines()
    if len(lines) > _MAX_PREFIX_TRIES and not _parses("\n".join(lines)):
        return CodeCell("\n".join(lines), _note(removed))  # too long to search: the kernel reports the error
    kept = _parsing_prefix(lines)
    if _is_broken_code(lines[kept:]):  # a typo inside the code, not text after it: the kernel reports the error
        return CodeCell("\n".join(lines), _note(removed))
    code = _drop_trailing_words("\n".join(lines[:kept]), removed) if kept else ""
    if not code:
        return CodeCell("", refusal=_refusal(text, lines))
    _describe_tail(lines[kept:], removed)
    return CodeCell(_with_imports(code, removed), _note(removed))


# modules a cell may use by name without importing them (an import of them runs no user code), and usual aliases
_MODULES = {name: f"import {name}" for name in (
    "math", "statistics", "random", "datetime", "re", "itertools", "functools", "collections", "string",
    "fractions", "decimal", "calendar", "operator", "json", "time")}
_MODULES |= {"np": "import numpy as np", "pd": "import pandas as pd", "plt": "import matplotlib.pyplot as plt"}
# functions a cell may call by their bare name, from the module that has them
_FUNCTIONS = {name: "math" for name in (
    "sqrt", "isqrt", "factorial", "gcd", "lcm", "comb", "perm", "prod", "floor", "ceil", "log", "log2", "log10",
    "exp", "pi", "hypot", "radians", "degrees")}
_FUNCTIONS |= {name: "statistics" for name in ("mean", "median", "mode", "stdev", "variance", "fmean")}
_IMPORTS = {**_MODULES, **{name: f"from {module} import {name}" for name, module in _FUNCTIONS.items()}}


def _with_imports(code: str, removed: list[str]) -> str:
    """`code` with the imports it misses put first (see the module's docstring), each only where the kernel does
    not know the name (`try: name` / `except NameError: import ...`)."""
    missing = sorted(_unbound_names(code) & _IMPORTS.keys())
    if not missing or "from __future__" in code:  # a __future__ import must stay the cell's first statement
        return code
    lines = [f"try: {name}\nexcept NameError: {_IMPORTS[name]}" for name in missing]
    removed.append(f"imported {', '.join(missing)} where the kernel lacks it (the cell uses it without an import)")
    return "\n".join([*lines, code])


def _unbound_names(code: str) -> set[str]:
    """The names `code` reads but never binds (assigns, imports, defines, takes as a parameter)."""
    tree = ast.parse(code)
    read: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return read - bound


def _unwrap_json(text: str, removed: list[str]) -> str:
    """`{"code": "..."}` sent as the code itself (or with its closing brace cut off) -> the code."""
    stripped = text.strip()
    if not (stripped.startswith("{") and '"code"' in stripped):
        return text
    for candidate in (stripped, stripped + "}", stripped + '"}'):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            removed.append('unwrapped a {"code": ...} wrapper')
            return str(value["code"])
    return text


def _take_fenced(text: str, removed: list[str]) -> str:
    """The Python of Markdown fences (joined, in order); text outside them is left out. No fence: `text`."""
    matches = list(_FENCE.finditer(text))
    if len(matches) == 1 and _is_lone_closing_fence(matches[0], text):
        return _code_before_fence(matches[0], text, removed)
    blocks = [(m.group("language").lower(), m.group("body"), m.span()) for m in matches]
    if not blocks:
        return _strip_stray_fences(text, removed)
    python = [block for block in blocks if block[0] in _PYTHON_FENCES] or blocks
    outside = text
    for _, _, (start, end) in reversed(blocks):
        outside = outside[:start] + "\n" + outside[end:]
    languages = sorted({language or "plain" for language, _, _ in python})
    removed.append(f"took the code from {len(python)} ``` fence(s) ({', '.join(languages)})")
    others = sorted({language for language, _, _ in blocks if language not in _PYTHON_FENCES})
    if len(python) < len(blocks):
        removed.append(f"left out {len(blocks) - len(python)} fence(s) of other languages ({', '.join(others)})")
    _count_left_out("text around the fences", outside.splitlines(), removed)
    return "\n".join(body.strip("\n") for _, body, _ in python)


def _is_lone_closing_fence(match: re.Match[str], text: str) -> bool:
    """A bare ``` never closed, after text: the end of code whose opening fence was not written (`20\n```\nSo...`)."""
    return match.group("close") is None and not match.group("language") and bool(text[: match.start()].strip())


def _code_before_fence(match: re.Match[str], text: str, removed: list[str]) -> str:
    removed.append("took the code before a closing ``` (its opening fence missing)")
    _count_left_out("text after the fence", text[match.end("fence"):].splitlines(), removed)
    return text[: match.start()]


def _strip_stray_fences(text: str, removed: list[str]) -> str:
    """A lone ``` at a line's end or start (its partner lost, as in `print(1)```): removed, with a note."""
    cleaned = _STRAY_FENCE.sub("", text)
    if cleaned != text:
        removed.append("removed a ``` fence without its partner")
    return cleaned


def _strip_prompts(text: str, removed: list[str]) -> str:
    """A pasted interactive session (`>>> x = 1` / `... `) -> its input lines; its output lines are left out."""
    lines = text.splitlines()
    if not any(line.lstrip().startswith(">>>") for line in lines):
        return text
    kept, output = [], []
    for line in lines:
        bare = line.lstrip()
        if bare.startswith((">>> ", "... ")) or bare in (">>>", "..."):
            kept.append(bare[4:])
        else:
            output.append(line)
    removed.append("removed >>> prompts")
    _count_left_out("output", output, removed)
    return "\n".join(kept)


def _skip_leading_prose(lines: list[str], removed: list[str]) -> list[str]:
    """Drop the lines before the code that are prose (or a stray `python` language tag)."""
    start = 0
    while start < len(lines) and _is_prose_line(lines[start]):
        start += 1
    _count_left_out("text before the code", lines[:start], removed)
    return lines[start:]


def _is_prose_line(line: str) -> bool:
    bare = line.strip()
    if not bare:
        return True
    if bare.lower() in ("python", "python3", "py", "ipython"):  # the tag of a fence whose backticks were lost
        return True
    try:
        compiled = codeop.compile_command(bare, "<cell>", "exec")
    except (SyntaxError, ValueError, OverflowError):
        return _reads_as_prose(bare)  # else broken code: kept, so that the kernel reports its error
    if compiled is None:  # starts a statement that goes on below (`for x in y:`, `total = (`)
        return False
    return _reads_as_words(ast.parse(bare).body)


def _parsing_prefix(lines: list[str]) -> int:
    """How many leading lines form the longest prefix that parses into at least one statement (0: none does)."""
    for count in range(len(lines), 0, -1):
        source = "\n".join(lines[:count])
        if source.strip() and _parses(source):
            return count if ast.parse(source).body else 0
    return 0


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


def _reads_as_prose(line: str) -> bool:
    """A line that does not parse reads as prose, not as code with a typo, when it opens with a capitalised word and
    another word (`The output is 6.`), holds three words in a row that are not Python keywords (`it prints one`;
    `for i in range` has two), or is a list item (`1. Square`, `- then`)."""
    bare = line.strip()
    if _SENTENCE_START.match(bare) or _LIST_ITEM.match(bare):
        return True
    for run in _WORD_RUN.finditer(bare):
        if sum(not keyword.iskeyword(word) for word in run.group().split()) >= 3:
            return True
    return False


def _is_broken_code(tail: list[str]) -> bool:
    """After the parsing prefix: a line that is neither prose nor an unfinished last statement (`print(x))`)."""
    first = next((line for line in tail if line.strip()), None)
    if first is None or _reads_as_prose(first):
        return False
    try:
        return codeop.compile_command("\n".join(tail), "<cell>", "exec") is not None
    except (SyntaxError, ValueError, OverflowError):
        return True


def _describe_tail(tail: list[str], removed: list[str]) -> None:
    """Name what came after the code: an unfinished statement (cut off mid-way) or prose."""
    if not any(line.strip() for line in tail):
        return
    try:
        unfinished = codeop.compile_command("\n".join(tail), "<cell>", "exec") is None
    except (SyntaxError, ValueError, OverflowError):
        unfinished = False
    if unfinished:
        removed.append(f"left out an unfinished last statement ({_excerpt(tail)})")
    else:
        _count_left_out("text after the code", tail, removed)


def _drop_trailing_words(code: str, removed: list[str]) -> str:
    """Statements at the end that are English words which parse (`Done`, `Answer: 42`) are prose: cut them."""
    body = ast.parse(code).body
    keep = len(body)
    while keep and _reads_as_words(body[keep - 1:keep]):
        keep -= 1
    if keep == len(body):
        return code
    lines = code.splitlines()
    line, column = body[keep].lineno - 1, body[keep].col_offset  # `x = 1; Done` ends mid-line
    kept = [*lines[:line], lines[line][:column].rstrip().rstrip(";")]
    dropped = [lines[line][column:], *lines[line + 1:]]
    _count_left_out("words after the code that parse as Python but read as text", dropped, removed)
    return "\n".join(kept).strip("\n").rstrip()


def _reads_as_words(statements: list[ast.stmt]) -> bool:
    """Statements made of words alone: a capitalised word (`Done`), words joined by `and`/`or`/`not`/`is`/`in`
    (`not sure`, `this is it`), or a bare annotation (`Answer: 42`, `Note: x`). A lone lowercase name (`total`) is
    code: it shows a variable; so is any expression with a name that is no word (`not not_done`, `x2 or y`)."""
    if not statements:
        return False
    return all(_statement_reads_as_words(statement) for statement in statements)


def _statement_reads_as_words(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.AnnAssign):
        return statement.value is None and isinstance(statement.target, ast.Name)
    if not isinstance(statement, ast.Expr):
        return False
    nodes = list(ast.walk(statement.value))
    if not all(isinstance(node, _WORD_NODES) for node in nodes):
        return False
    if any(isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not) for node in nodes):
        return False
    names = [node.id for node in nodes if isinstance(node, ast.Name)]
    if not all(name.isascii() and name.isalpha() for name in names):  # `not_done`, `x2`: identifiers, not words
        return False
    return len(names) > 1 or any(_WORD.fullmatch(name) for name in names) or isinstance(statement.value, ast.UnaryOp)


def _count_left_out(what: str, lines: list[str], removed: list[str]) -> None:
    text_lines = [line for line in lines if line.strip()]
    if text_lines:
        count = len(text_lines)
        removed.append(f"left out {count} line{'s' if count > 1 else ''} of {what} ({_excerpt(text_lines)})")


def _excerpt(lines: list[str]) -> str:
    first = next((line.strip() for line in lines if line.strip()), "")
    return repr(first if len(first) <= 60 else first[:57] + "...")


def _note(removed: list[str]) -> str:
    return f"[code phase: {'; '.join(removed)}]" if removed else ""


def _refusal(text: str, lines: list[str]) -> str:
    """Why a cell is not run, with what to send instead: the model reads this as the tool's result."""
    source = "\n".join(lines)
    if not text.strip():
        why = "it is empty"
    elif not source.strip():
        why = f"it holds no Python statement, only text ({_excerpt(text.splitlines())})"
    else:
        why = f"it does not parse as Python ({_syntax_problem(source)})"
    return (
        f"Error: the python cell was not run: {why}. Send only Python source as the code (no prose, no ``` fences), "
        "and give your answer to the user as a normal message, not in the python call."
    )


def _syntax_problem(source: str) -> str:
    try:
        statements = ast.parse(source).body
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        shown = repr(line if len(line) <= 60 else line[:57] + "...")
        return f"line {exc.lineno}: {exc.msg}: {shown}"
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        return str(exc)
    if not statements:
        return "only comments, no statement"
    return f"it reads as words, not code: {_excerpt(source.splitlines())}"
