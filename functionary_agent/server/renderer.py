"""vLLM renderer that writes prompts with `formats` (the same bytes the embedded engine feeds llama.cpp).

A chat template cannot do it: the Functionary prompt ends with a tool_choice prefix (">>>get_weather\\n" for a
named choice), and vLLM gives templates the tools but not tool_choice. Renderers get both (`ChatParams.tool_choice`
since vLLM 0.32's `vllm/renderers/`). vLLM picks the renderer by tokenizer mode (`--tokenizer-mode functionary`),
which `plugin.register` maps to vLLM's own HF tokenizer plus this renderer.
"""

from __future__ import annotations

from typing import Any

from vllm.renderers.hf import HfRenderer
from vllm.renderers.inputs.preprocess import parse_dec_only_prompt

from functionary_agent.formats import Format
from functionary_agent.server._settings import format_of_mode, plain_data, resolve_format
from functionary_agent.server.tool_parser import check_request_tools


class FunctionaryRenderer(HfRenderer):
    """HF tokenizer, Functionary prompt. The format: pinned by the tokenizer mode, else resolved per model."""

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        pinned = format_of_mode(getattr(config.model_config, "tokenizer_mode", None))
        self.format: Format = resolve_format(pinned, self.tokenizer)
        self._bos = _bos_text(self.tokenizer)

    def render_messages(self, messages: Any, params: Any) -> tuple[list[Any], Any]:
        conversation = [plain_data(message) for message in messages]
        kwargs = params.chat_template_kwargs or {}
        tools = kwargs.get("tools")
        check_request_tools(tools or (), self.format)  # vLLM renders before the parser sees the request
        # vLLM passes no tool_choice without tools; `render` treats a request without tools as "none" itself
        choice = params.tool_choice if params.tool_choice is not None else "auto"
        text = self.format.render(
            conversation,
            tools,
            tool_choice=plain_data(choice),
            add_generation_prompt=bool(kwargs.get("add_generation_prompt", True)),
        )
        return conversation, parse_dec_only_prompt(self._bos + text)

    async def render_messages_async(self, messages: Any, params: Any) -> tuple[list[Any], Any]:
        return self.render_messages(messages, params)


def _bos_text(tokenizer: Any) -> str:
    """The BOS token's text where the tokenizer adds one: vLLM tokenizes chat prompts without special tokens, and
    llama.cpp (the embedded engine) adds BOS exactly when the model asks for it."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos_id is None:
        return ""
    ids = tokenizer.encode("a", add_special_tokens=True)
    return str(tokenizer.bos_token) if ids and ids[0] == bos_id else ""
