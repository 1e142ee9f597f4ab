"""Any OpenAI-compatible server (Functionary's, vLLM, llama.cpp, OpenAI) through the official `openai` package.

Retries are ours (tenacity), not the SDK's, so that Retry-After, jitter and the final message are under one
roof. Streams are normalised here: real servers send `arguments: null`, split names over deltas, repeat or omit
ids, send arguments as a dict, and say `finish_reason: "stop"` after calls; consumers see clean deltas only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from functionary_agent.errors import ConfigurationError, ModelError
from functionary_agent.models.base import (
    AssistantMessage,
    ChatModel,
    Delta,
    DeltaAccumulator,
    StreamItem,
    ToolCall,
    ToolChoice,
    arguments_text,
    new_call_id,
    stream_call_index,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_STATUSES = frozenset({408, 409, 429})
_RETRY_AFTER_CAP = 60.0


class OpenAICompatibleModel(ChatModel):
    """A model behind an OpenAI-compatible `/chat/completions` endpoint.

    Settings come from the arguments or `FUNCTIONARY_BASE_URL`, `FUNCTIONARY_MODEL`, `FUNCTIONARY_API_KEY`.
    With no model name the server's first listed model is used (local servers usually serve one).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        retry_initial_delay: float = 0.5,
        retry_max_delay: float = 20.0,
        **settings: Any,
    ) -> None:
        base_url = base_url or os.environ.get("FUNCTIONARY_BASE_URL")
        if not base_url:
            raise ConfigurationError("OpenAICompatibleModel needs base_url=... or FUNCTIONARY_BASE_URL")
        self.base_url = base_url.rstrip("/")
        self.model = model or os.environ.get("FUNCTIONARY_MODEL") or None
        # Local servers need no key, but the SDK insists on one; never fall back to OPENAI_API_KEY, which
        # would send a user's OpenAI key to whatever server base_url names.
        self._api_key = api_key or os.environ.get("FUNCTIONARY_API_KEY") or "not-needed"
        self.timeout = timeout
        self.max_retries = max_retries
        backoff = wait_exponential(multiplier=retry_initial_delay, max=retry_max_delay) + wait_random(
            0, retry_initial_delay
        )
        self._wait = _RetryAfterOrBackoff(backoff)
        self.settings = settings
        self._clients: dict[asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, _LoopPool]] = {}
        self._context_window: int | None = None  # asked once; 0: the server lists none

    def __repr__(self) -> str:
        return f"OpenAICompatibleModel(model={self.model!r}, base_url={self.base_url!r})"

    async def acomplete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AssistantMessage:
        request = await self._request(messages, tools, tool_choice, settings)
        response = await self._with_retries(lambda: self._post_chat(request))
        if not getattr(response, "choices", None):
            raise ModelError(f"{self.base_url} answered without choices: {str(response)[:200]}")
        return _message_from_choice(response.choices[0], getattr(response, "usage", None))

    async def astream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        **settings: Any,
    ) -> AsyncIterator[StreamItem]:
        request = await self._request(messages, tools, tool_choice, settings)
        # Only opening the stream is retried: once deltas have reached the caller, a retry would repeat them.
        request.setdefault("stream_options", {"include_usage": True})  # the last chunk then carries the usage
        request["stream"] = True
        stream = await self._with_retries(lambda: self._post_chat(request))
        normaliser, accumulator = _StreamNormaliser(), DeltaAccumulator()
        try:
            while (chunk := await self._next_chunk(stream)) is not None:
                normaliser.chunks += 1
                for delta in normaliser.feed(chunk):
                    accumulator.add(delta)
                    yield delta
        finally:
            await stream.close()
        if not normaliser.chunks:  # e.g. a plain JSON body where an event stream was asked for
            raise ModelError(f"{self.base_url} sent no stream chunks for a streaming request")
        for delta in normaliser.finish():
            accumulator.add(delta)
            yield delta
        yield replace(accumulator.message(normaliser.finish_reason), usage=normaliser.usage)

    async def _next_chunk(self, stream: Any) -> Any:
        """The next chunk, or None at the end; any transport failure mid-stream is the server's fault."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:  # the SDK's transport errors have no common base class we can name
            raise ModelError(f"the stream from {self.base_url} broke off: {_reason(exc)}") from exc

    async def aclose(self) -> None:
        """Leave this loop's connection pool (closed with its last user); other (finished) loops are dropped."""
        loop = asyncio.get_running_loop()
        clients, self._clients = self._clients, {}
        if loop in clients:
            await clients[loop][1].leave()

    def _client(self) -> openai.AsyncOpenAI:
        """One client per event loop (httpx connection pools cannot cross loops), over the loop's shared pool."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None or entry[1].http.is_closed:
            for stale in [old for old in self._clients if old.is_closed()]:
                del self._clients[stale]
            pool = _LoopPool.join(loop)
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0,
                http_client=pool.http,
            )
            entry = self._clients[loop] = (client, pool)
        return entry[0]

    async def _request(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]], tool_choice: ToolChoice,
        settings: Mapping[str, Any],
    ) -> dict[str, Any]:
        extra = {**self.settings, **settings}  # every setting is a body field (vLLM's top_k, ... included)
        parallel = extra.pop("parallel_tool_calls", True)
        request: dict[str, Any] = {"model": await self._model_name(), "messages": list(messages), **extra}
        if tools:
            request["tools"] = list(tools)
            request["tool_choice"] = tool_choice
            if parallel is False:
                request["parallel_tool_calls"] = False
        return request

    async def _post_chat(self, body: dict[str, Any]) -> Any:
        """POST the body to /chat/completions through the openai client (its auth, headers, timeouts, errors and
        response types) as the client's documented `post`. Not `chat.completions.create`: that walks the body
        against the SDK's parameter types on every request (about 1 ms of CPU, a third of a batch item's), and a
        body made of plain JSON values, as ours is, comes out of that walk unchanged."""
        from openai.types.chat import ChatCompletion, ChatCompletionChunk

        stream = bool(body.get("stream"))
        return await self._client().post(
            "/chat/completions", body=body, cast_to=ChatCompletion, stream=stream,
            stream_cls=openai.AsyncStream[ChatCompletionChunk] if stream else None,
        )

    async def acontext_window(self) -> int | None:
        """The context length the server lists for this model (`max_model_len` on vLLM, `context_length` or
        `context_window` elsewhere), asked once; None when it lists none or cannot be asked."""
        if self._context_window is None:
            self._context_window = await self._listed_context_window()
        return self._context_window or None

    async def _listed_context_window(self) -> int:
        try:
            name = await self._model_name()
            page = await self._with_retries(lambda: self._client().models.list())
        except ModelError as exc:
            logger.info("cannot read the context length from %s/models: %s", self.base_url, exc)
            return 0
        for entry in getattr(page, "data", None) or []:
            if getattr(entry, "id", None) == name:
                extra = getattr(entry, "model_extra", None) or {}
                for key in ("max_model_len", "context_length", "context_window"):
                    if isinstance(extra.get(key), int) and extra[key] > 0:
                        return int(extra[key])
        return 0

    async def _model_name(self) -> str:
        if self.model is None:
            page = await self._with_retries(lambda: self._client().models.list())
            names = [entry.id for entry in getattr(page, "data", None) or []]
            if not names:
                raise ModelError(f"no model name was given and {self.base_url}/models lists none; pass model=...")
            self.model = names[0]
        return self.model

    async def _with_retries(self, send: Callable[[], Awaitable[T]]) -> T:
        """Retry connection failures, 408, 409, 429 and 5xx with backoff; other errors fail at once."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_retryable),
            wait=self._wait,
            stop=stop_after_attempt(self.max_retries + 1),
            reraise=True,
            before_sleep=lambda state: logger.info("retrying %s: %s", self.base_url, state.outcome),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await send()
        except openai.APIStatusError as exc:
            raise ModelError(f"{self.base_url} answered {exc.status_code}: {_reason(exc)}") from exc
        except openai.APIConnectionError as exc:
            raise ModelError(f"cannot reach {self.base_url}: {_reason(exc)}") from exc
        except openai.OpenAIError as exc:
            raise ModelError(f"request to {self.base_url} failed: {_reason(exc)}") from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")


