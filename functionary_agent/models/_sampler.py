"""The embedded engine's sampler: llama.cpp's sampler chain over the logits, with a grammar checked on the token it
picks first and applied to the whole vocabulary only when that token is refused (as llama.cpp's `common_sampler`)."""


from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from functionary_agent.errors import ModelError

logger = logging.getLogger(__name__)

_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


@dataclass(frozen=True)
class Sampling:
    """llama.cpp sampler settings; temperature 0 is greedy (the default: a 135M model is at its best greedy)."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0


class _TokenArray:
    """A llama_token_data_array over a numpy view, refilled from logits without a Python loop."""

    def __init__(self, size: int) -> None:
        self._data = (llama_cpp.llama_token_data * size)()
        self.view = np.frombuffer(memoryview(self._data).cast("B"), dtype=_TOKEN_DATA)
        self._ids = np.arange(size, dtype=np.intc)
        self.array = llama_cpp.llama_token_data_array(
            data=ctypes.cast(self._data, llama_cpp.llama_token_data_p), size=size, selected=-1, sorted=False
        )
        self.pointer = ctypes.byref(self.array)

    def fill(self, logits: np.ndarray, ids: np.ndarray | None = None) -> None:
        size = len(logits)
        self.view["id"][:size] = self._ids[:size] if ids is None else ids
        self.view["logit"][:size] = logits
        self.view["p"][:size] = 0.0
        self.array.size, self.array.selected, self.array.sorted = size, -1, False

    def selected(self) -> int:
        return int(self.view["id"][self.array.selected])


class Sampler:
    """The sampling chain of one turn, plus the grammar of the current phase (if any).

    The grammar is checked on the chain's pick first; only a refused token makes it filter the whole vocabulary and
    the chain pick again. The result is always a token the grammar accepts.
    """

    def __init__(self, llama: Any, sampling: Sampling) -> None:
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._all = _TokenArray(llama.n_vocab())
        self._one = _TokenArray(1)
        self._chain = _chain(llama.n_vocab(), sampling)
        self._grammar: Any = None

    def use_grammar(self, gbnf: str | None) -> None:
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if gbnf is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
            if not grammar:
                raise ModelError("llama.cpp could not compile the call grammar (see its message above)")
            self._grammar = grammar

    def sample(self, logits: np.ndarray) -> int | None:
        """The next token, or None when the grammar allows no token at all."""
        self._all.fill(logits)
        llama_cpp.llama_sampler_apply(self._chain, self._all.pointer)
        token = self._all.selected()
        if self._grammar is None or self._allowed(token):
            return token
        self._all.fill(logits)
        llama_cpp.llama_sampler_apply(self._grammar, self._all.pointer)
        if not np.isfinite(self._all.view["logit"]).any():
            return None
        llama_cpp.llama_sampler_apply(self._chain, self._all.pointer)
        return self._all.selected()

    def replay(self, gbnf: str, tokens: Sequence[int]) -> None:
        """The grammar `gbnf` afresh, after `tokens` (a way back to an earlier point: a grammar cannot rewind).
        The tokens are taken by the grammar only; the chain (greedy, or what the settings add) keeps its state."""
        self.use_grammar(gbnf)
        for token in tokens:
            llama_cpp.llama_sampler_accept(self._grammar, token)

    def allows(self, token: int) -> bool:
        """Whether the grammar (if any) accepts `token` next."""
        return self._grammar is None or self._allowed(token)

    def refused_after(self, token: int, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` (those of the tokens `ids`) with -inf for the tokens the grammar would refuse if
        `token` came next (a clone of the grammar takes `token`; the grammar itself does not move)."""
        if self._grammar is None:
            return logits.copy()
        probe = llama_cpp.llama_sampler_clone(self._grammar)
        try:
            llama_cpp.llama_sampler_accept(probe, token)
            self._all.fill(logits, ids)
            llama_cpp.llama_sampler_apply(probe, self._all.pointer)
            return np.array(self._all.view["logit"][: len(logits)])
        finally:
            llama_cpp.llama_sampler_free(probe)

    def _allowed(self, token: int) -> bool:
        self._one.fill(np.zeros(1, dtype=np.single), np.array([token], dtype=np.intc))
        llama_cpp.llama_sampler_apply(self._grammar, self._one.pointer)
        return bool(np.isfinite(self._one.view["logit"][0]))

    def accept(self, token: int, *, grammar: bool = True) -> None:
        llama_cpp.llama_sampler_accept(self._chain, token)
        if grammar and self._grammar is not None:
            llama_cpp.llama_sampler_accept(self._grammar, token)

    def close(self) -> None:
        self.use_grammar(None)
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def _chain(n_vocab: int, sampling: Sampling) -> Any:
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    steps = []
    if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
        steps.append(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, 64, sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty
            )
        )
    if sampling.temperature <= 0:
        steps.append(llama_cpp.llama_sampler_init_greedy())
    else:
        steps += [
            llama_cpp.llama_sampler_init_top_k(sampling.top_k),
            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1),
            llama_cpp.llama_sampler_init_temp(sampling.temperature),
            llama_cpp.llama_sampler_init_dist(sampling.seed & 0xFFFFFFFF),
        ]
    for step in steps:
        llama_cpp.llama_sampler_chain_add(chain, step)
    return chain
