"""Python callables become tools: a JSON schema the model reads, and a safe way to run what it sends back.

`Tool`, the `@tool` decorator and tool names live here. The schema comes from the signature's type hints and the
docstring (`_function_schema`), so what the model is told and what is validated can never drift apart: the same
pydantic model does both. Running a call never raises (cancellation aside): every fault becomes text the model can
read and act on. A sync tool runs in a daemon thread of its own (`_run.threads`), so it never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import re
import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, overload

import pydantic
import pydantic_core

from functionary_agent._function_schema import Param, function_schema, qualname
from functionary_agent._run.threads import in_daemon_thread
from functionary_agent._schema import clean_schema
from functionary_agent._text import shorten
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.messages import error_result
from functionary_agent.run_context import RunContext

__all__ = [
    "TOOL_NAME_PATTERN",
    "Approval",
    "Tool",
    "ToolOutcome",
    "check_result_limit",
    "parse_arguments",
    "result_to_text",
    "tool",
    "unique_tool_name",
]

logger = logging.getLogger(__name__)

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""What a tool name must match (OpenAI's rule): 1 to 64 letters, digits, `_` or `-`."""
_REPR_LIMIT = 80
Approval = bool | Callable[[dict[str, Any]], bool]  # does a call (by its arguments) need a person's yes?
"""Whether a tool's calls need a person's yes before they run: True (every call), False (none), or a function
of the call's arguments (a dict) that returns True for the calls that do. A predicate that raises, or arguments
that are not one JSON object, count as True."""


@dataclass(frozen=True)
class ToolOutcome:
    """What one call produced: the tool message content, and whether it reports a fault.

    Attributes:
        content: The text the model reads back: the result as text, or `Error: ...` for a fault.
        is_error: Whether `content` reports a fault (bad arguments, an exception, a timeout).
        duration: Seconds the call took, from parsing its arguments to its result text.
        transient: Whether the fault may pass on its own (a timeout, a lost connection, an exception with a true
            `transient` attribute), so an identical call may be tried again in the same run.
    """

    content: str
    is_error: bool = False
    duration: float = 0.0
    transient: bool = False  # a fault that may pass (a timeout, a lost connection): an identical retry may work


