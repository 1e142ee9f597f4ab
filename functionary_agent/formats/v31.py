"""Functionary v3.1 (`v3-llama3.1`): Meta's Llama 3.1 tool format, `<function=name>{json}</function>`.

Text needs no opener; a call is `<function=NAME>` + JSON + `</function>`; python code follows `<|python_tag|>` and
runs to the end of the turn. Turns with calls end with `<|eom_id|>`, tool results come back as `ipython` turns.
"""

from __future__ import annotations

import json
from typing import ClassVar

from functionary_agent.formats._common import Call, ToolChoice, ToolSet, Turn
from functionary_agent.formats._stream import CODE, NAME, TEXT, Protocol, Start
from functionary_agent.formats.base import Format, text_first_start

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PYTHON_TAG = "<|python_tag|>"
INSTRUCTIONS = (
    "\nThink very carefully before calling functions.\n"
    "If a you choose to call a function ONLY reply in the following format:\n"
    "<{start_tag}={function_name}>{parameters}{end_tag}\n"
    "where\n\n"
    "start_tag => `<function`\n"
    "parameters => a JSON dict with the function argument name as key and function argument value as value.\n"
    "end_tag => `</function>`\n\n"
    "Here is an example,\n"
    '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
    "Reminder:\n"
    "- If looking for real time information use relevant functions before falling back to brave_search\n"
    "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
    "- Required parameters MUST be specified\n"
    "- Only call one function at a time\n"
    "- Put the entire function call reply on one line\n\n"
)


class V31Format(Format):
    name = "v3-llama3.1"
    stop = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    protocol: ClassVar[Protocol] = Protocol(
        text_markers=((FUNCTION_OPEN, NAME), (PYTHON_TAG, CODE)),
        args_markers=((FUNCTION_CLOSE, TEXT), (FUNCTION_OPEN, NAME), (PYTHON_TAG, CODE)),
        code_markers=(),
        name_end=">",
        stops=stop,
    )

    def _system(self, toolset: ToolSet) -> str:
        text = "<|start_header_id|>system<|end_header_id|>\n\n"
        text += "Environment: ipython\n\n" if toolset.code_interpreter else "\n"
        text += "Cutting Knowledge Date: December 2023\n\n"
        if toolset.functions:
            text += "\nYou have access to the following functions:\n\n"
            for function in toolset.functions:
                description = function.get("description") or ""
                listing = json.dumps(dict(function), ensure_ascii=False)
                text += f"Use the function '{function['name']}' to '{description}'\n{listing}\n\n"
            text += INSTRUCTIONS
        return text + "<|eot_id|>"

    def _turn(self, turn: Turn) -> str:
        if turn.role == "tool":
            return f"<|start_header_id|>ipython<|end_header_id|>\n\n{turn.text}<|eot_id|>"
        head = f"<|start_header_id|>{turn.role}<|end_header_id|>\n\n"
        if turn.role != "assistant":
            return head + turn.text + "<|eot_id|>"
        if not turn.text and not turn.calls:
            return ""
        calls = "".join(self._call(call) for call in turn.calls)
        return head + turn.text + calls + ("<|eom_id|>" if turn.calls else "<|eot_id|>")

    def _call(self, call: Call) -> str:
        if call.is_code:
            return PYTHON_TAG + call.arguments
        return f"{FUNCTION_OPEN}{call.name}>{call.arguments}{FUNCTION_CLOSE}"

    def _choice_prefix(self, choice: ToolChoice, code: frozenset[str]) -> str:
        if choice.mode == "required":
            return FUNCTION_OPEN
        if choice.mode == "function":
            return PYTHON_TAG if choice.name in code else f"{FUNCTION_OPEN}{choice.name}>"
        return ""

    def _start(self, choice: ToolChoice) -> Start:
        return text_first_start(choice, FUNCTION_OPEN)

    def _call_text(self, name: str, is_code: bool) -> tuple[str, str]:
        if is_code:
            return PYTHON_TAG, ""
        return f"{FUNCTION_OPEN}{name}>", FUNCTION_CLOSE

    def _text_begin(self) -> str:
        return ""
