"""`Conversation`: the message list and the agent loop that runs tools until the model answers."""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import pydantic

from functionary_agent import _sync, integrations
from functionary_agent._display import display_hook
from functionary_agent._run.answers import FINAL_RESULT, PlainAnswer, TypedAnswer
from functionary_agent._run.approvals import (
    ApprovalCallback,
    ApprovalGate,
    Decision,
    PendingCall,
    check_decisions,
    off_the_loop,
    pending_calls,
)
from functionary_agent._run.calls import CallRunner
from functionary_agent._run.config import DEFAULT_MAX_IDENTICAL_CALLS, DEFAULT_MAX_RESULT_CHARS, RunConfig, Setting
from functionary_agent._run.context_budget import ContextBudget, HistoryHook
from functionary_agent._run.interpreter import PythonTool, is_code_interpreter
from functionary_agent._run.loop import run_loop
from functionary_agent._run.repeats import RepeatGuard
from functionary_agent._run.state import AnswerRule, RunDeps, RunEnd, RunState
from functionary_agent._run.tracing import RunTracer, model_label
from functionary_agent._saved import read_saved_messages, write_saved
from functionary_agent.errors import (
    ApprovalRequired,
    CloseError,
    ConfigurationError,
    ConversationBusyError,
    ToolDefinitionError,
)
from functionary_agent.events import ApprovalRequested, Event, FinalAnswer
from functionary_agent.integrations import ToolSource
from functionary_agent.messages import ToolCall, ToolChoice
from functionary_agent.models import resolve_model
from functionary_agent.models.base import ChatModel
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Approval, Tool
from functionary_agent.usage import Limits, Usage

if TYPE_CHECKING:
    from sandbox import KernelSandbox, SandboxPool

__all__ = ["Content", "Conversation"]


Content = str | list[dict[str, Any]] | None
"""What a user message holds: text, a list of OpenAI content parts (e.g. `{"type": "text", "text": ...}`), or
None, which adds no message and continues the chat as it is."""
T = TypeVar("T")


