"""The offline agent on everyday tasks of our own, each behaviour on and off side by side: one entry point over the
three measurements (each also runs alone, with its own options and its own description of the prompts):

    python benchmarks/embedded_tasks.py [--code-tasks N]

- `embedded_values.py`: tool prompts whose values start with punctuation or a sign (paths, `~/file`, `.env`, `$12`,
  `@handle`, `#tag`, `-5`) and enum values named by a synonym: lost leading characters, values right, seconds; with
  token healing and the review's repairs on and off (`FUNCTIONARY_AGENT_VALUE_REPAIR`), steering on and off;
- `embedded_runaways.py`: everyday requests and 3-step tasks (look up, compute, answer) as small agent loops:
  runaway answers (over 3x the tokens a right answer needs), identical calls in one turn, cuts for repetition,
  tokens, seconds; with the runaway guards on and off (`FUNCTIONARY_AGENT_RUNAWAY_GUARDS`);
- `code_tasks.py`: small computations with known answers through the code interpreter: cells that parse, right
  answers, model turns, seconds; with the code phase on and off (`--code-tasks N` runs the first N of 24).

None of the prompts comes from BFCL or another benchmark. Each line is `name: value`, as the scripts print them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-tasks", type=int, default=24, help="how many of the 24 code tasks to run")
    args = parser.parse_args()
    runs = [
        ["embedded_values.py"],
        ["embedded_runaways.py"],
        ["code_tasks.py", "--tasks", str(args.code_tasks)],
    ]
    failed = 0
    for script, *options in runs:
        print(f"# {script}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / script), *options], check=False)
        failed += done.returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
