"""The shape every format shares: render a prompt, parse an output (whole or streamed), describe the call grammar.

A format subclass supplies only its strings: how a turn is written, its system prompt, its markers. Everything
that must behave the same across formats (tool selection for tool_choice, message normalisation, the parser, the
grammar's structure) lives here once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from functionary_agent.formats._common import (
    PYTHON,
    ToolChoice,
    ToolSet,
    Turn,
    code_names,
    effective_tool_choice,
    function_names,
    prepare_turns,
    select_tools,
)
from functionary_agent.formats._stream import ARGS, NAME, TEXT, Protocol, Start, StreamParser, message_from_deltas
from functionary_agent.formats.grammar import CallGrammar, CallSpec

Messages = Iterable[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]] | None


class Format(ABC):
    """One Functionary prompt format. Instances are stateless and shared; get them with `get_format(name)`."""

    name: ClassVar[str]
    stop: ClassVar[tuple[str, ...]]
    generation_prompt: ClassVar[str]  # opens the assistant turn, before any tool_choice prefix
    protocol: ClassVar[Protocol]
    gen_tail: ClassVar[str] = ""  # the end of `generation_prompt` that belongs to the first opener (">>>")

    def render(
        self,
        messages: Messages,
        tools: Tools = None,
        *,
        tool_choice: Any = "auto",
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text (no BOS token); with `add_generation_prompt` it ends with the tool_choice prefix."""
        all_tools = list(tools or ())
        choice = effective_tool_choice(all_tools, tool_choice)
        toolset = select_tools(all_tools, choice)
        code = code_names(all_tools)
        parts = [self._system(toolset)]
        parts.extend(self._turn(turn) for turn in prepare_turns(messages, code))
        if add_generation_prompt:
            parts.append(self.generation_prompt + self._choice_prefix(choice, code))
        return "".join(parts)

    def parse(self, text: str, *, tools: Tools = None, tool_choice: Any = "auto") -> dict[str, Any]:
        """The assistant message in `text` (the output after the prompt, stop token or not). Never raises on it."""
        parser = self.stream_parser(tools=tools, tool_choice=tool_choice)
        deltas = parser.feed(text)
        rest, _ = parser.finish()
        return message_from_deltas([*deltas, *rest])

    def stream_parser(self, *, tools: Tools = None, tool_choice: Any = "auto") -> StreamParser:
        all_tools = list(tools or ())
        choice = effective_tool_choice(all_tools, tool_choice)
        known = frozenset(function_names(all_tools))
        return StreamParser(self.protocol, self._start(choice), code_names(all_tools), known)

    def call_grammar(self, tools: Tools, tool_choice: Any = "auto") -> CallGrammar:
        """What the model may emit for this request; see `functionary_agent.formats.grammar`."""
        all_tools = list(tools or ())
        choice = effective_tool_choice(all_tools, tool_choice)
        toolset = select_tools(all_tools, choice)
        code = code_names(all_tools)
        specs = [self._spec(str(function["name"]), function.get("parameters"), code) for function in toolset.functions]
        if toolset.code_interpreter and PYTHON in code:
            specs.append(self._spec(PYTHON, None, code))
        return CallGrammar(
            format=self.name,
            calls=tuple(specs),
            text_allowed=choice.mode in ("auto", "none"),
            text_begin=self._text_begin(),
            min_calls=1 if choice.mode in ("required", "function") else 0,
            max_calls={"none": 0, "function": 1}.get(choice.mode),
            prompt_suffix=self.gen_tail + self._choice_prefix(choice, code),
            triggers=self._triggers(specs),
            stop=self.stop,
        )

    def _spec(self, name: str, parameters: Any, code: frozenset[str]) -> CallSpec:
        is_code = name in code
        schema = None if is_code else (parameters if isinstance(parameters, Mapping) else {"type": "object"})
        begin, end = self._call_text(name, is_code)
        return CallSpec(name, schema, begin, end)

    def _triggers(self, specs: Sequence[CallSpec]) -> tuple[str, ...]:
        markers = [marker for marker, _ in self.protocol.text_markers]
        openers = [spec.begin for spec in specs] + ([self._text_begin()] if specs else [])
        return tuple(m for m in markers if any(opener.startswith(m) for opener in openers))

    # -- what each format spells its own way --------------------------------------------------------------------

    @abstractmethod
    def _system(self, toolset: ToolSet) -> str:
        """The system turns that present the tools."""

    @abstractmethod
    def _turn(self, turn: Turn) -> str:
        """One message."""

    @abstractmethod
    def _choice_prefix(self, choice: ToolChoice, code: frozenset[str]) -> str:
        """What follows the generation prompt to enforce tool_choice."""

    @abstractmethod
    def _start(self, choice: ToolChoice) -> Start:
        """Where the model's output begins, given `_choice_prefix`."""

    @abstractmethod
    def _call_text(self, name: str, is_code: bool) -> tuple[str, str]:
        """The (begin, end) text around one call's arguments in the model's output."""

    @abstractmethod
    def _text_begin(self) -> str:
        """The opener of a free-text segment in the model's output."""


def recipient_first_start(choice: ToolChoice) -> Start:
    """Where output begins in formats whose every segment opens with a recipient (v2, v3): the prompt already
    holds `all` for "none" and the name for a named choice."""
    if choice.mode == "none":
        return Start(TEXT)
    if choice.mode == "function":
        return Start(ARGS, choice.name)
    return Start(NAME)


def text_first_start(choice: ToolChoice, call_marker: str) -> Start:
    """Where output begins in formats that start with free text and mark calls (v2.5, v3.1): the prompt already
    holds the call marker for "required" and the whole call opener for a named choice."""
    if choice.mode == "required":
        return Start(NAME, marker=call_marker)
    if choice.mode == "function":
        return Start(ARGS, choice.name)
    return Start(TEXT)

