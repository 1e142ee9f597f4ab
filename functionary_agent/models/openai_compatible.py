"""Any OpenAI-compatible server (Functionary's, vLLM, llama.cpp, OpenAI) through the official `openai` package.

Retry policy (ours, through tenacity, not the SDK's): only what can recover is retried, namely timeouts, a
connection that breaks mid-request, 408, 409, 429 and 5xx, up to `max_retries` more attempts (default 4), waiting
`retry_initial_delay * 2**n` seconds (0.5, 1, 2, 4; at most `retry_max_delay`) plus jitter, or what the server's
`Retry-After` / `retry-after-ms` asks. A server that asks for more than `max_retry_after` seconds (default a minute)
is not waited for: the error says at once how long it asked for, as retrying sooner would only be refused again.
What cannot recover fails on the first attempt with one line that names the URL and what to check: a refused
connection, a host name that does not resolve, a TLS failure, other 4xx (a 404 from a base URL without a version
segment suggests `.../v1`), a body that is not JSON. A base URL that cannot work (no `http://`, no host, a bad port)
is refused by the constructor. Connecting may take `min(timeout, 10)` seconds; answering, `timeout` (for a stream:
between two pieces of data).

Streams are normalised here: real servers send `arguments: null`, split names over deltas, repeat or omit
ids, send arguments as a dict, and say `finish_reason: "stop"` after calls; consumers see clean deltas only.
Only opening a stream is retried. A stream that breaks off, stops sending for `timeout` seconds, sends a line that
is not JSON or an error event, or ends without a `finish_reason` (a server killed mid-answer may just close the
connection: no error, no `[DONE]`) raises `ModelError` before its message is made: no half answer is ever final.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import re
import socket
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from functionary_agent._openai_messages import new_call_id
from functionary_agent.errors import ConfigurationError, ModelError
from functionary_agent.messages import AssistantMessage, ToolCall, ToolChoice, arguments_text
from functionary_agent.models.base import ChatModel, Delta, DeltaAccumulator, StreamItem, stream_call_index

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_STATUSES = frozenset({408, 409, 429})
_RETRY_AFTER_CAP = 60.0  # the default of `max_retry_after`
_CONNECT_TIMEOUT_CAP = 10.0  # a host that drops packets costs this per attempt, not the whole `timeout`
# A connection that broke after it was made (the server restarted, a proxy reset it) may work again; these are the
# transport errors' class names in httpx and httpcore (openai 1.x) and in httpx2 and httpcore2 (openai 3.x).
_RECOVERABLE_TRANSPORT_ERRORS = frozenset({"ReadError", "WriteError", "RemoteProtocolError"})
_VERSION_SEGMENT = re.compile(r"v\d+\w*")  # /v1, /v1beta, /v4 ...
_ENDPOINTS = ("/chat/completions", "/completions", "/models")
_DROPPED = "the partial answer was dropped"


class OpenAICompatibleModel(ChatModel):
    """A model behind an OpenAI-compatible `/chat/completions` endpoint.

    Settings come from the arguments or `FUNCTIONARY_BASE_URL`, `FUNCTIONARY_MODEL`, `FUNCTIONARY_API_KEY`.
    With no model name the server's first listed model is used (local servers usually serve one). `max_retries`,
    `retry_initial_delay`, `retry_max_delay` and `max_retry_after` set the retry policy (see the module's
    docstring); pass the model to `Conversation(model)` to use them there. `ConfigurationError` for a base URL or
    setting that cannot work.

    Attributes:
        base_url: The server's base URL (e.g. `http://127.0.0.1:8000/v1`), without a trailing slash.
        model: The model name sent with each request; None until the first request asks the server for its
            first listed model (then that name).
        timeout: Seconds to wait for an answer (for a stream: between two pieces of data); connecting may take
            `min(timeout, 10)` seconds.
        max_retries: How many more attempts a recoverable failure gets (timeouts, broken connections, 408, 409,
            429, 5xx); 0: none.
        retry_initial_delay: Seconds before the first retry; each later wait doubles, plus jitter.
        retry_max_delay: The longest wait in seconds between two attempts, unless the server asks for longer.
        max_retry_after: The longest `Retry-After` in seconds the model waits for; a server that asks for more
            fails the request at once.
        settings: Default request settings (each one a field of the request body); a request's own settings
            override them.
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
        max_retry_after: float = _RETRY_AFTER_CAP,
        **settings: Any,
    ) -> None:
        base_url = base_url or os.environ.get("FUNCTIONARY_BASE_URL")
        if not base_url:
            raise ConfigurationError("OpenAICompatibleModel needs base_url=... or FUNCTIONARY_BASE_URL")
        _check_retry_policy(timeout, max_retries, retry_initial_delay, retry_max_delay, max_retry_after)
        self.base_url = _checked_base_url(base_url)
        self.model = model or os.environ.get("FUNCTIONARY_MODEL") or None
        # Local servers need no key, but the SDK insists on one; never fall back to OPENAI_API_KEY, which
        # would send a user's OpenAI key to whatever server base_url names.
        self._api_key = api_key or os.environ.get("FUNCTIONARY_API_KEY") or "not-needed"
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_initial_delay, self.retry_max_delay = retry_initial_delay, retry_max_delay
        backoff = wait_exponential(multiplier=retry_initial_delay, max=retry_max_delay) + wait_random(
            0, retry_initial_delay
        )
        self.max_retry_after = max_retry_after
        self._wait = _RetryAfterOrBackoff(backoff, max_retry_after)
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
            while (chunk := await self._next_chunk(stream, normaliser.chunks)) is not None:
                normaliser.chunks += 1
                for delta in normaliser.feed(chunk):
                    accumulator.add(delta)
                    yield delta
        finally:
            await stream.close()
        self._check_stream_finished(normaliser)
        for delta in normaliser.finish():
            accumulator.add(delta)
            yield delta
        yield replace(accumulator.message(normaliser.finish_reason), usage=normaliser.usage)

    async def _next_chunk(self, stream: Any, received: int) -> Any:
        """The next chunk, or None at the end; any failure mid-stream is the server's, and ends the answer."""
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"{self.base_url} sent a stream line that is not JSON after {_chunks(received)} ({exc.msg}): "
                f"{_one_line(exc.doc)[:200]!r}; {_DROPPED}"
            ) from exc
        except openai.APITimeoutError as exc:
            raise ModelError(
                f"the stream from {self.base_url} stopped: no data for {self.timeout:g} s after {_chunks(received)} "
                f"(is the server overloaded or stuck? a slow model needs more timeout); {_DROPPED}"
            ) from exc
        except openai.APIConnectionError as exc:
            raise ModelError(
                f"the stream from {self.base_url} broke off after {_chunks(received)}: {_transport_reason(exc)}; "
                f"{_DROPPED}"
            ) from exc
        except openai.APIError as exc:  # an error event (`data: {"error": ...}`): the server gave up mid-answer
            raise ModelError(f"{self.base_url} sent an error mid-stream: {_reason(exc)}; {_DROPPED}") from exc
        except Exception as exc:  # anything else the SDK or its transport raises mid-stream
            raise ModelError(f"the stream from {self.base_url} broke off: {_reason(exc)}; {_DROPPED}") from exc

    def _check_stream_finished(self, normaliser: _StreamNormaliser) -> None:
        """A stream that ended without a `finish_reason` was cut (a server killed mid-answer closes the connection
        without an error or `[DONE]`): never let its first part pass for the whole answer."""
        if not normaliser.chunks:  # e.g. a plain JSON body where an event stream was asked for
            raise ModelError(f"{self.base_url} sent no stream chunks for a streaming request")
        if normaliser.finish_reason is None:
            raise ModelError(
                f"the stream from {self.base_url} ended after {_chunks(normaliser.chunks)} without a finish_reason "
                f"(the server closed the connection mid-answer?); {_DROPPED}"
            )

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
                base_url=self.base_url, api_key=self._api_key, max_retries=0, http_client=pool.http,
                timeout=openai.Timeout(self.timeout, connect=min(self.timeout, _CONNECT_TIMEOUT_CAP)),
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
            if not isinstance(exc.__cause__, openai.APIStatusError):  # unreachable: the chat request would fail too
                raise
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
        """Retry what can recover (see the module's docstring); anything else fails at once, as one `ModelError`."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda exc: _is_retryable(exc, self.max_retry_after)),
            wait=self._wait,
            stop=stop_after_attempt(self.max_retries + 1),
            reraise=True,
            before_sleep=self._log_retry,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return await send()
        except openai.OpenAIError as exc:
            gave_up = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
            raise ModelError(self._failure(exc) + gave_up) from exc
        except json.JSONDecodeError as exc:  # a body cut short (the server died mid-body), or not an API at all
            raise ModelError(
                f"{self.base_url} answered with a body that is not valid JSON ({exc.msg}, character {exc.pos}): "
                f"{_one_line(exc.doc)[:200]!r}; the server may have died mid-answer, or the URL is not an "
                "OpenAI-compatible API"
            ) from exc
        raise AssertionError("unreachable: tenacity either returns or re-raises")

    def _log_retry(self, state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        error = state.outcome.exception() if state.outcome else None
        logger.info(
            "retrying %s in %.1f s (attempt %d of %d failed): %s", self.base_url, delay, state.attempt_number,
            self.max_retries + 1, self._failure(error) if isinstance(error, openai.OpenAIError) else error,
        )

    def _failure(self, exc: openai.OpenAIError) -> str:
        """One line: the URL, what went wrong, and what to check."""
        if isinstance(exc, openai.APIStatusError):
            hint = _not_found_hint(self.base_url) if exc.status_code == 404 else ""
            return f"{self.base_url} answered {exc.status_code}: {_reason(exc)}{hint}{self._too_long_a_wait(exc)}"
        if _broke_mid_answer(exc):
            return f"the answer from {self.base_url} broke off: {_transport_reason(exc)}"
        if isinstance(exc, openai.APIConnectionError):
            return f"cannot reach {self.base_url}: {self._connection_problem(exc)}"
        return f"request to {self.base_url} failed: {_reason(exc)}"

    def _too_long_a_wait(self, exc: openai.APIStatusError) -> str:
        """For a server that asks for a longer wait than this client gives (Retry-After: 3600): that it was not
        waited for, and what to do."""
        asked = _asked_delay(exc.response.headers)
        if asked is None or asked <= self.max_retry_after or not _retryable_status(exc.status_code):
            return ""
        return (
            f"; it asks to wait {asked:.0f} s before retrying, more than max_retry_after={self.max_retry_after:g} s, "
            "so it was not retried: try again later"
        )

    def _connection_problem(self, exc: openai.APIConnectionError) -> str:
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        causes = _causes(exc)
        if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
            return f"connection refused at {host}:{port}; is the server running and listening on port {port}?"
        unresolved = next((cause for cause in causes if isinstance(cause, socket.gaierror)), None)
        if unresolved is not None:
            return f"cannot resolve the host name {host!r} ({unresolved.strerror}); check its spelling and the network"
        tls = next((cause for cause in causes if isinstance(cause, ssl.SSLError)), None)
        if tls is not None:
            return f"TLS failed ({_one_line(tls)}); check https:// against http:// and the server's certificate"
        if isinstance(exc, openai.APITimeoutError):
            if any(type(cause).__name__ == "ConnectTimeout" for cause in causes):
                limit = min(self.timeout, _CONNECT_TIMEOUT_CAP)
                return f"no connection within {limit:g} s; check the host and port (a firewall may drop packets)"
            return f"no answer within {self.timeout:g} s; is the server overloaded? (a slow model needs more timeout)"
        system = next((cause.strerror for cause in causes if isinstance(cause, OSError) and cause.strerror), None)
        return f"{system or _reason(exc)}; check the URL and the network"  # e.g. "No route to host"


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


def _checked_base_url(base_url: str) -> str:
    """The base URL without surrounding blanks or a trailing slash; `ConfigurationError` for one that cannot work
    (a missing or unknown scheme, no host, a bad port), which would otherwise fail only when the first request
    goes out."""
    url = base_url.strip().rstrip("/")
    if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise ConfigurationError(
            f"the server URL {base_url!r} has no http:// or https://; did you mean 'http://{url}'?"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigurationError(f"the server URL {base_url!r} must start with http:// or https://")
    if any(char.isspace() for char in url):
        raise ConfigurationError(f"the server URL {base_url!r} contains blanks; remove them")
    if not parts.hostname:
        raise ConfigurationError(f"the server URL {base_url!r} names no host; e.g. http://127.0.0.1:8000/v1")
    try:
        port = parts.port  # None without one
    except ValueError:  # ":99999", ":80a"
        port = 0
    if port == 0:
        raise ConfigurationError(f"the server URL {base_url!r} has an invalid port; ports are 1 to 65535")
    return url


def _check_retry_policy(
    timeout: float, max_retries: int, initial_delay: float, max_delay: float, max_retry_after: float
) -> None:
    if not timeout > 0:
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigurationError(f"max_retries must be a whole number, 0 or more, got {max_retries!r}")
    if not (initial_delay >= 0 and max_delay >= 0):
        raise ConfigurationError(
            f"retry delays must be 0 or more seconds, got retry_initial_delay={initial_delay!r}, "
            f"retry_max_delay={max_delay!r}"
        )
    if isinstance(max_retry_after, bool) or not (isinstance(max_retry_after, (int, float)) and max_retry_after >= 0):
        raise ConfigurationError(f"max_retry_after must be 0 or more seconds, got {max_retry_after!r}")


def _is_retryable(exc: BaseException, max_retry_after: float) -> bool:
    """Timeouts, connections broken after they were made, 408, 409, 429 and 5xx: what waiting can fix, unless the
    server asks for a longer wait than `max_retry_after`."""
    if isinstance(exc, openai.APIStatusError):
        asked = _asked_delay(exc.response.headers)
        return _retryable_status(exc.status_code) and (asked is None or asked <= max_retry_after)
    if isinstance(exc, openai.APITimeoutError):
        return True
    return _broke_mid_answer(exc)  # refused, unresolvable, TLS, a bad URL: waiting cannot help


def _retryable_status(status: int) -> bool:
    return status in _RETRY_STATUSES or status >= 500


def _broke_mid_answer(exc: BaseException) -> bool:
    """A connection that was made and then broke (reset, closed mid-body): the server went away mid-answer."""
    return isinstance(exc, openai.APIConnectionError) and not isinstance(exc, openai.APITimeoutError) and any(
        type(cause).__name__ in _RECOVERABLE_TRANSPORT_ERRORS and type(cause).__module__.startswith("http")
        for cause in _causes(exc)
    )


def _transport_reason(exc: BaseException) -> str:
    """What the transport said (`peer closed connection without sending complete message body ...`) rather than
    the SDK's bare "Connection error."."""
    transport = next((cause for cause in _causes(exc)[1:] if str(cause)), None)
    return _one_line(transport) if transport is not None else _reason(exc)


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the members of exception groups among them (anyio raises one when
    every address of a host failed), each once."""
    found: list[BaseException] = []
    pending = [exc]
    while pending and len(found) < 50:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending.extend(getattr(current, "exceptions", ()))
        pending.extend(link for link in (current.__cause__, current.__context__) if link is not None)
    return found


def _not_found_hint(base_url: str) -> str:
    """For a 404: the base URL most servers want, when this one lacks a version segment or names an endpoint."""
    path = urlsplit(base_url).path
    for endpoint in _ENDPOINTS:
        if path.endswith(endpoint):
            return f"; the URL should stop before {endpoint}: did you mean {base_url[: -len(endpoint)]}?"
    if any(_VERSION_SEGMENT.fullmatch(segment) for segment in path.split("/")):
        return ""
    return f"; did you mean {base_url}/v1?"


class _RetryAfterOrBackoff:
    """Honour a server's `retry-after-ms` or `Retry-After` (seconds or an HTTP date), up to `cap` seconds (a longer
    wait is not retried at all: see `_is_retryable`); otherwise exponential backoff with jitter."""

    def __init__(self, backoff: Callable[[RetryCallState], float], cap: float) -> None:
        self._backoff, self._cap = backoff, cap

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        response = getattr(exc, "response", None)
        asked = _asked_delay(response.headers) if response is not None else None
        return min(max(asked, 0.0), self._cap) if asked is not None else self._backoff(state)


def _asked_delay(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait, or None when it asks nothing we can read."""
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        text = headers.get("retry-after")
        if not text:
            return None
        if re.fullmatch(r"\s*\d+(\.\d+)?\s*", text):
            return float(text)
        return email.utils.parsedate_to_datetime(text).timestamp() - time.time()
    except (ValueError, TypeError, OverflowError):
        return None


def _reason(exc: BaseException) -> str:
    """The server's own error message where it sent one (OpenAI's `error.message`, FastAPI's `detail`), else the
    exception's; on one line, at most 500 characters."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error", body)
        message = error.get("message") or error.get("detail") if isinstance(error, Mapping) else error
        if message:
            return _one_line(message)
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    return _one_line(f"{text} ({cause})" if cause and str(cause) not in text else text)


def _chunks(count: int) -> str:
    return f"{count} chunk" if count == 1 else f"{count} chunks"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


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
