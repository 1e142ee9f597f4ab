"""Serve Functionary models with vLLM's own OpenAI-compatible server plus our plugin.

The plugin (`functionary_agent.server.plugin`) gives vLLM, for every Functionary format, a tool-call parser built
on `functionary_agent.formats`, a renderer that writes exactly the prompt `formats` writes, and grammar-constrained
calls (vLLM structured outputs from the format's call grammar). `functionary-agent serve` starts vLLM with it.

Importing this package never imports vLLM: the modules that do (`plugin`, `tool_parser`, `renderer`) load only
inside a vLLM process.
"""

from __future__ import annotations

from functionary_agent.server._settings import FORMAT_ENV, GRAMMAR_ENV, GRAMMAR_XARG, mode_for

__all__ = ["FORMAT_ENV", "GRAMMAR_ENV", "GRAMMAR_XARG", "mode_for"]
