"""`chatml-v3`: the v3 ">>>recipient" protocol inside ChatML turns, for small ChatML models such as SmolLM2.

It is v3 with only the turn wrapper swapped: `<|start_header_id|>{role}<|end_header_id|>\\n\\n…<|eot_id|>` becomes
`<|im_start|>{role}\\n…<|im_end|>\\n`. Same system prompt (the TypeScript namespace), same segments, same tool_choice
prefixes, so everything known about v3 outputs carries over. Tool results keep v3's own role, `tool`: a model that
has never seen it still reads a distinct speaker, and results never pass for the user's words (a `user` turn would
invite the model to answer the result as if the user had asked something).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from functionary_agent.formats._stream import Protocol
from functionary_agent.formats.v3 import V3Format


class ChatMLV3Format(V3Format):
    name = "chatml-v3"
    stop = ("<|im_end|>", "<|endoftext|>")
    generation_prompt = "<|im_start|>assistant\n>>>"
    protocol: ClassVar[Protocol] = dataclasses.replace(V3Format.protocol, stops=stop)

    def _open(self, role: str) -> str:
        return f"<|im_start|>{role}\n"

    def _close(self) -> str:
        return "<|im_end|>\n"
