"""Issue 24, items 2 and 3, as a new user meets them: the real `functionary-agent` process (and the real API), its
one-line messages and its exit codes. Which engine answers is decided in one place (`models.resolve_model`), so
the CLI, `batch` and `Conversation` refuse a model name with no server in the same words; usage errors exit 2."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import functionary_agent
from functionary_agent import ConfigurationError, Conversation
from functionary_agent.batch import BatchSettings
from tests.openai_server import ScriptedServer, reply

ROOT = Path(__file__).resolve().parents[1]
WEATHER = "examples/weather.py"  # relative, as a user types it in the repository
SERVER_HINT = (
    "model 'gpt-4o' is not a GGUF file; to use a model on a server pass base_url='http://HOST:PORT/v1' (on the "
    "command line: --base-url URL) or set FUNCTIONARY_BASE_URL"
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    return subprocess.run(
        [sys.executable, "-m", "functionary_agent.cli", *args],
        capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}, cwd=ROOT,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr, with no traceback and no argparse usage block."""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and not done.stderr.startswith("usage:")
    return lines[0]


# -- item 2: one engine choice, one message ---------------------------------------------------------------------
def test_a_model_name_without_a_server_gets_one_message_from_cli_batch_and_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = cli("run", "hello", "--model", "gpt-4o")
    assert done.returncode == 2
    assert one_error_line(done) == f"functionary-agent: error: {SERVER_HINT}"

    items, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    items.write_text('{"id": 1, "prompt": "hello"}\n')
    done = cli("batch", str(items), "-o", str(output), "--model", "gpt-4o")
    assert done.returncode == 2
    assert one_error_line(done) == f"functionary-agent: error: {SERVER_HINT}"
    assert not output.exists()  # refused before anything was written

    monkeypatch.delenv("FUNCTIONARY_BASE_URL", raising=False)
    with pytest.raises(ConfigurationError) as conversation_error:
        Conversation("gpt-4o")
    with pytest.raises(ConfigurationError) as batch_error:
        BatchSettings(model="gpt-4o").check()
    assert str(conversation_error.value) == str(batch_error.value) == SERVER_HINT


def test_the_same_name_with_a_server_reaches_that_server() -> None:
    with ScriptedServer([reply("hi there")]) as server:
        done = cli("run", "hello", "--model", "gpt-4o", "--base-url", server.base_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hi there\n" and server.requests[0]["model"] == "gpt-4o"
    with ScriptedServer([reply("hi there")]) as server:  # $FUNCTIONARY_MODEL names a model on the server
        done = cli("run", "hello", env={"FUNCTIONARY_BASE_URL": server.base_url, "FUNCTIONARY_MODEL": "served-name"})
    assert done.returncode == 0, done.stderr
    assert server.requests[0]["model"] == "served-name"


def test_functionary_model_is_not_taken_for_a_gguf_path_without_a_server() -> None:
    """$FUNCTIONARY_MODEL names a server's model: with no server it is no --model the user typed. Before, the run
    failed on a file name the user never gave ("no GGUF model file at .../gpt-4o", exit 1). Now the bundled engine
    is chosen, and the run stops at the next check, cheaply: the same tools file given twice (a name clash)."""
    done = cli("run", "hello", "--tools", WEATHER, "--tools", "examples.weather", env={"FUNCTIONARY_MODEL": "gpt-4o"})
    assert done.returncode == 2
    assert "a tool named 'get_weather' is already registered" in one_error_line(done)
    assert "gpt-4o" not in done.stderr


def test_a_model_file_that_is_no_gguf_is_refused_before_loading(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    done = cli("run", "hello", "--model", str(notes))
    assert done.returncode == 2
    assert one_error_line(done).startswith(
        f"functionary-agent: error: model {str(notes)!r} is not a GGUF file (it does not start with 'GGUF')"
    )
    with pytest.raises(ConfigurationError, match="does not start with 'GGUF'"):
        Conversation(str(notes))


# -- item 3: usage errors exit 2, on one line -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "hi", "--format", "v9"], "functionary-agent run: error: argument --format: unknown prompt format "
                                          "'v9'; known formats: v3.llama3,"),
        (["run", "hi", "--max-turns", "0"], "functionary-agent run: error: argument --max-turns: must be at least 1, "
                                            "got 0 (see functionary-agent run --help)"),
        (["chat", "--max-turns", "many"], "functionary-agent chat: error: argument --max-turns: not a whole number: "
                                          "'many'"),
        (["batch", "in.jsonl", "-o", "out.jsonl", "--max-turns", "-3"], "functionary-agent batch: error: argument "
                                                                        "--max-turns: must be at least 1, got -3"),
        (["batch", "in.jsonl", "-o", "out.jsonl", "--format", "v9"], "functionary-agent batch: error: argument "
                                                                     "--format: unknown prompt format 'v9'"),
        (["run", "hi", "--temperature", "0"], "functionary-agent run: error: unrecognized arguments: --temperature 0"),
        (["fly"], "functionary-agent: error: argument COMMAND: invalid choice: 'fly'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert one_error_line(done).startswith(message)


def test_a_python_file_as_the_prompt_is_refused_before_any_request() -> None:
    """Refused, not warned about: `run tools.py` has no question in it (a forgotten --tools, or `run` taken for
    "run this script"), and a warning would scroll away above an answer about a file name."""
    with ScriptedServer([reply("an answer about a file name")]) as server:
        done = cli("run", WEATHER, "--base-url", server.base_url)
    assert done.returncode == 2
    assert one_error_line(done) == (
        "functionary-agent: error: the prompt 'examples/weather.py' is the path of a Python file, not a question; "
        'did you mean: functionary-agent run --tools examples/weather.py "YOUR QUESTION"?'
    )
    assert server.requests == []


def test_a_prompt_that_only_mentions_a_python_file_is_sent() -> None:
    long_name = "x" * 300 + ".py"  # too long for a file name: the check must not fail on it
    with ScriptedServer([reply("It defines get_weather."), reply("ok")]) as server:
        done = cli("run", f"What does {WEATHER} define?", "--base-url", server.base_url)
        assert done.returncode == 0, done.stderr
        done = cli("run", long_name, "--base-url", server.base_url)
        assert done.returncode == 0, done.stderr
    assert [request["messages"][-1]["content"] for request in server.requests] == [
        f"What does {WEATHER} define?", long_name
    ]


@pytest.mark.parametrize(
    ("args", "prog", "extra"),
    [
        (["run", WEATHER, "What is the weather in Oslo?"], "run", "'What is the weather in Oslo?'"),
        (["chat", WEATHER], "chat", WEATHER),
    ],
)
def test_a_tools_file_without_tools_flag_gets_a_hint(args: list[str], prog: str, extra: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert one_error_line(done) == (
        f"functionary-agent {prog}: error: unrecognized arguments: {extra}; did you mean --tools {WEATHER}? "
        f"(see functionary-agent {prog} --help)"
    )


def test_version_comes_from_the_package_metadata() -> None:
    found = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert found, "pyproject.toml declares no version"
    declared = found.group(1)
    assert importlib.metadata.version("functionary-agent") == declared  # the one source, as installed
    assert functionary_agent.__version__ == declared
    done = cli("--version")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == f"functionary-agent {declared}\n"