class _LoopPool:
    """The HTTP connection pool of one event loop, shared by every remote model on it: each pool holds its own TLS
    context (about 0.8 MB), so 1,000 conversations on one loop must not make 1,000 of them. Closed when its last
    user leaves; the credentials stay per model (each has its own `AsyncOpenAI` over the pool)."""

    _pools: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool]] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.http = openai.DefaultAsyncHttpxClient()
        self.users = 0

    @classmethod
    def join(cls, loop: asyncio.AbstractEventLoop) -> _LoopPool:
        pool = cls._pools.get(loop)
        if pool is None or pool.http.is_closed:
            pool = cls._pools[loop] = cls()
        pool.users += 1
        return pool

    async def leave(self) -> None:
        self.users -= 1
        if self.users <= 0:
            await self.http.aclose()


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code in _RETRY_STATUSES or exc.status_code >= 500)


class _RetryAfterOrBackoff:
    """Honour a server's Retry-After (seconds, up to a minute); otherwise exponential backoff with jitter."""

    def __init__(self, backoff: Callable[[RetryCallState], float]) -> None:
        self._backoff = backoff

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        response = getattr(exc, "response", None)
        header = response.headers.get("retry-after") if response is not None else None
        try:
            return min(max(float(header), 0.0), _RETRY_AFTER_CAP) if header else self._backoff(state)
        except ValueError:  # an HTTP date; backoff is close enough
            return self._backoff(state)


