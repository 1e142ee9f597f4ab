"""`functionary-agent run` (one question), `functionary-agent chat` (a terminal REPL), `functionary-agent batch`
(a JSONL file of questions, many at once, see `functionary_agent.batch`) and `functionary-agent serve` (vLLM's
server with our plugin, see `functionary_agent.server.cli`).

Exit status: 0 with an answer, 2 for a usage error (bad flags or flag values, a model that is no GGUF file here
and no server, a tools file that cannot be loaded, bad batch input, a setting that cannot work such as `serve`
without --model), 1 when the model or its server fails (for
`batch`: when some items failed), or anything else goes wrong; 3 when `run` paused because calls wait for
approval and no terminal can ask (what waits, and how to go on, is printed); 4 when `run`'s answer was cut short
(the model hit its token limit, or its text was cut where it began to repeat itself); 130 after Ctrl-C. Errors are
one line on stderr, never a traceback, unless `--debug` asks for one; argparse's own errors too (`PROG: error:
...`, no usage block).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from functionary_agent._run.approvals import PendingCall
from functionary_agent._text import compact_json, visible_controls
from functionary_agent.cli.progress import TerminalProgress
from functionary_agent.cli.terminal import Reporter, json_for_terminal, show_library_warnings
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, FormatError, FunctionaryAgentError, ToolDefinitionError
from functionary_agent.integrations.tool_files import load_tools
from functionary_agent.models import ChatModel, check_model_choice, resolve_model
from functionary_agent.server.cli import add_serve_parser

if TYPE_CHECKING:
    from functionary_agent.batch import BatchItem, BatchOutput, BatchSettings, Record

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED, EXIT_TRUNCATED = 0, 1, 2, 3, 4


class _UsageError(Exception):
    """A mistake in the command line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line and no usage block: `PROG: error: MESSAGE (see PROG --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        _exit_usage(self.prog, message)


class _PrintVersion(argparse.Action):
    """`--version`: `functionary-agent X.Y.Z`, the installed package's version (read only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        import functionary_agent

        print(f"functionary-agent {functionary_agent.__version__}")
        parser.exit(EXIT_OK)


def _exit_usage(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {visible_controls(message)} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    args, extras = _parser().parse_known_args(argv)  # `serve` keeps the flags it does not know, for vLLM
    if extras:
        words = [getattr(args, "prompt", ""), *extras]  # `run tools.py "question"` forgot --tools too
        _exit_usage(f"functionary-agent {args.command}", f"unrecognized arguments: {shlex.join(extras)}"
                    f"{_python_file_hint(words)}")
    debug = bool(getattr(args, "debug", False))  # `serve` has no --debug
    try:
        return int(args.handler(args))
    except (_UsageError, ConfigurationError) as exc:  # ConfigurationError: a setting that cannot work (`serve`
        return _fail(str(exc), EXIT_USAGE, debug=debug)  # without --model, ...) is a usage error too
    except FunctionaryAgentError as exc:
        return _fail(str(exc), debug=debug)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, ours or a tool's: still one line, the traceback only on request
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(f"{type(exc).__name__}: {exc}{hint}", debug=debug)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="functionary-agent", description="Agents with automatic tool execution.")
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="answer one prompt, calling the given tools")
    run.add_argument("prompt", help="the user's message")
    _add_conversation_options(run)
    run.add_argument("--json", action="store_true",
                     help='print {"answer", "messages", "usage", "end"} as JSON instead of the exchange')
    run.add_argument("--approve", action="append", default=[], metavar="TOOL",
                     help="run calls of TOOL that need approval without asking (repeat for more tools)")
    run.set_defaults(handler=_run)
    chat = commands.add_parser("chat", help="an interactive chat in the terminal (/help for commands)")
    _add_conversation_options(chat)
    chat.set_defaults(handler=_chat)
    _add_batch_parser(commands)
    add_serve_parser(commands)
    return parser


def _add_batch_parser(commands: Any) -> None:
    batch = commands.add_parser(
        "batch", help="answer every item of a JSONL file, many at once; a rerun resumes",
        description='Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (optional '
        '"tool_choice", and "output_type": a type named in the tools). Output lines: {"id", "answer", "error", '
        '"usage", "seconds", "messages"}. A rerun skips the ids answered in --output and retries the failed ones.',
    )
    batch.add_argument("input", help="JSONL file of items")
    batch.add_argument("--output", "-o", required=True, help="JSONL file of results (appended to, resumed)")
    _add_model_options(batch)
    batch.add_argument("--concurrency", type=_positive_int, default=16,
                       help="conversations under way at once (per Ray worker with --ray; default: 16)")
    batch.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run on Ray: the cluster at ADDRESS (HOST:PORT, ray://HOST:PORT, auto), or without "
                       "one a cluster this machine runs, else a new local Ray (pip install 'functionary-agent[ray]')")
    batch.set_defaults(handler=_batch)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_conversation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code-interpreter", action="store_true",
                        help="give the model a sandboxed Python kernel (the `python` tool)")
    _add_model_options(parser)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tools", action="append", default=[], metavar="FILE_OR_MODULE",
                        help="Python file or module whose @tool functions (or public functions) become tools; "
                        "repeatable")
    parser.add_argument("--base-url", default=os.environ.get("FUNCTIONARY_BASE_URL"),
                        help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default: $FUNCTIONARY_BASE_URL)")
    parser.add_argument("--model", default=None,  # $FUNCTIONARY_MODEL names a server's model: read only with one
                        help="with --base-url: the model name on the server (default: $FUNCTIONARY_MODEL, else the "
                        "server's first model); without: a GGUF file for the embedded engine, here or on the "
                        "Hugging Face Hub as hf:OWNER/REPO/FILE.gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--format", type=_format_name,
                        help="prompt format of a GGUF model (v3.2, v3.1, v2, v2.5, chatml-v3); default: detected from "
                        "the file")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-turns", type=_positive_int, default=10, help="model turns per question (default: 10)")
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback too")


def _format_name(text: str) -> str:
    """--format: a prompt format name (or alias) the embedded engine knows."""
    from functionary_agent.formats import get_format  # loaded only when --format is given

    try:
        get_format(text)
    except FormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _python_file_hint(words: Sequence[str]) -> str:
    """A hint for a tools file given without --tools: the first word that is the path of a Python file."""
    for word in words:
        if word.endswith(".py") and _is_file(word):
            return f"; did you mean --tools {shlex.quote(word)}?"
    return ""


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for a file, a NUL in it: a sentence, not a path
        return False


def _conversation(args: argparse.Namespace) -> Conversation:
    """The conversation the flags describe; a model or format that cannot work and tool files that cannot be
    loaded are usage errors."""
    show_library_warnings()  # an MCP server's or OpenAPI document's words in a warning: shown, not obeyed
    try:
        check_model_choice(args.model, base_url=args.base_url, format=args.format)  # as Conversation and batch
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None
    try:
        tools = [tool for spec in args.tools for tool in load_tools(spec)]
    except (ConfigurationError, ToolDefinitionError) as exc:
        raise _UsageError(f"cannot load tools: {exc}") from None
    model: ChatModel | str | None = args.model
    try:
        if args.format:  # Conversation has no format argument; the embedded engine it picks is shared, never owned
            model, _ = resolve_model(args.model, format=args.format)
        return Conversation(model, base_url=args.base_url, system=args.system, tools=tools,
                            max_turns=args.max_turns, code_interpreter=args.code_interpreter)
    except (ConfigurationError, ToolDefinitionError) as exc:  # a --base-url that cannot work, a tool name twice
        raise _UsageError(str(exc)) from None


def _run(args: argparse.Namespace) -> int:
    _check_prompt(args.prompt)
    reporter = Reporter(sys.stdout, quiet=args.json, live=sys.stdout.isatty())
    with _conversation(args) as chat:
        chat.on_approval = _approval(reporter, set(args.approve))
        with reporter.turn():
            for event in chat.stream(args.prompt):
                reporter.show(event)
        if args.json:
            answer = chat.messages[-1].get("content") or ""
            end = dataclasses.asdict(chat.last_end) if chat.last_end else None
            usage = chat.last_usage.to_dict()
            print(json_for_terminal({"answer": answer, "messages": chat.messages, "usage": usage, "end": end}))
        elif sys.stdout.isatty():
            reporter.notice(chat.last_usage.summary())
        return _ending(chat)


def _approval(reporter: Reporter, approved: set[str]) -> Callable[[PendingCall], bool | None] | None:
    """Calls of the tools named by --approve run; others are asked about on a terminal, else the run pauses."""
    ask = None
    if sys.stdin.isatty():
        from functionary_agent.cli.repl import terminal_approval

        ask = terminal_approval(reporter)
    if not approved and ask is None:
        return None
    return lambda call: True if call.name in approved else (ask(call) if ask is not None else None)


def _ending(chat: Conversation) -> int:
    """Say on stderr how a run that did not simply answer ended: paused for approval (3), or cut short (4)."""
    end = chat.last_end
    if end is not None and end.reason == "paused":
        waiting = chat.pending_approvals
        listed = "; ".join(f"{call.name}({compact_json(call.raw_arguments)})" for call in waiting)
        names = " ".join(sorted({f"--approve {shlex.quote(call.name)}" for call in waiting}))
        _note(f"paused: {len(waiting)} call(s) wait for approval: {listed}. Nothing was run. Run it again on a "
              f"terminal to answer y/n, or add {names} to run them.")
        return EXIT_PAUSED
    if end is not None and end.truncated:
        _note(f"the answer was cut short (finish_reason={end.finish_reason}): it may be incomplete.")
        return EXIT_TRUNCATED
    return EXIT_OK


def _note(text: str) -> None:
    print(f"functionary-agent: note: {visible_controls(text)}", file=sys.stderr)


def _check_prompt(prompt: str) -> None:
    """Refuse a prompt that is only the path of a Python file: `run tools.py` means a forgotten --tools (or a
    belief that `run` runs a script); there is no question to answer, and a model would answer the path."""
    if _python_file_hint([prompt.strip()]):
        raise _UsageError(
            f"the prompt {prompt!r} is the path of a Python file, not a question; did you mean: functionary-agent "
            f"run --tools {shlex.quote(prompt.strip())} \"YOUR QUESTION\"?"
        )


def _chat(args: argparse.Namespace) -> int:
    from functionary_agent.cli.repl import Repl

    with _conversation(args) as chat:
        Repl(chat, Reporter(sys.stdout, quiet=False, live=sys.stdout.isatty())).loop()
    return EXIT_OK


def _batch(args: argparse.Namespace) -> int:
    show_library_warnings()  # a failed Ray shard's warning quotes the error: shown, not obeyed
    items, settings = _batch_plan(args)
    started = time.perf_counter()
    todo: list[BatchItem] = []
    with contextlib.ExitStack() as stack:
        output = _enter_batch_target(stack, args)
        try:
            todo = output.pending(items)
            progress = stack.enter_context(TerminalProgress(len(todo), live=sys.stderr.isatty(), out=sys.stderr))

            def deliver(record: Record) -> None:
                if output.write(record):
                    progress(record)

            _answer_batch(todo, settings, args, deliver)
        except KeyboardInterrupt:
            stack.close()  # the progress line goes, a local Ray stops
            left = len(todo) - output.answered - output.failed
            print(f"interrupted: {_counts(output)} written to {args.output}, {left} not yet; run the same command "
                  "again to resume", file=sys.stderr)
            return 130
    skipped = f", {len(items) - len(todo)} skipped (answered before)" if len(todo) < len(items) else ""
    retry = "; run the same command again to retry the failed ones" if output.failed else ""
    print(f"batch done in {time.perf_counter() - started:.1f} s: {_counts(output)}{skipped}; results in "
          f"{args.output}{retry}", file=sys.stderr)
    return EXIT_FAILED if output.failed else EXIT_OK


def _batch_plan(args: argparse.Namespace) -> tuple[list[BatchItem], BatchSettings]:
    """The items and the settings, both checked before anything runs or is written: problems are usage errors."""
    from functionary_agent.batch import BatchSettings, read_items, refuse_output_as_input

    settings = BatchSettings(
        tools=tuple(args.tools), base_url=args.base_url, model=args.model, format=args.format, system=args.system,
        max_turns=args.max_turns, api_key=os.environ.get("FUNCTIONARY_API_KEY"),
    )
    try:
        refuse_output_as_input(args.input, args.output)
        items = read_items(args.input, conversation=settings)  # every problem of every line, output types too
    except (ConfigurationError, ToolDefinitionError) as exc:
        raise _UsageError(str(exc) if isinstance(exc, ConfigurationError) else f"cannot load tools: {exc}") from None
    return items, settings


def _enter_batch_target(stack: contextlib.ExitStack, args: argparse.Namespace) -> BatchOutput:
    """Join Ray (with --ray), then open the output file; a cluster out of reach or an output file that is not a
    batch's are usage errors, and nothing is written."""
    from functionary_agent.batch import BatchOutput

    try:
        if args.ray is not None:
            from functionary_agent.batch.ray import ray_session

            stack.enter_context(ray_session(args.ray or None))
        return stack.enter_context(BatchOutput(args.output))
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None


def _answer_batch(
    todo: list[BatchItem], settings: BatchSettings, args: argparse.Namespace, deliver: Callable[[Record], None]
) -> None:
    if not todo:
        return
    if args.ray is not None:
        from functionary_agent.batch.ray import answer_on_ray

        answer_on_ray(todo, settings, deliver=deliver, concurrency=args.concurrency)
    else:
        from functionary_agent.batch import answer_all

        asyncio.run(answer_all(todo, settings, args.concurrency, deliver))


def _counts(output: BatchOutput) -> str:
    return f"{output.answered} answered, {output.failed} failed"


def _fail(message: str, status: int = EXIT_FAILED, *, debug: bool = False) -> int:
    """One line on stderr (after the traceback of the error being handled, with --debug); the exit status. Both
    may quote a server, a model or a tool: their controls are shown, not obeyed."""
    if debug:
        print(visible_controls(traceback.format_exc()), end="", file=sys.stderr)
    print(f"functionary-agent: error: {visible_controls(message)}", file=sys.stderr)
    return status

