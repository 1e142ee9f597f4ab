"""Small computations through the `python` tool with the bundled embedded model, the code phase on and off.

    python benchmarks/code_tasks.py [--dev] [--tasks N] [--only on|off] [--max-turns 4] [--max-tokens 256] [--verbose]

24 tasks written for this benchmark (sums, Fibonacci, a mean, a median, string reversal, a saved plot, ...), each
with an answer computed here in Python. Each runs in its own `Conversation(model, code_interpreter=...)` with the
default embedded model (SmolLM2-135M, greedy), once with the code phase on and once off. The off switch is the
tool's `code_phase` attribute (`PythonTool.code_phase = False`): the cell goes to the kernel exactly as the model
wrote it. Lines, on and off side by side:
- cells that parse: share of the model's python cells whose code reaches the kernel as valid Python with at least
  one statement (on: the cell the code phase kept, a refused cell counts as not parsing; off: the cell as written;
  an empty cell counts as not parsing on either side);
- right answers: share of tasks whose final answer holds the known result. Numbers are parsed from the answer
  (`1,157.63` -> 1157.63; right when one of them is within 0.01 of the result); strings are matched as a run of
  words (`tnega`, `apple fig pear`); the plot task is right when a .png was saved in the sandbox's folder;
- model turns: mean model requests per task; seconds: total wall time of the tasks.
Each request is capped at `--max-tokens` and each task at `--max-turns` (a task that hits the cap is wrong).
Both sides run with the embedded engine's code steering (`models/_code_segment.py`: the guide and worked examples in
the prompt, a cell first where the request names Python, the answer first after a cell's result);
`FUNCTIONARY_AGENT_CODE_STEERING=off` runs them without it, as the engine was before.
`--dev` runs the development set (`benchmarks/code_dev_tasks.py`) instead: tune on that one, measure on this one.
`--verbose` prints each task's transcript (the model's turns and the tool results it read) and answer.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functionary_agent import Conversation
from functionary_agent._openai_messages import code_of
from functionary_agent._run.code_cell import clean_cell
from functionary_agent._run.interpreter import PythonTool
from functionary_agent.errors import FunctionaryAgentError
from functionary_agent.events import FinalAnswer, ToolResult
from functionary_agent.models.embedded import EmbeddedModel

Answer = float | str
SAVED_PLOT = "saved plot"


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: Answer  # a number, a string, or SAVED_PLOT


TASKS = [
    Task("Use Python to compute the sum of the squares of the integers from 1 to 10.", sum(i * i for i in range(11))),
    Task("What is the 20th Fibonacci number (the 1st and 2nd are 1)? Compute it with Python.", 6765),
    Task("Compute the mean of 4, 8, 15, 16, 23 and 42 with Python.", statistics.mean([4, 8, 15, 16, 23, 42])),
    Task("Reverse the string 'agent' using Python.", "agent"[::-1]),
    Task("Use Python to compute 7 factorial.", math.factorial(7)),
    Task("Compute 2 to the power of 16 in Python.", 2**16),
    Task("How many prime numbers are there below 50? Count them with Python.",
         sum(all(n % d for d in range(2, n)) for n in range(2, 50))),
    Task("Use Python to add up all integers from 1 to 100.", sum(range(101))),
    Task("Find the median of 3, 9, 1, 7, 5 and 11 with Python.", statistics.median([3, 9, 1, 7, 5, 11])),
    Task("With Python, subtract the smallest of 17, 4, 29, 8, 22 from the largest.", 29 - 4),
    Task("Count the vowels (a, e, i, o, u) in the word 'functionary' with Python.",
         sum(c in "aeiou" for c in "functionary")),
    Task("Convert the text 'hello world' to upper case with Python.", "HELLO WORLD"),
    Task("What is the square root of 1764? Use Python.", math.sqrt(1764)),
    Task("Compute the remainder of 1000 divided by 7 in Python.", 1000 % 7),
    Task("Use Python to find the greatest common divisor of 48 and 180.", math.gcd(48, 180)),
    Task("Add up the even numbers from 1 to 20 using Python.", sum(range(2, 21, 2))),
    Task("How many letters are in the word 'supercalifragilistic'? Use Python.", len("supercalifragilistic")),
    Task("Convert 37 degrees Celsius to Fahrenheit with Python.", 37 * 9 / 5 + 32),
    Task("Sort the words 'pear apple fig' alphabetically with Python.", " ".join(sorted(["pear", "apple", "fig"]))),
    Task("Plot y = x squared for x from 0 to 10 with matplotlib and save it as squares.png.", SAVED_PLOT),
    Task("Compute the 10th triangular number (1 + 2 + ... + 10) with Python.", sum(range(1, 11))),
    Task("What is 1000 dollars after 3 years at 5% yearly compound interest, rounded to cents? Use Python.",
         round(1000 * 1.05**3, 2)),
    Task("Use Python to compute the product of 123 and 456.", 123 * 456),
    Task("Count the words in the sentence 'the quick brown fox jumps over the lazy dog' with Python.",
         len(["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"])),
]


@dataclass
class Outcome:
    right: bool
    cells: int
    cells_parsing: int
    turns: int
    seconds: float
    answer: str = ""
    codes: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)


def numbers_in(text: str) -> list[float]:
    return [float(match.replace(",", "")) for match in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)]


def is_right(task: Task, answer: str, workdir: Path | None) -> bool:
    if task.answer == SAVED_PLOT:
        return workdir is not None and any(workdir.rglob("*.png"))
    if isinstance(task.answer, str):
        words, wanted = re.findall(r"\w+", answer), task.answer.split()
        return any(words[i:i + len(wanted)] == wanted for i in range(len(words)))
    return any(abs(number - task.answer) <= 0.01 for number in numbers_in(answer))


def cell_parses(code: str, code_phase: bool) -> bool:
    if code_phase:
        cell = clean_cell(code)
        if not cell.runs:
            return False
        code = cell.code
    try:
        return bool(ast.parse(code).body)  # an empty cell or one of comments only has no statement: not counted
    except (SyntaxError, ValueError):
        return False


def run_task(model: EmbeddedModel, task: Task, code_phase: bool, args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    results: list[ToolResult] = []
    answer, finish = "", None
    with Conversation(model, code_interpreter={"timeout": 30}, max_turns=args.max_turns,
                      max_tokens=args.max_tokens) as chat:
        tool = next(t for t in chat.tools if isinstance(t, PythonTool))
        tool.code_phase = code_phase
        try:
            for event in chat.stream(task.prompt):
                if isinstance(event, ToolResult):
                    results.append(event)
                elif isinstance(event, FinalAnswer):
                    answer, finish = event.content, event.finish_reason
        except FunctionaryAgentError as exc:  # max_turns reached: a wrong task, still measured
            answer = f"<{type(exc).__name__}>"
        turns = sum(1 for m in chat.messages if m["role"] == "assistant")
        right = is_right(task, answer, getattr(tool.sandbox, "workdir", None))
        transcript = [transcript_line(m) for m in chat.messages if m["role"] != "system"]
        transcript.append(f"finish_reason={finish}")
    codes = [code_of(r.arguments) for r in results if r.name == "python"]
    parsing = sum(cell_parses(code, code_phase) for code in codes)
    return Outcome(right, len(codes), parsing, turns, time.perf_counter() - started, answer, codes, transcript)


def transcript_line(message: Any) -> str:
    """One message of a task's conversation, on one line: who, the calls it made, what it said."""
    calls = [f"{call['function']['name']}({code_of(call['function']['arguments'])!r})"
             for call in message.get("tool_calls") or ()]
    return f"{message['role']}: {' '.join(calls)} {message.get('content')!r}".replace("\n", "\\n")


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} % ({part}/{whole})" if whole else "n/a (0/0)"


