"""The style bar as tests: `ruff check` and `mypy` clean, and `import functionary_agent` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_check_is_clean() -> None:
    done = _run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    packages = [name for name in ("functionary_agent", "sandbox") if (ROOT / name).is_dir()]
    done = _run("mypy", *packages)
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_does_not_pull_heavy_dependencies() -> None:
    """`openai`, `rich` and engines load only when used: scripts that only define tools stay quick to start."""
    code = (
        "import sys, functionary_agent\n"
        "heavy = [m for m in ('openai', 'rich', 'llama_cpp', 'jupyter_client', 'vllm') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_functions_stay_short() -> None:
    """The style guide's hard limit: no function over 60 lines in the shipped packages."""
    import ast

    too_long = []
    for package in ("functionary_agent", "sandbox"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > 60:
                        too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "\n".join(too_long)
