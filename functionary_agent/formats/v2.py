"""Functionary v2 (models v2–v2.4, `<|from|>`/`<|recipient|>`/`<|content|>` tokens) and v2.5 (`v2.llama3`).

v2 writes every segment as its own header block: `\\n<|from|>assistant\\n<|recipient|>NAME\\n<|content|>…`, text
going to the recipient "all", and ends the assistant turn with `<|stop|>`. v2.5 moves to Llama-3 turns: text comes
first with no opener, each call is `<|reserved_special_token_249|>NAME\\n` + arguments, and tool results start
with `name=NAME`.
"""

from __future__ import annotations

from typing import ClassVar

from functionary_agent.formats._common import CODE_INTERPRETER_TEXT, ToolChoice, ToolSet, Turn
from functionary_agent.formats._stream import NAME, SKIP, Protocol, Start
from functionary_agent.formats.base import Format, recipient_first_start, text_first_start
from functionary_agent.formats.typescript import render_namespace

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. The assistant calls functions with appropriate input when necessary"
)
FROM = "<|from|>"
RECIPIENT = "<|recipient|>"
CONTENT = "<|content|>"
SEGMENT = f"\n{FROM}assistant\n{RECIPIENT}"
CALL_SEPARATOR = "<|reserved_special_token_249|>"


class V2Format(Format):
    name = "v2"
    stop = ("<|stop|>",)
    generation_prompt = SEGMENT
    gen_tail = SEGMENT
    protocol: ClassVar[Protocol] = Protocol(
        text_markers=(("\n" + FROM, SKIP), (FROM, SKIP)),
        args_markers=(("\n" + FROM, SKIP), (FROM, SKIP)),
        code_markers=(("\n" + FROM, SKIP), (FROM, SKIP)),
        name_end=CONTENT,
        stops=stop,
        skip_end=RECIPIENT,
        text_recipient="all",
    )

    def _block(self, sender: str, recipient: str, text: str) -> str:
        return f"\n{FROM}{sender}\n{RECIPIENT}{recipient}\n{CONTENT}{text}"

    def _system(self, toolset: ToolSet) -> str:
        second = CODE_INTERPRETER_TEXT if toolset.code_interpreter else DEFAULT_SYSTEM
        return self._block("system", "all", render_namespace(toolset.functions))[1:] + self._block(
            "system", "all", second
        )

    def _turn(self, turn: Turn) -> str:
        if turn.role == "tool":
            return self._block(turn.tool_name, "all", turn.text)
        if turn.role != "assistant":
            return self._block(turn.role, "all", turn.text)
        if not turn.text and not turn.calls:
            return ""
        text = self._block("assistant", "all", turn.text) if turn.text else ""
        text += "".join(self._block("assistant", call.name, call.arguments) for call in turn.calls)
        return text + "<|stop|>"

    def _choice_prefix(self, choice: ToolChoice, code: frozenset[str]) -> str:
        if choice.mode == "none":
            return f"all\n{CONTENT}"
        if choice.mode == "function":
            return f"{choice.name}\n{CONTENT}"
        return ""

    def _start(self, choice: ToolChoice) -> Start:
        return recipient_first_start(choice)

    def _call_text(self, name: str, is_code: bool) -> tuple[str, str]:
        return f"{SEGMENT}{name}\n{CONTENT}", ""

    def _text_begin(self) -> str:
        return f"{SEGMENT}all\n{CONTENT}"


class V25Format(Format):
    name = "v2.llama3"
    stop = ("<|eot_id|>", "<|end_of_text|>")
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    protocol: ClassVar[Protocol] = Protocol(
        text_markers=((CALL_SEPARATOR, NAME),),
        args_markers=((CALL_SEPARATOR, NAME),),
        code_markers=((CALL_SEPARATOR, NAME),),
        name_end="\n",
        stops=stop,
    )

    def _open(self, role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def _system(self, toolset: ToolSet) -> str:
        second = CODE_INTERPRETER_TEXT if toolset.code_interpreter else DEFAULT_SYSTEM
        namespace = render_namespace(toolset.functions)
        return self._open("system") + namespace + "<|eot_id|>" + self._open("system") + second + "<|eot_id|>"

    def _turn(self, turn: Turn) -> str:
        if turn.role == "tool":
            return self._open("tool") + f"name={turn.tool_name}\n{turn.text}<|eot_id|>"
        if turn.role != "assistant":
            return self._open(turn.role) + turn.text + "<|eot_id|>"
        if not turn.text and not turn.calls:
            return ""
        calls = "".join(f"{CALL_SEPARATOR}{call.name}\n{call.arguments}" for call in turn.calls)
        return self._open("assistant") + turn.text + calls + "<|eot_id|>"

    def _choice_prefix(self, choice: ToolChoice, code: frozenset[str]) -> str:
        if choice.mode == "required":
            return CALL_SEPARATOR
        if choice.mode == "function":
            return f"{CALL_SEPARATOR}{choice.name}\n"
        return ""

    def _start(self, choice: ToolChoice) -> Start:
        return text_first_start(choice, CALL_SEPARATOR)

    def _call_text(self, name: str, is_code: bool) -> tuple[str, str]:
        return f"{CALL_SEPARATOR}{name}\n", ""

    def _text_begin(self) -> str:
        return ""