def report(outcomes: dict[str, list[Outcome]]) -> None:
    measures: list[tuple[str, Callable[[list[Outcome]], str]]] = [
        ("cells that parse", lambda o: share(sum(x.cells_parsing for x in o), sum(x.cells for x in o))),
        ("right answers", lambda o: share(sum(x.right for x in o), len(o))),
        ("model turns per task", lambda o: f"{statistics.mean(x.turns for x in o):.2f}"),
        ("seconds", lambda o: f"{sum(x.seconds for x in o):.0f} s total, {statistics.mean(x.seconds for x in o):.1f} "
                              "s per task"),
    ]
    for name, measure in measures:
        print(f"{name}: " + ", ".join(f"code phase {mode} {measure(found)}" for mode, found in outcomes.items()))


def task_list(dev: bool) -> list[Task]:
    if not dev:
        return TASKS
    from code_dev_tasks import DEV_TASKS  # benchmarks/ is on sys.path when this file runs as a script

    return [Task(task.prompt, task.answer) for task in DEV_TASKS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true", help="run the development set (benchmarks/code_dev_tasks.py)")
    parser.add_argument("--tasks", type=int, help="run only the first N tasks")
    parser.add_argument("--only", choices=["on", "off"], help="run one side only")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--verbose", action="store_true", help="print each task's cells and answer")
    args = parser.parse_args()
    modes = [args.only] if args.only else ["on", "off"]
    outcomes: dict[str, list[Outcome]] = {mode: [] for mode in modes}
    model = EmbeddedModel()
    for number, task in enumerate(task_list(args.dev)[: args.tasks], 1):
        for mode in modes:
            outcome = run_task(model, task, mode == "on", args)
            outcomes[mode].append(outcome)
            print(f"# task {number} {mode}: right={outcome.right} cells={outcome.cells_parsing}/{outcome.cells} "
                  f"turns={outcome.turns} {outcome.seconds:.0f} s", file=sys.stderr, flush=True)
            if args.verbose:
                lines = [*outcome.transcript, f"answer={outcome.answer!r} (wanted {task.answer!r})"]
                print("\n".join(f"#   {line}" for line in lines), file=sys.stderr, flush=True)
    report(outcomes)
    asyncio.run(model.aclose())


if __name__ == "__main__":
    main()
