"""Python callables become tools: a JSON schema the model reads, and a safe way to run what it sends back.

The schema comes from the signature's type hints and the docstring (through pydantic and docstring-parser), so
what the model is told and what is validated can never drift apart: the same pydantic model does both. Running a
call never raises (cancellation aside): every fault becomes text the model can read and act on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import itertools
import json
import logging
import re
import threading
import time
import typing
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar, overload

import docstring_parser
import pydantic
import pydantic_core
from pydantic.fields import FieldInfo

from functionary_agent._schema import clean_schema
from functionary_agent._text import shorten
from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.run_context import RunContext, is_run_context

logger = logging.getLogger(__name__)

TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_REPR_LIMIT = 80
# Sync calls running at once per event loop; a call abandoned after its timeout no longer counts.
MAX_LIVE_TOOL_THREADS = 64
T = TypeVar("T")
Approval = bool | Callable[[dict[str, Any]], bool]  # does a call (by its arguments) need a person's yes?


@dataclass(frozen=True)
class ToolOutcome:
    """What one call produced: the tool message content, and whether it reports a fault."""

    content: str
    is_error: bool = False
    duration: float = 0.0
    transient: bool = False  # a fault that may pass (a timeout, a lost connection): an identical retry may work


@dataclass(frozen=True)
class _Param:
    name: str
    field: str  # field name inside the arguments model (params are aliased: `json`, `_x` are legal there)
    positional_only: bool
    run_context: bool = False  # filled from the run, not from the model's arguments


class Tool:
    """A callable the model may call, with the JSON schema it is told about.

    Build one with `Tool.from_function`, the `@tool` decorator or `Tool.from_openai`; a `Tool` stays callable
    like the function it wraps.
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
        _params: tuple[_Param, ...] | None = None,
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
        doc = docstring_parser.parse(inspect.getdoc(fn) or "")
        if description is None:
            description = "\n\n".join(p for p in (doc.short_description, doc.long_description) if p)
        if isinstance(parameter_schema, dict):
            return cls(
                name, description, clean_schema(parameter_schema), fn, timeout=timeout,
                max_result_chars=max_result_chars, approve=approve,
            )
        if parameter_schema is not None:
            params = tuple(_Param(f, f, False) for f in parameter_schema.model_fields)
            model: type[pydantic.BaseModel] = parameter_schema
        else:
            model, params = _signature_model(fn, name, {p.arg_name: p.description for p in doc.params})
        schema = _json_schema(model, fn, name)
        return cls(
            name, description, schema, fn, timeout=timeout, max_result_chars=max_result_chars, approve=approve,
            _arguments_model=model, _params=params,
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
            outcome = ToolOutcome(f"Error: {fault}", is_error=True)
        except _TimedOut:
            outcome = ToolOutcome(f"Error: {self.name} timed out after {self.timeout:g} s", True, transient=True)
        except Exception as exc:  # the tool's own failure is news for the model, not a crash of the run
            logger.debug("tool %s raised", self.name, exc_info=True)
            text = f"Error: {self.name} raised {type(exc).__name__}: {exc}"
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
            result = await self._within_timeout(_in_daemon_thread(call, self.name))
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
            f"tool name {name!r} (from {_qualname(fn)}) must match ^[a-zA-Z0-9_-]{{1,64}}$; pass name=... to rename it"
        )