class Tool:
    """A callable the model may call, with the JSON schema it is told about.

    Build one with `Tool.from_function`, the `@tool` decorator or `Tool.from_openai`; a `Tool` stays callable
    like the function it wraps.

    Attributes:
        name: The name the model calls it by (it matches `TOOL_NAME_PATTERN`).
        description: What the model is told the tool does; "" for none.
        parameters: The JSON schema of its arguments, as sent to the model.
        handler: The callable a call runs (sync or async).
        timeout: Seconds a call may run before it gives the model a timeout error; None: no bound.
        max_result_chars: The most characters of a result the model reads back (head and tail kept); None: the
            conversation's `max_result_chars`.
        approve: Whether calls need a person's yes before they run (see `Approval`).

    Raises:
        ToolDefinitionError: The name does not match `TOOL_NAME_PATTERN`, `timeout` is not positive, or
            `approve` is neither a bool nor callable.
        ConfigurationError: `max_result_chars` is not None or an int of at least 100.
    """

    def __init__(
        self,
        name: str,
        description: str,
        parameters: dict[str, Any],
        handler: Callable[..., Any],
        *,
        timeout: float | None = None,
        max_result_chars: int | None = None,
        approve: Approval = False,
        _arguments_model: type[pydantic.BaseModel] | None = None,
        _params: tuple[Param, ...] | None = None,
    ) -> None:
        _check_name(name, handler)
        if timeout is not None and timeout <= 0:
            raise ToolDefinitionError(f"tool {name!r}: timeout must be positive seconds, got {timeout!r}")
        self.max_result_chars = check_result_limit(max_result_chars, f"tool {name!r}: max_result_chars")
        if not (isinstance(approve, bool) or callable(approve)):
            raise ToolDefinitionError(f"tool {name!r}: approve must be True, False or a function of the arguments")
        self.approve = approve  # calls that need a person's yes before they run (see `Conversation.resume`)
        self.name = name
        self.description = description
        self.parameters = parameters
        self.handler = handler
        self.timeout = timeout
        self._arguments_model = _arguments_model
        self._params = _params
        functools.update_wrapper(self, handler, updated=())

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        name: str | None = None,
        description: str | None = None,
        *,
        parameter_schema: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        timeout: float | None = None,
        max_result_chars: int | None = None,
        approve: Approval = False,
    ) -> Tool:
        """A tool from a function's signature and docstring (or from `parameter_schema`, chatlab style).
        `max_result_chars` bounds what the model reads back (head and tail kept); None: the conversation's.
        `approve`: True, or a function of the arguments dict returning True, when a call needs a person's yes."""
        if isinstance(fn, Tool):
            fn = fn.handler
        if not callable(fn):
            raise ToolDefinitionError(f"a tool needs a callable, got {type(fn).__name__}")
        if name is None:
            name = getattr(fn, "__name__", None) or type(fn).__name__
        _check_name(name, fn)
        schema = function_schema(fn, name, description, parameter_schema)
        return cls(
            name, schema.description, schema.parameters, fn, timeout=timeout, max_result_chars=max_result_chars,
            approve=approve, _arguments_model=schema.arguments_model, _params=schema.params,
        )

    @classmethod
    def from_openai(cls, spec: Mapping[str, Any], handler: Callable[..., Any], *, timeout: float | None = None) -> Tool:
        """A tool from an OpenAI tool dict; arguments reach `handler` as keyword arguments, checked for
        required keys only (a raw JSON schema has no Python types to convert into)."""
        function = spec.get("function", spec) if isinstance(spec, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ToolDefinitionError(
                'an OpenAI tool dict looks like {"type": "function", "function": {"name": ..., "parameters": ...}}'
            )
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(
            function["name"], function.get("description") or "", clean_schema(dict(parameters)), handler,
            timeout=timeout,
        )

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI tool dict sent to the model."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r})"

    async def run(
        self, arguments: str | Mapping[str, Any] | None, context: RunContext[Any] | None = None
    ) -> ToolOutcome:
        """Parse, validate, call, serialise; every fault comes back as an error outcome, never an exception.
        `context` goes to a parameter annotated `RunContext` (None when the tool is run outside a conversation)."""
        started = time.perf_counter()
        try:
            args, kwargs = self._bind(arguments, context)
            result = await self._call(args, kwargs)
            outcome = ToolOutcome(result_to_text(result))
        except _CallFault as fault:
            outcome = ToolOutcome(error_result(str(fault)), is_error=True)
        except _TimedOut:
            outcome = ToolOutcome(error_result(f"{self.name} timed out after {self.timeout:g} s"), True, transient=True)
        except Exception as exc:  # the tool's own failure is news for the model, not a crash of the run
            logger.debug("tool %s raised", self.name, exc_info=True)
            text = error_result(f"{self.name} raised {type(exc).__name__}: {exc}")
            outcome = ToolOutcome(text, is_error=True, transient=_passes(exc))
        return replace(outcome, duration=time.perf_counter() - started)

    def _bind(
        self, arguments: str | Mapping[str, Any] | None, context: RunContext[Any] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        raw = parse_arguments(arguments)
        if self._arguments_model is None or self._params is None:
            missing = [key for key in self.parameters.get("required", []) if key not in raw]
            if missing:
                lines = "\n".join(f"- {key}: Field required" for key in missing)
                raise _CallFault(f"invalid arguments for {self.name}:\n{lines}")
            return [], dict(raw)
        try:
            validated = self._arguments_model.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise _CallFault(_describe_validation_error(self.name, exc)) from None
        values = [context if p.run_context else getattr(validated, p.field) for p in self._params]
        args = [value for p, value in zip(self._params, values, strict=True) if p.positional_only]
        kwargs = {p.name: value for p, value in zip(self._params, values, strict=True) if not p.positional_only}
        return args, kwargs

    async def _call(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(self.handler):
            result = await self._within_timeout(self.handler(*args, **kwargs))
        else:
            call = functools.partial(contextvars.copy_context().run, self.handler, *args, **kwargs)
            result = await self._within_timeout(in_daemon_thread(call, self.name))
        if inspect.isawaitable(result):  # async callable objects, partials and lambdas around coroutines
            result = await self._within_timeout(result)
        return result

    async def _within_timeout(self, awaitable: typing.Awaitable[Any]) -> Any:
        """Await with the tool's timeout; a sync tool's thread cannot be stopped and finishes unobserved."""
        if self.timeout is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except asyncio.TimeoutError as exc:
            if isinstance(exc.__cause__, asyncio.CancelledError):  # wait_for's own, not one the tool raised
                raise _TimedOut from None
            raise


def _passes(exc: Exception) -> bool:
    """Whether a tool's exception may pass on its own: timeouts, lost connections, and any exception that says so
    with a true `transient` attribute (the MCP and OpenAPI integrations mark theirs)."""
    return isinstance(exc, (TimeoutError, ConnectionError)) or getattr(exc, "transient", False) is True


def check_result_limit(value: int | None, what: str) -> int | None:
    """A limit on result characters: None, or an int of at least 100 (less leaves the model nothing to read)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 100):
        raise ConfigurationError(f"{what} must be an int of at least 100 (or None), got {value!r}")
    return value


class _CallFault(Exception):
    """Arguments the model must fix; the message is written for the model."""


class _TimedOut(Exception):
    """The tool ran past its timeout."""


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_result_chars: int | None = None,
    approve: Approval = False,
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_result_chars: int | None = None,
    approve: Approval = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Mark a function as a tool: `@tool` or `@tool(name=..., timeout=...)`. The result is still callable."""

    def wrap(func: Callable[..., Any]) -> Tool:
        return Tool.from_function(
            func, name, description, timeout=timeout, max_result_chars=max_result_chars, approve=approve
        )

    return wrap(fn) if fn is not None else wrap


def unique_tool_name(raw: str, taken: set[str], fallback: str = "tool") -> str:
    """A valid tool name for `raw` (itself when valid; else runs of other characters become "_"), numbered so it
    is none of the names already `taken`. For tools that come with names of their own (MCP, OpenAPI)."""
    valid = TOOL_NAME_PATTERN.fullmatch(raw)
    name = raw if valid else (re.sub(r"[^a-zA-Z0-9_-]+", "_", raw).strip("_")[:64] or fallback)
    candidate, number = name, 2
    while candidate in taken:
        suffix = f"_{number}"
        candidate, number = name[: 64 - len(suffix)] + suffix, number + 1
    return candidate


def parse_arguments(arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Arguments as the model sent them (a JSON string, a dict, or nothing) -> a dict, or a fault to report."""
    if arguments is None:
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    text = arguments.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _CallFault(
            f"the arguments are not valid JSON ({exc}): {shorten(text, _REPR_LIMIT)}. "
            "Send the arguments as one JSON object."
        ) from None
    if not isinstance(value, dict):
        got = f"{type(value).__name__}: {shorten(text, _REPR_LIMIT)}"
        raise _CallFault(f"the arguments must be a JSON object, got {got}")
    return value


def result_to_text(value: Any) -> str:
    """What the model reads back: strings as they are, `_repr_llm_()` where defined, else JSON, else `str()`."""
    if isinstance(value, str):
        return value
    repr_llm = getattr(value, "_repr_llm_", None)
    if callable(repr_llm) and not isinstance(value, type):
        return str(repr_llm())
    try:
        return pydantic_core.to_json(value).decode()
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError):
        return str(value)


def _check_name(name: str, fn: object) -> None:
    if not isinstance(name, str) or not TOOL_NAME_PATTERN.fullmatch(name):
        raise ToolDefinitionError(
            f"tool name {name!r} (from {qualname(fn)}) must match ^[a-zA-Z0-9_-]{{1,64}}$; pass name=... to rename it"
        )


def _describe_validation_error(tool_name: str, exc: pydantic.ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(arguments)"
        line = f"- {where}: {error['msg']}"
        if error["type"] not in ("missing", "extra_forbidden"):
            line += f" (got {shorten(json.dumps(error['input'], default=repr), _REPR_LIMIT)})"
        lines.append(line)
    return f"invalid arguments for {tool_name}:\n" + "\n".join(lines)