class Conversation:
    """A chat with a model that may call the registered tools; `submit` runs calls until a final answer.

    `model` is a `ChatModel`, a model name for the server at `base_url` (or `FUNCTIONARY_BASE_URL`), or, with
    no server, a GGUF file for the embedded llama.cpp engine (None: the bundled SmolLM2, loaded once per process).
    `code_interpreter` (True, a dict of `KernelSandbox` settings, a `KernelSandbox`, or a `SandboxPool` to take a
    warm kernel from) adds the `python` tool, backed by a sandboxed Jupyter kernel that starts in the background now
    (a pool's is ready); `close()` shuts it down (a pool's is destroyed, never reused).
    Forced choices (`tool_choice="required"` or a named function) apply to the first model turn of each
    submit; later turns use "auto", otherwise the model could never answer. A turn that repeats one call more than
    `max_identical_calls` times handles it once and tells the model so for each copy. The settings are one frozen
    `RunConfig` (`config`); each is also an attribute (`chat.limits = Limits(...)` replaces the config).

    Attributes:
        model: The engine every request goes to.
        messages: The chat so far as OpenAI chat dicts (system, user, assistant and tool messages); a run
            appends to this list.
        config: Every run setting as one frozen value, checked when made; assigning a setting attribute replaces
            it. A run uses the settings as they are when it starts.
        last_usage: What the current or last run cost (a resumed run goes on counting in it).
        last_end: How the last run ended (a `RunEnd`: answer, paused, limit, error, cancelled); None before the
            first run.

    Raises:
        ConfigurationError: A setting is out of range (e.g. `max_turns` under 1, `context_window` under 256),
            or the model choice cannot work (a bad server URL, no GGUF file at the path given).
        ToolDefinitionError: A tool cannot be made from one of `tools`, or two have the same name.
    """

    tool_choice: Setting[ToolChoice] = Setting()
    """Whether the model may, must or must not call a tool (see `ToolChoice`). A forced choice applies to the first
    model turn of each run; later turns use "auto"."""
    max_turns: Setting[int] = Setting()
    """The most model turns in one run (at least 1); a model still calling tools after the last one raises
    `MaxTurnsExceeded`."""
    parallel_tool_calls: Setting[bool] = Setting()
    """Whether the calls of one turn run at once (False: one at a time)."""
    max_identical_calls: Setting[int] = Setting()
    """How many identical calls (same name and arguments) one turn may hold before the copies after the first are
    not run; each copy gets a note instead (at least 1)."""
    limits: Setting[Limits] = Setting()
    """The per-run budgets of requests, tool calls and tokens; crossing one raises `UsageLimitExceeded`."""
    max_result_chars: Setting[int | None] = Setting()
    """The most characters of a tool result the model reads back (head and tail kept) unless the tool sets its
    own; None: no bound. At least 100."""
    trace_content: Setting[bool] = Setting()
    """Whether OpenTelemetry spans record message contents, call arguments and results (off by default: they may
    be private)."""
    deps: Setting[Any] = Setting()
    """Any object handed to tools through their `RunContext` parameter (a database handle, an HTTP client)."""
    output_retries: Setting[int] = Setting()
    """How many invalid typed answers (with `output_type`) go back to the model before `OutputValidationError`."""
    on_approval: Setting[ApprovalCallback | None] = Setting()
    """Decides calls that need a yes: `fn(call)` (sync or async) returns True, False or a reason to decline with,
    or None to leave the call waiting; no callback (None) pauses the run instead (`ApprovalRequired`, then
    `resume`)."""

    def __init__(
        self,
        model: ChatModel | str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        system: str | None = None,
        tools: Iterable[Callable[..., Any] | Tool | Mapping[str, Any]] = (),
        tool_choice: ToolChoice = "auto",
        max_turns: int = 10,
        parallel_tool_calls: bool = True,
        max_concurrency: int | None = None,
        max_identical_calls: int = DEFAULT_MAX_IDENTICAL_CALLS,
        code_interpreter: bool | KernelSandbox | SandboxPool | Mapping[str, Any] = False,
        on_approval: ApprovalCallback | None = None,
        limits: Limits | None = None,
        max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS,
        context_window: int | None = None,
        history: HistoryHook | None = None,
        trace_content: bool = False,
        deps: Any = None,
        output_retries: int = 2,
        **settings: Any,
    ) -> None:
        config = RunConfig(
            tool_choice=tool_choice, max_turns=max_turns, parallel_tool_calls=parallel_tool_calls,
            max_concurrency=max_concurrency, max_identical_calls=max_identical_calls, on_approval=on_approval,
            limits=limits or Limits(), max_result_chars=max_result_chars, context_window=context_window,
            history=history, trace_content=trace_content, deps=deps, output_retries=output_retries, request=settings,
        )
        model, owns_model = resolve_model(model, base_url=base_url, api_key=api_key)  # close what we made
        self._setup(model, owns_model, config, [{"role": "system", "content": system}] if system else [])
        self._register_first(list(tools), code_interpreter)

    def _setup(
        self, model: ChatModel, owns_model: bool, config: RunConfig, messages: list[dict[str, Any]]
    ) -> None:
        self.model, self._owns_model = model, owns_model
        self.config = config
        self.messages = messages
        self.last_usage, self._past_usage = Usage(), Usage()
        self._tools: dict[str, Tool] = {}
        self._sources: list[ToolSource] = []  # MCP sessions, OpenAPI clients: closed with the conversation
        self._interpreter: PythonTool | None = None
        self._run_start = 0  # where the current (or last) run's messages begin
        self._running = False  # one run at a time: two would interleave their messages
        self.last_end: RunEnd | None = None  # how the last run ended (answer, paused, limit, error, cancelled)

    @property
    def settings(self) -> Mapping[str, Any]:
        """The sampling settings sent with every request, read-only (assign a new dict to change them)."""
        return types.MappingProxyType(dict(self.config.request))

    @settings.setter
    def settings(self, value: Mapping[str, Any]) -> None:
        self.config = self.config.replace(request=dict(value))

    @property
    def max_concurrency(self) -> int | None:
        """How many calls of one turn run at once (None: all; 1 when `parallel_tool_calls` is off)."""
        return self.config.concurrency

    @max_concurrency.setter
    def max_concurrency(self, value: int | None) -> None:
        self.config = self.config.replace(max_concurrency=value)

    def _register_first(
        self, tools: list[Callable[..., Any] | Tool | Mapping[str, Any]], code_interpreter: Any
    ) -> None:
        """The constructor's tools, and the code interpreter (closed with this conversation, not its forks)."""
        if any(is_code_interpreter(item) for item in tools) and code_interpreter is False:
            code_interpreter = True  # tools=[{"type": "code_interpreter"}] asks for it the OpenAI way
        for item in tools:
            if not is_code_interpreter(item):
                self.register(item)  # type: ignore[arg-type]
        if code_interpreter is not False:
            self._interpreter = PythonTool.start(code_interpreter)
            self.register(self._interpreter)

    # -- tools -------------------------------------------------------------------------------------------
    def register(
        self,
        fn: Callable[..., Any] | Tool | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameter_schema: type[pydantic.BaseModel] | dict[str, Any] | None = None,
        timeout: float | None = None,
        max_result_chars: int | None = None,
        approve: Approval = False,
    ) -> Any:
        """Make `fn` a tool of this conversation: `@chat.register`, `@chat.register(name=...)` or
        `chat.register(fn)`. Returns `fn` unchanged, so decorated functions stay plain functions.
        `max_result_chars` bounds this tool's results (head and tail kept); None: the conversation's bound.
        `approve=True` (or a function of the arguments dict) makes calls wait for a person's yes (`on_approval`)."""

        def add(func: Callable[..., Any] | Tool) -> Any:
            if isinstance(func, Tool) and not (
                name or description or parameter_schema or timeout or max_result_chars or approve
            ):
                new = func
            else:
                new = Tool.from_function(
                    func, name, description, parameter_schema=parameter_schema, timeout=timeout,
                    max_result_chars=max_result_chars, approve=approve,
                )
            if new.name in self._tools:
                raise ToolDefinitionError(f"a tool named {new.name!r} is already registered; pass name=... to rename")
            self._tools[new.name] = new
            return func

        return add(fn) if fn is not None else add

    def register_mcp(self, command: Sequence[str] | str | None = None, **options: Any) -> list[Tool]:
        """Make an MCP server's tools tools of this conversation; see `aregister_mcp`."""
        return _sync.run(self.aregister_mcp(command, **options))

    async def aregister_mcp(self, command: Sequence[str] | str | None = None, **options: Any) -> list[Tool]:
        """Start an MCP server (`command=[...]`, stdio) or reach one (`url=...`, streamable HTTP) and register its
        tools. Options: `env`, `cwd`, `headers`, `prefix` (before each tool name), `timeout`, `call_timeout`.
        The session closes with the conversation."""
        return await self.aregister_source(await integrations.open_mcp(command, **options))

    def register_openapi(self, spec: Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> list[Tool]:
        """Make an OpenAPI service's operations tools of this conversation; see `aregister_openapi`."""
        return _sync.run(self.aregister_openapi(spec, **options))

    async def aregister_openapi(self, spec: Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> list[Tool]:
        """Register a tool per operation of an OpenAPI 3.x document (a dict, a file, or a URL). Options:
        `base_url`, `headers`, `include` (operationIds or a predicate), `timeout`, `max_response_chars`, and the
        guards: `trusted_origins` (more origins that may receive `headers`), `other_origins` ("refuse" or
        "without_headers": what a call served elsewhere gets), `allow_link_local`. See `openapi.openapi_tools`."""
        return await self.aregister_source(await integrations.open_openapi(spec, **options))

    async def aregister_source(self, source: ToolSource) -> list[Tool]:
        """Register all of a tool source's tools or none (a name clash closes it), and close the source with the
        conversation. A source is anything with `tools` and `aclose()` (see `functionary_agent.integrations`)."""
        tools = list(source.tools)
        clash = sorted({tool.name for tool in tools} & set(self._tools))
        if clash:
            await source.aclose()
            raise ToolDefinitionError(f"tools named {', '.join(clash)} are already registered; pass prefix=...")
        for new in tools:
            self.register(new)
        self._sources.append(source)
        return tools

    def as_tool(self, name: str, description: str, *, output_type: Any = None, max_depth: int = 3) -> Tool:
        """This conversation as a tool another can call with `{"task": "..."}`: each call runs the task on a fresh
        copy of these messages (same model, tools and settings), returns the final answer (the typed output as
        JSON with `output_type`), and counts its usage into the caller's run. Agents nest at most `max_depth`."""
        from functionary_agent._run.agent_tool import agent_tool

        if max_depth < 1:
            raise ConfigurationError(f"max_depth must be at least 1, got {max_depth}")
        if output_type is not None:
            TypedAnswer(output_type)  # refuses a type with no JSON schema now, not at the first call
        return agent_tool(self, name, description, output_type, max_depth)

    def fork(self) -> Conversation:
        """A copy for one independent run: the same model, tools (and sandbox), settings and run controls, its own
        copy of the messages (during a run, those from before it). Closing it closes nothing of this one's."""
        settled = self.messages[: self._run_start] if self._running else self.messages  # not a run in flight
        fork = Conversation.__new__(Conversation)
        fork._setup(self.model, False, dataclasses.replace(self.config), [dict(message) for message in settled])
        fork._tools.update(self._tools)
        return fork

    def unregister(self, name: str) -> None:
        """Remove the tool called `name`; the next request no longer offers it. A name that is not registered is
        ignored. Nothing is closed: a sandbox or tool source behind the tool closes with the conversation.

        Args:
            name: The tool's name, as the model sees it.
        """
        self._tools.pop(name, None)

    @property
    def tools(self) -> list[Tool]:
        """The registered tools, in the order they were registered (a new list: changing it changes nothing)."""
        return list(self._tools.values())

    def tool_specs(self) -> list[dict[str, Any]]:
        """The tool list as sent to the model."""
        return [tool.to_openai() for tool in self._tools.values()]

    # -- the loop ----------------------------------------------------------------------------------------
    def astream(self, content: Content = None, *, output_type: Any = None) -> AsyncIterator[Event]:
        """Run the conversation to a final answer, yielding events as they happen (see `events`).
        Leaving early (`break`, `aclose()`) cancels running calls; each still gets its tool message.
        With `output_type` the `FinalAnswer` carries the validated value as `output`."""
        return self._run(content, stream=True, answer=self._answer_rule(output_type))

    @overload
    async def asubmit(self, content: Content = None, *, output_type: None = None) -> str: ...
    @overload
    async def asubmit(self, content: Content = None, *, output_type: type[T]) -> T: ...
    @overload
    async def asubmit(self, content: Content = None, *, output_type: Any) -> Any: ...
    async def asubmit(self, content: Content = None, *, output_type: Any = None) -> Any:
        """Add `content` as a user message (None continues the chat as it is) and return the final answer: the
        text, or with `output_type` (a pydantic model, dataclass, TypedDict, or a type such as `int`,
        `list[str]`, `Literal[...]`) a validated value of that type. Raises `ApprovalRequired` when a call waits
        for a person and no `on_approval` callback decides. `last_end` says how the run ended (a cut answer:
        `last_end.truncated`)."""
        run = self._run(content, stream=False, answer=self._answer_rule(output_type))
        return await self._final(run, typed=output_type is not None)

    async def aresume(self, decisions: Mapping[str, Decision], *, output_type: Any = None) -> Any:
        """Go on with a run paused by `ApprovalRequired`: `decisions` maps each waiting call's id to True (run
        it), False or a reason string (decline). Returns the final answer as `asubmit` does."""
        check_decisions(self._gate(), pending_calls(self.messages), decisions)
        answer = self._answer_rule(output_type)
        run = self._run(None, stream=False, answer=answer, decisions=decisions)
        return await self._final(run, typed=output_type is not None)

    def resume(self, decisions: Mapping[str, Decision], *, output_type: Any = None) -> Any:
        """`aresume` from sync code."""
        return _sync.run(self.aresume(decisions, output_type=output_type))

    @property
    def pending_approvals(self) -> list[PendingCall]:
        """The calls a paused run waits on (empty when none waits)."""
        gate = self._gate()
        return [PendingCall.of(call) for call in pending_calls(self.messages) if gate.needs_approval(call)]

    @staticmethod
    async def _final(events: AsyncIterator[Event], *, typed: bool) -> Any:
        final = FinalAnswer("")
        async with _sync.closing(events) as running:  # closed at once, even when a pause raises
            async for event in running:
                if isinstance(event, ApprovalRequested):
                    raise ApprovalRequired(event.calls)
                if isinstance(event, FinalAnswer):
                    final = event
        return final.output if typed else final.content

    @overload
    def submit(self, content: Content = None, *, output_type: None = None, display: bool | None = None) -> str: ...
    @overload
    def submit(self, content: Content = None, *, output_type: type[T], display: bool | None = None) -> T: ...
    @overload
    def submit(self, content: Content = None, *, output_type: Any, display: bool | None = None) -> Any: ...
    def submit(self, content: Content = None, *, output_type: Any = None, display: bool | None = None) -> Any:
        """`asubmit` from sync code. In a Jupyter notebook the run is shown as it happens; `display=False`
        turns that off, `display=True` forces it (None: only in a notebook)."""
        hook = display_hook()
        if display and hook is None:
            raise ConfigurationError("display=True needs a notebook front end: import functionary_agent.notebook")
        if output_type is None and hook is not None and (hook.in_notebook() if display is None else display):
            return hook.submit(self, content)
        return _sync.run(self.asubmit(content, output_type=output_type))

    def stream(self, content: Content = None, *, output_type: Any = None) -> Iterator[Event]:
        """`astream` from sync code: run the conversation to a final answer, yielding events as they happen.

        Args:
            content: The user message to add (None continues the chat as it is).
            output_type: A type the answer must match; the `FinalAnswer` then carries the value as `output`.

        Returns:
            An iterator of events that ends with `FinalAnswer`, or with `ApprovalRequested` when calls wait for a
            person. Leaving the loop early cancels running calls; each still gets its tool message.

        Raises:
            ConversationBusyError: Another run of this conversation is under way.
            ApprovalRequired: A previous run left calls waiting (answer them with `resume` first).
            LimitExceeded: The run reached `max_turns` or one of its `limits`.
            ModelError: The model or its server failed.
        """
        return _sync.iterate(self.astream(content, output_type=output_type))

    def _answer_rule(self, output_type: Any) -> AnswerRule:
        if output_type is None:
            return PlainAnswer()
        if FINAL_RESULT in self._tools:
            raise ToolDefinitionError(
                f"a tool named {FINAL_RESULT!r} clashes with the reserved tool that carries typed answers; rename it"
            )
        return TypedAnswer(output_type, self.config.output_retries)

    async def _run(
        self, content: Content, *, stream: bool, answer: AnswerRule, decisions: Mapping[str, Decision] | None = None
    ) -> AsyncIterator[Event]:
        with self._running_alone():
            self._start_run(content, resuming=decisions is not None)
            deps = self._run_deps(stream)
            state = RunState(answer, self.last_usage, answer.first_choice(self.config.tool_choice))
            if decisions is not None:  # a paused run goes on with its waiting calls
                state.calls, state.decisions = pending_calls(self.messages), decisions
            try:
                async with _sync.closing(run_loop(deps, state)) as events:
                    async for event in events:
                        yield event
            finally:
                self.last_end = state.end

    def _run_deps(self, stream: bool) -> RunDeps:
        """What a run works with, from the settings as they are when it starts."""
        config = self.config
        tracer = RunTracer(model_label(self.model), content=config.trace_content)
        runner = CallRunner(
            self._tools, RepeatGuard(), tracer, config.concurrency, config.max_result_chars, self._run_context
        )
        budget = ContextBudget(self.model, config.context_window, config.history)
        return RunDeps(self.model, config, self._tools, self.messages, self._gate(), budget, runner, tracer, stream)

    def _gate(self) -> ApprovalGate:
        callback = self.config.on_approval
        return ApprovalGate(self._tools, off_the_loop(callback) if callback is not None else None)

    def _start_run(self, content: Content, *, resuming: bool) -> None:
        """A new run starts its usage afresh (a resumed one keeps counting) and may not leave calls unanswered."""
        if not resuming:
            waiting = pending_calls(self.messages)
            if waiting:  # those that need a yes (all, if none does: a run cut short, say)
                raise ApprovalRequired(self.pending_approvals or [PendingCall.of(call) for call in waiting])
            self._past_usage, self.last_usage = self.usage, Usage()
            self._run_start = len(self.messages)
        if content is not None:
            self.messages.append({"role": "user", "content": content})

    @contextmanager
    def _running_alone(self) -> Iterator[None]:
        """Refuse a second run while one is under way (submit, stream or their async twins, from any task)."""
        if self._running:
            raise ConversationBusyError(
                "this conversation is already running a submit or stream; wait for it to finish (or close its "
                "stream) before starting another, or use one Conversation per concurrent task"
            )
        self._running = True
        try:
            yield
        finally:
            self._running = False

    def _run_context(self, call: ToolCall) -> RunContext[Any]:
        return RunContext(self.config.deps, call.id, self.last_usage, self)

    @property
    def usage(self) -> Usage:
        """What this conversation has cost over its life (runs so far, the current one included)."""
        return self._past_usage + self.last_usage

    # -- lifetime ----------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Release what this conversation started (its code sandbox, MCP sessions and OpenAPI clients, a model
        client it created); a model or sandbox passed in stays open. Every one is closed even when some fail:
        one failure is raised as it is, several as a `CloseError` holding them all."""
        closers: list[Callable[[], Awaitable[object]]] = [self._interpreter.aclose] if self._interpreter else []
        sources, self._sources = self._sources, []
        closers += [source.aclose for source in sources]
        if self._owns_model:
            closers.append(self.model.aclose)
        await _close_all(closers)

    def close(self) -> None:
        """`aclose` from sync code: release the sandbox, tool sources and model client this conversation started.

        Raises:
            CloseError: Several of them failed to close (a single failure is raised as it is).
        """
        _sync.run(self.aclose())

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Conversation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- display ---------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<Conversation with {self.model!r}: {len(self.messages)} messages, tools: {', '.join(self._tools)}>"

    def _repr_markdown_(self) -> str | None:
        hook = display_hook()  # registered by the notebook front end, which IPython's display implies
        return hook.markdown(self) if hook is not None else None

    def _repr_html_(self) -> str | None:
        hook = display_hook()
        return hook.html(self) if hook is not None else None

    # -- persistence -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the exchange, keeping the system message."""
        self.messages[:] = [m for m in self.messages[:1] if m.get("role") == "system"]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the messages as JSON, atomically (a crash leaves the old file or the new one, never half of one);
        tools are code and are registered again after `load`. `OSError` when the file cannot be written."""
        write_saved(Path(path), self.messages)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: ChatModel | str | None = None, **kwargs: Any) -> Conversation:
        """A conversation with the messages saved at `path`; other arguments as for `Conversation(...)`. The file
        is checked first (its size, its nesting, each message's shape): `ConfigurationError` names the first
        problem by its JSON path."""
        messages = read_saved_messages(Path(path))
        conversation = cls(model, **kwargs)
        conversation.messages = messages
        return conversation


async def _close_all(closers: Sequence[Callable[[], Awaitable[object]]]) -> None:
    """Call every closer, then raise: the one failure as it is, or a `CloseError` listing several."""
    failures: list[Exception] = []
    for close in closers:
        try:
            await close()
        except Exception as exc:  # close the rest first; cancellation still stops at once
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise CloseError(failures) from failures[0]
