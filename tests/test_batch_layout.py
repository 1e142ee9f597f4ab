"""The batch package's face after its split by job: one import path for every public name, no import of the CLI,
and `BatchSettings` found by its module path in a process that never saw it (as a Ray worker unpickles it)."""

from __future__ import annotations

import importlib
import inspect
import pickle
import subprocess
import sys

import functionary_agent.batch as batch
from functionary_agent.batch import BatchItem, BatchSettings

JOBS = ("items", "output", "runner", "settings")
IN_USE = (  # imported from `functionary_agent.batch` by the CLI, Ray's runner, benchmarks, tests and the README
    "BatchInputError", "BatchItem", "BatchOutput", "BatchSettings", "BatchSummary", "Record", "answer_all",
    "answer_items", "arun_batch", "check_items", "failure_record", "read_items", "refuse_output_as_input",
    "resolve_output_types", "run_batch",
)


def _fresh_python(code: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, timeout=120)


def test_the_package_re_exports_every_public_name_of_its_modules() -> None:
    assert set(IN_USE) <= set(batch.__all__) and len(batch.__all__) == len(set(batch.__all__))
    for job in JOBS:
        module = importlib.import_module(f"functionary_agent.batch.{job}")
        defined_here = {name for name, value in vars(module).items() if not name.startswith("_")
                        and (inspect.isclass(value) or inspect.isfunction(value))
                        and value.__module__ == module.__name__}
        missing = defined_here - set(batch.__all__)
        assert not missing, f"functionary_agent.batch does not re-export {sorted(missing)} of {job}.py"
        assert all(getattr(batch, name) is getattr(module, name) for name in defined_here)


def test_the_batch_package_never_imports_the_command_line_or_rich() -> None:
    code = ("import sys, functionary_agent.batch\n"
            "print(sorted(m for m in sys.modules if m.startswith('functionary_agent.cli') or m == 'rich'))")
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "[]"


def test_settings_and_items_unpickle_in_a_process_that_never_imported_them() -> None:
    settings = BatchSettings(tools=("tools.py",), base_url="http://127.0.0.1:9/v1", max_turns=3)
    item = BatchItem("q1", prompt="hello", line=4)
    code = ("import pickle, sys\n"
            "settings, item = pickle.loads(sys.stdin.buffer.read())\n"
            "print(type(settings).__module__, settings.tools, settings.max_turns, item.key, item.line)")
    done = _fresh_python(code, pickle.dumps((settings, item)))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["functionary_agent.batch.settings", "('tools.py',)", "3", '"q1"', "4"]