def _signature_model(
    fn: Callable[..., Any], name: str, param_docs: Mapping[str, str | None]
) -> tuple[type[pydantic.BaseModel], tuple[_Param, ...]]:
    """One pydantic model for the parameters: the schema the model reads and the validator of what it sends."""
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(_annotated_target(fn), include_extras=True)
    except (NameError, TypeError, ValueError) as exc:
        raise ToolDefinitionError(f"cannot read the signature of {_qualname(fn)}: {exc}") from None
    fields: dict[str, Any] = {}
    params: list[_Param] = []
    for index, param in enumerate(signature.parameters.values()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            star = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise ToolDefinitionError(
                f"{_qualname(fn)}: parameter {star}{param.name} cannot be described to a model; use named parameters"
            )
        annotation = hints.get(param.name, Any)
        if is_run_context(annotation):
            params.append(_context_param(fn, param))
            continue
        default = ... if param.default is param.empty else param.default
        description = None if _has_explicit_description(annotation) else param_docs.get(param.name)
        field = f"p{index}"
        if description:
            info = pydantic.Field(default, alias=param.name, description=description)
        else:  # description=None would erase the text of an Annotated Field
            info = pydantic.Field(default, alias=param.name)
        fields[field] = (annotation, info)
        params.append(_Param(param.name, field, param.kind is param.POSITIONAL_ONLY))
    config = pydantic.ConfigDict(extra="forbid", populate_by_name=False)
    try:
        model = pydantic.create_model(f"{name}_arguments", __config__=config, **fields)
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise _no_schema_error(fn, {info.alias: annotation for annotation, info in fields.values()}, exc) from None
    return model, tuple(params)


def _context_param(fn: Callable[..., Any], param: inspect.Parameter) -> _Param:
    if param.default is not param.empty:
        raise ToolDefinitionError(
            f"{_qualname(fn)}: the RunContext parameter {param.name} must have no default; the run always fills it"
        )
    return _Param(param.name, "", param.kind is param.POSITIONAL_ONLY, run_context=True)


def _annotated_target(fn: Callable[..., Any]) -> Any:
    """Where the annotations live: a partial's function, a callable object's `__call__`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isroutine(fn) or inspect.isclass(fn):
        return fn
    return type(fn).__call__


def _has_explicit_description(annotation: Any) -> bool:
    if typing.get_origin(annotation) is not Annotated:
        return False
    return any(
        isinstance(meta, str) or (isinstance(meta, FieldInfo) and meta.description)
        for meta in typing.get_args(annotation)[1:]
    )


def _json_schema(model: type[pydantic.BaseModel], fn: Callable[..., Any], name: str) -> dict[str, Any]:
    try:
        schema = model.model_json_schema(by_alias=True)
    except (pydantic.PydanticInvalidForJsonSchema, pydantic.PydanticUserError, TypeError) as exc:
        candidates = {field.alias or key: field.annotation for key, field in model.model_fields.items()}
        raise _no_schema_error(fn, candidates, exc) from None
    _apply_string_descriptions(schema, model)
    schema = clean_schema(schema)
    schema.setdefault("properties", {})
    schema.pop("additionalProperties", None)
    return schema


def _apply_string_descriptions(schema: dict[str, Any], model: type[pydantic.BaseModel]) -> None:
    """`Annotated[T, "text"]` is a common way to document a parameter; pydantic ignores bare strings."""
    for field in model.model_fields.values():
        texts = [meta for meta in field.metadata if isinstance(meta, str)]
        prop = schema.get("properties", {}).get(field.alias)
        if texts and isinstance(prop, dict) and not field.description:
            prop["description"] = " ".join(texts)


def _no_schema_error(fn: Callable[..., Any], candidates: Mapping[str, Any], exc: Exception) -> ToolDefinitionError:
    """Name the parameter whose annotation has no JSON schema, trying each on its own."""
    for param, annotation in candidates.items():
        try:
            pydantic.TypeAdapter(annotation).json_schema()
        except Exception as reason:
            first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
            return ToolDefinitionError(
                f"{_qualname(fn)}: parameter {param!r} has annotation {annotation!r} with no JSON schema "
                f"({first_line}); use a JSON-compatible type (str, int, float, bool, list, dict, a pydantic model)"
            )
    return ToolDefinitionError(f"{_qualname(fn)}: its parameters have no JSON schema: {exc}")


def _describe_validation_error(tool_name: str, exc: pydantic.ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(arguments)"
        line = f"- {where}: {error['msg']}"
        if error["type"] not in ("missing", "extra_forbidden"):
            line += f" (got {shorten(json.dumps(error['input'], default=repr), _REPR_LIMIT)})"
        lines.append(line)
    return f"invalid arguments for {tool_name}:\n" + "\n".join(lines)


def _qualname(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# -- sync tools run in daemon threads ---------------------------------------------------------------------
# Not a ThreadPoolExecutor: the interpreter joins its workers at exit, so one stuck tool would keep the process
# alive after its answer, and 64 stuck tools would starve every later call. A stuck thread cannot be stopped; a
# daemon thread can at least be left behind: it finishes unobserved, its result is dropped, and it dies with the
# process.
_thread_numbers = itertools.count(1)
_slots_lock = threading.Lock()
_slots_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def _in_daemon_thread(work: Callable[[], T], tool_name: str) -> T:
    """Run `work` in a new daemon thread without blocking the loop. If the caller stops waiting (a timeout, a
    cancelled run) the thread is abandoned: it frees its slot at once and its result is dropped."""
    loop = asyncio.get_running_loop()
    async with _live_thread_slots(loop):
        future: asyncio.Future[T] = loop.create_future()
        name = f"functionary-tool-{next(_thread_numbers)}"
        thread = threading.Thread(target=_work_and_report, args=(work, loop, future), name=name, daemon=True)
        thread.start()
        try:
            return await future
        except asyncio.CancelledError:
            if thread.is_alive():
                logger.warning("tool %s is abandoned, still running in thread %s (Python cannot stop a thread); "
                               "its result will be dropped", tool_name, name)
            raise


def _live_thread_slots(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    """The bound on sync calls that someone still waits for, one per event loop (asyncio primitives belong
    to one loop)."""
    with _slots_lock:
        slots = _slots_by_loop.get(loop)
        if slots is None:
            slots = _slots_by_loop[loop] = asyncio.Semaphore(MAX_LIVE_TOOL_THREADS)
        return slots


def _work_and_report(work: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future[T]) -> None:
    """The thread's body: run the tool, then hand its result or exception to the loop."""
    result: T | None = None
    error: BaseException | None = None
    try:
        result = work()
    except BaseException as exc:  # delivered to the awaiting task, which turns it into a message
        error = exc
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:  # the loop is closed: nobody waits for this result any more
        logger.debug("a tool thread finished after its event loop closed; result dropped")


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # abandoned after a timeout or a cancellation: the result is dropped
        return
    if error is None:
        future.set_result(typing.cast(T, result))
    elif isinstance(error, StopIteration):  # a future refuses StopIteration (it would end a generator)
        future.set_exception(RuntimeError(f"StopIteration: {error}"))
    else:
        future.set_exception(error)
