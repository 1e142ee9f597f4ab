"""`functionary-agent run`: one question, the tools of a file, every call and result shown, then the answer.

Exit status: 0 with an answer, 2 for a usage error (bad flags, a tools file that cannot be loaded), 1 when the
model or its server fails. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from functionary_agent._loading import load_tools
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError, FunctionaryAgentError, ToolDefinitionError
from functionary_agent.events import FinalAnswer, TextDelta, ToolResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="functionary-agent", description="Agents with automatic tool execution.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="answer one prompt, calling the given tools")
    run.add_argument("prompt", help="the user's message")
    run.add_argument("--tools", action="append", default=[], metavar="FILE_OR_MODULE",
                     help="Python file or module whose @tool functions (or public functions) become tools; repeatable")
    run.add_argument("--base-url", default=os.environ.get("FUNCTIONARY_BASE_URL"),
                     help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (default: $FUNCTIONARY_BASE_URL)")
    run.add_argument("--model", default=os.environ.get("FUNCTIONARY_MODEL"),
                     help="model name on the server (default: $FUNCTIONARY_MODEL, else the server's first model)")
    run.add_argument("--system", help="system message")
    run.add_argument("--max-turns", type=int, default=10, help="model turns before giving up (default: 10)")
    run.add_argument("--json", action="store_true", help="print the whole exchange as JSON messages instead")
    run.set_defaults(handler=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        tools = [tool for spec in args.tools for tool in load_tools(spec)]
    except (ConfigurationError, ToolDefinitionError) as exc:
        return _fail(f"cannot load tools: {exc}", EXIT_USAGE)
    if not args.base_url:
        return _fail("no model server configured: pass --base-url http://HOST:PORT/v1 or set FUNCTIONARY_BASE_URL")
    try:
        chat = Conversation(args.model, base_url=args.base_url, system=args.system, tools=tools,
                            max_turns=args.max_turns)
        reporter = _Reporter(sys.stdout, quiet=args.json, live=sys.stdout.isatty())
        for event in chat.stream(args.prompt):
            reporter.show(event)
    except ToolDefinitionError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except FunctionaryAgentError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(chat.messages, ensure_ascii=False, indent=2))
    return EXIT_OK


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"functionary-agent: error: {message}", file=sys.stderr)
    return status


class _Reporter:
    """Calls, results and the answer: styled and streamed on a terminal (rich), plain text in a pipe."""

    def __init__(self, out: TextIO, *, quiet: bool, live: bool) -> None:
        self._quiet = quiet
        self._live = live
        self._out = out
        self._console: Any = None
        self._mid_line = False
        if live and not quiet:
            from rich.console import Console  # only terminals pay for rich

            self._console = Console(file=out, highlight=False)

    def show(self, event: object) -> None:
        if self._quiet:
            return
        if isinstance(event, TextDelta) and self._live:
            self._write(event.text)
            self._mid_line = not event.text.endswith("\n")
        elif isinstance(event, ToolResult):
            self._end_line()
            self._call(event)
        elif isinstance(event, FinalAnswer):
            if self._live:
                self._end_line()
            else:
                print(event.content, file=self._out)

    def _call(self, result: ToolResult) -> None:
        arguments = _compact_json(result.arguments)
        content = _one_screen(result.content)
        if self._console is None:
            print(f"{result.name}({arguments})\n  -> {content}", file=self._out)
            return
        from rich.text import Text

        style = "bold red" if result.is_error else "green"
        self._console.print(Text.assemble((result.name, "bold cyan"), (f"({arguments})", "cyan")))
        self._console.print(Text.assemble(("  -> ", "dim"), (content, style)))

    def _write(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, end="", markup=False)
        else:
            self._out.write(text)
        self._out.flush()

    def _end_line(self) -> None:
        if self._mid_line:
            self._write("\n")
            self._mid_line = False


def _compact_json(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False)
    except json.JSONDecodeError:
        return arguments


def _one_screen(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


if __name__ == "__main__":
    sys.exit(main())
