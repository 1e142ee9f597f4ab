"""`functionary-agent chat`: a terminal REPL over one conversation.

Lines go to the model; lines starting with `/` are commands. Ctrl-C stops the answer being written (the calls it
started are cancelled and recorded, so the chat stays valid) without leaving; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from functionary_agent._run.approvals import PendingCall
from functionary_agent._text import compact_json
from functionary_agent.cli.terminal import Reporter
from functionary_agent.conversation import Conversation
from functionary_agent.errors import FunctionaryAgentError

HELP = """commands:
  /tools        list the tools the model may call
  /reset        forget the conversation (the system message stays)
  /save PATH    save the conversation as JSON
  /load PATH    continue a saved conversation
  /exit         leave (or Ctrl-D); Ctrl-C stops the current answer"""


def terminal_approval(reporter: Reporter, read: Callable[[str], str] = input) -> Callable[[PendingCall], bool]:
    """The y/n question at the terminal for a call that needs a yes (the run waits meanwhile); no answer is no."""

    def approve(call: PendingCall) -> bool:
        reporter.notice(f"{call.name}({compact_json(call.raw_arguments)}) needs your approval")
        try:
            return read("run it? [y/N] ").strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False

    return approve


class Repl:
    """Read a line, run it, show what happens; `read` is `input` unless a test supplies another."""

    def __init__(self, chat: Conversation, reporter: Reporter, read: Callable[[str], str] = input) -> None:
        self.chat = chat
        self.reporter = reporter
        self._read = read
        self._commands: dict[str, Callable[[str], bool]] = {
            "/tools": self._tools, "/reset": self._reset, "/save": self._save, "/load": self._load,
            "/help": self._help, "/exit": self._exit, "/quit": self._exit,
        }
        chat.on_approval = terminal_approval(reporter, read)

    def loop(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - arrow keys and history for input()
        self.reporter.notice("functionary-agent chat: /help for commands, Ctrl-D to leave")
        while True:
            try:
                line = self._read("you> ").strip()
            except EOFError:
                self.reporter.notice("")
                return
            except KeyboardInterrupt:
                self.reporter.notice("")
                continue
            if line.startswith("/"):
                if not self._command(line):
                    return
            elif line:
                self._ask(line)

    def _ask(self, text: str) -> None:
        try:
            with self.reporter.turn():
                for event in self.chat.stream(text):
                    self.reporter.show(event)
        except KeyboardInterrupt:
            self.reporter.notice("[interrupted]")
        except FunctionaryAgentError as exc:
            self.reporter.notice(f"error: {exc}", error=True)
        end = self.chat.last_end
        if end is not None and end.truncated:
            self.reporter.notice(f"[cut short (finish_reason={end.finish_reason}): the answer may be incomplete]")

    def _command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, argument = line.partition(" ")
        command = self._commands.get(name.lower())
        if command is None:
            self.reporter.notice(f"unknown command {name}; /help lists them", error=True)
            return True
        return command(argument.strip())

    def _tools(self, _: str) -> bool:
        tools = self.chat.tools
        lines = [f"  {tool.name}: {tool.description.splitlines()[0] if tool.description else ''}" for tool in tools]
        self.reporter.notice("\n".join(lines) if lines else "no tools")
        return True

    def _reset(self, _: str) -> bool:
        self.chat.reset()
        self.reporter.notice("conversation cleared")
        return True

    def _save(self, path: str) -> bool:
        if not path:
            self.reporter.notice("usage: /save PATH", error=True)
            return True
        try:
            self.chat.save(path)
        except OSError as exc:
            self.reporter.notice(f"cannot save to {path}: {exc.strerror}", error=True)
        except FunctionaryAgentError as exc:  # messages set by hand that no file could hold
            self.reporter.notice(f"cannot save to {path}: {exc}", error=True)
        else:
            self.reporter.notice(f"saved {len(self.chat.messages)} messages to {path}")
        return True

    def _load(self, path: str) -> bool:
        if not path:
            self.reporter.notice("usage: /load PATH", error=True)
            return True
        try:
            self.chat.messages = Conversation.load(path, self.chat.model).messages
        except FunctionaryAgentError as exc:
            self.reporter.notice(str(exc), error=True)
        else:
            self.reporter.notice(f"loaded {len(self.chat.messages)} messages from {path}")
        return True

    def _help(self, _: str) -> bool:
        self.reporter.notice(HELP)
        return True

    def _exit(self, _: str) -> bool:
        return False
