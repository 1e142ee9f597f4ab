"""The vLLM plugin: registers the Functionary tool parsers, tokenizer modes and renderer with vLLM.

Loaded two ways, both idempotent: as a `vllm.general_plugins` entry point (vLLM calls `register` in every process
it starts: the API server renders and parses, the engine compiles grammars and needs the tokenizer mode), and as
`--tool-parser-plugin functionary_agent.server.plugin` (importing the module registers). Registration is by name
only (vLLM's lazy registries): nothing heavy is imported until vLLM asks for a parser or a renderer.

Names: `functionary` (format resolved per model) and `functionary-<format>` for v3.llama3, v3-llama3.1, v2.llama3,
v2 and chatml-v3, each both a `--tool-call-parser` and a `--tokenizer-mode`.
"""

from __future__ import annotations

import logging

from functionary_agent.server._settings import PARSER_CLASSES, mode_names

logger = logging.getLogger(__name__)
_PARSER_MODULE = "functionary_agent.server.tool_parser"
_RENDERER_MODULE = "functionary_agent.server.renderer"
_registered = False


def register() -> None:
    """Entry point for vLLM (`vllm.general_plugins`)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.tool_parsers import ToolParserManager

    for mode, format_name in mode_names().items():
        ToolParserManager.register_lazy_module(mode, _PARSER_MODULE, PARSER_CLASSES[format_name])
    _register_renderer()


def _register_renderer() -> None:
    """Tokenizer modes map to vLLM's own HF tokenizer; only the renderer (prompt writing) is ours."""
    try:
        from vllm.renderers.registry import RENDERER_REGISTRY
        from vllm.tokenizers.registry import TokenizerRegistry
    except ImportError:  # vLLM before the renderer registry: the model's chat template renders the prompt
        logger.warning("this vLLM has no renderer registry; prompts come from the model's chat template")
        return
    for mode in mode_names():
        TokenizerRegistry.register(mode, "vllm.tokenizers.hf", "CachedHfTokenizer")
        RENDERER_REGISTRY.register(mode, _RENDERER_MODULE, "FunctionaryRenderer")


register()