def _reason(exc: BaseException) -> str:
    """The server's own error message where it sent one, else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, Mapping) else error
        if message:
            return str(message)[:500]
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    return f"{text} ({cause})" if cause and str(cause) not in text else text


def _message_from_choice(choice: Any, usage: Any) -> AssistantMessage:
    message = choice.message
    calls = [
        ToolCall(call.id or new_call_id(), call.function.name or "", arguments_text(call.function.arguments))
        for call in getattr(message, "tool_calls", None) or []
        if getattr(call, "function", None) is not None
    ]
    legacy = getattr(message, "function_call", None)  # pre-"tools" servers
    if legacy is not None and not calls:
        calls.append(ToolCall(new_call_id(), legacy.name or "", arguments_text(legacy.arguments)))
    usage_dict = usage.model_dump() if hasattr(usage, "model_dump") else None
    return AssistantMessage(message.content, calls, choice.finish_reason, usage_dict)


@dataclass
class _CallState:
    id: str | None = None
    name: str = ""
    started: bool = False


@dataclass
class _StreamNormaliser:
    """Raw SDK chunks -> clean deltas. A call is announced once its name is complete: when its arguments
    begin, another call begins, or the stream ends (names may be split over several deltas)."""

    calls: dict[int, _CallState] = field(default_factory=dict)
    finish_reason: str | None = None
    chunks: int = 0
    usage: dict[str, Any] | None = None

    def feed(self, chunk: Any) -> list[Delta]:
        usage = getattr(chunk, "usage", None)
        if usage is not None and hasattr(usage, "model_dump"):
            self.usage = usage.model_dump()
        choices = getattr(chunk, "choices", None) or []
        if not choices:  # usage-only chunks
            return []
        choice = choices[0]
        self.finish_reason = getattr(choice, "finish_reason", None) or self.finish_reason
        delta = getattr(choice, "delta", None)
        if delta is None:
            return []
        out: list[Delta] = []
        if getattr(delta, "content", None):
            out.append({"content": delta.content})
        for raw in getattr(delta, "tool_calls", None) or []:
            out.extend(self._call_delta(raw))
        legacy = getattr(delta, "function_call", None)
        if legacy is not None and not delta.tool_calls:
            out.extend(self._call_delta(_LegacyCall(legacy)))
        return out

    def finish(self) -> list[Delta]:
        return [delta for index in sorted(self.calls) for delta in self._announce(index)]

    def _call_delta(self, raw: Any) -> list[Delta]:
        index = getattr(raw, "index", None)
        if index is None:
            index = self._index_without_one(getattr(raw, "id", None))
        out = [delta for earlier in sorted(self.calls) if earlier < index for delta in self._announce(earlier)]
        state = self.calls.setdefault(index, _CallState())
        state.id = state.id or getattr(raw, "id", None)
        function = getattr(raw, "function", None)
        name = getattr(function, "name", None)
        if name and not state.started and name != state.name:  # a repeated full name is not a continuation
            state.name += name
        arguments = arguments_text(getattr(function, "arguments", None))
        if arguments:
            out.extend(self._announce(index))
            out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
        return out

    def _index_without_one(self, call_id: str | None) -> int:
        return stream_call_index({index: state.id for index, state in self.calls.items()}, call_id)

    def _announce(self, index: int) -> list[Delta]:
        state = self.calls[index]
        if state.started:
            return []
        state.started = True
        state.id = state.id or new_call_id()
        head = {"index": index, "id": state.id, "type": "function", "function": {"name": state.name, "arguments": ""}}
        return [{"tool_calls": [head]}]


@dataclass
class _LegacyCall:
    function: Any
    index: int = 0
    id: str | None = None
