"""Functionary v3 (`v3.llama3`, models v3.0 and v3.2): ">>>recipient\\n" segments on Llama-3 tokens.

The assistant turn is a run of segments, each opened by ">>>" and a recipient: "all" for text to the user, a
function name for JSON arguments, "python" for raw code. The generation prompt already ends with ">>>", so the
model's first output is a recipient.
"""

from __future__ import annotations

from typing import ClassVar

from functionary_agent.formats._common import CODE_INTERPRETER_TEXT, ToolChoice, ToolSet, Turn
from functionary_agent.formats._stream import NAME, Protocol, Start
from functionary_agent.formats.base import Format, recipient_first_start
from functionary_agent.formats.typescript import render_namespace

SEPARATOR = ">>>"
TEXT_RECIPIENT = "all"
PREAMBLE = (
    "You are capable of executing available function(s) if required.\n"
    "Only execute function(s) when absolutely necessary.\n"
    "Ask for the required input to:recipient==all\n"
    "Use JSON for function arguments.\n"
    "Respond in this format:\n"
    ">>>${recipient}\n"
    "${content}\n"
    "Available functions:\n"
)


class V3Format(Format):
    name = "v3.llama3"
    stop = ("<|eot_id|>", "<|end_of_text|>")
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n>>>"
    gen_tail = SEPARATOR
    protocol: ClassVar[Protocol] = Protocol(
        text_markers=((SEPARATOR, NAME),),
        args_markers=((SEPARATOR, NAME),),
        code_markers=((SEPARATOR, NAME),),
        name_end="\n",
        stops=stop,
        text_recipient=TEXT_RECIPIENT,
    )

    def _open(self, role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def _close(self) -> str:
        return "<|eot_id|>"

    def _system(self, toolset: ToolSet) -> str:
        text = self._open("system") + PREAMBLE + render_namespace(toolset.functions) + self._close()
        if toolset.code_interpreter:
            text += self._open("system") + CODE_INTERPRETER_TEXT + self._close()
        return text

    def _turn(self, turn: Turn) -> str:
        if turn.role != "assistant":
            return self._open(turn.role) + turn.text + self._close()
        if not turn.text and not turn.calls:
            return ""
        body = f"{SEPARATOR}{TEXT_RECIPIENT}\n{turn.text}" if turn.text else ""
        body += "".join(f"{SEPARATOR}{call.name}\n{call.arguments}" for call in turn.calls)
        return self._open("assistant") + body + self._close()

    def _choice_prefix(self, choice: ToolChoice, code: frozenset[str]) -> str:
        if choice.mode == "none":
            return TEXT_RECIPIENT + "\n"
        if choice.mode == "function":
            return f"{choice.name}\n"
        return ""

    def _start(self, choice: ToolChoice) -> Start:
        return recipient_first_start(choice)

    def _call_text(self, name: str, is_code: bool) -> tuple[str, str]:
        return f"{SEPARATOR}{name}\n", ""

    def _text_begin(self) -> str:
        return f"{SEPARATOR}{TEXT_RECIPIENT}\n"
