"""`Conversation`: the message list and the agent loop that runs tools until the model answers."""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import pydantic

from functionary_agent import _sync
from functionary_agent._run.answers import FINAL_RESULT, PlainAnswer, TypedAnswer, Verdict
from functionary_agent._run.approvals import (
    ApprovalCallback,
    ApprovalGate,
    Decision,
    PendingCall,
    check_decisions,
    off_the_loop,
    pending_calls,
)
from functionary_agent._run.calls import CANCELLED, CallRunner, tool_message
from functionary_agent._run.context_budget import ContextBudget, HistoryHook
from functionary_agent._run.interpreter import PythonTool, is_code_interpreter
from functionary_agent._run.repeats import RepeatGuard
from functionary_agent._run.tracing import RunTracer, model_label
from functionary_agent._saved import read_saved_messages, write_saved
from functionary_agent.errors import (
    ApprovalRequired,
    CloseError,
    ConfigurationError,
    ConversationBusyError,
    MaxTurnsExceeded,
    ModelError,
    ToolDefinitionError,
)
from functionary_agent.events import (
    ApprovalRequested,
    Event,
    FinalAnswer,
    TextDelta,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    ToolResult,
)
from functionary_agent.models import resolve_model
from functionary_agent.models.base import AssistantMessage, ChatModel, ToolCall, ToolChoice, stream_call_index
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Approval, Tool, check_result_limit
from functionary_agent.usage import Limits, Usage

if TYPE_CHECKING:
    from sandbox import KernelSandbox

Content = str | list[dict[str, Any]] | None
AnswerRule = PlainAnswer | TypedAnswer
DEFAULT_MAX_RESULT_CHARS = 20_000


class Conversation:
    """A chat with a model that may call the registered tools; `submit` runs calls until a final answer.

    `model` is a `ChatModel`, a model name for the server at `base_url` (or `FUNCTIONARY_BASE_URL`), or, with
    no server, a GGUF file for the embedded llama.cpp engine (None: the bundled SmolLM2, loaded once per process).
    `code_interpreter` (True, a dict of `KernelSandbox` settings, or a `KernelSandbox`) adds the `python` tool,
    backed by a sandboxed Jupyter kernel that starts in the background now; `close()` shuts it down.
    Forced choices (`tool_choice="required"` or a named function) apply to the first model turn of each
    submit; later turns use "auto", otherwise the model could never answer.
    """

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
        code_interpreter: bool | KernelSandbox | Mapping[str, Any] = False,
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
        _check_run_controls(max_turns, max_concurrency, limits, context_window, history, output_retries)
        self.model, self._owns_model = resolve_model(model, base_url=base_url, api_key=api_key)  # close what we made
        self.limits = limits or Limits()
        self.max_result_chars = check_result_limit(max_result_chars, "max_result_chars")
        self.trace_content = trace_content
        self.deps = deps  # handed to tools through their `RunContext` parameter
        self.output_retries = output_retries  # invalid typed answers sent back before OutputValidationError
        self.last_usage, self._past_usage = Usage(), Usage()
        self._context = ContextBudget(self.model, context_window, history)
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.tool_choice = tool_choice
        self.max_turns = max_turns
        self.parallel_tool_calls = parallel_tool_calls
        self.max_concurrency = 1 if not parallel_tool_calls else max_concurrency
        self.settings = settings
        self._tools: dict[str, Tool] = {}
        self._resources: list[Any] = []  # MCP sessions, OpenAPI clients: closed with the conversation
        self._gate = ApprovalGate(self._tools, None)
        self._interpreter: PythonTool | None = None
        self._run_start = 0  # where the current (or last) run's messages begin
        self.on_approval = on_approval
        self._running = False  # one run at a time: two would interleave their messages
        self._register_first(list(tools), code_interpreter)

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
        integration = _integration("mcp", "mcp")
        connection = await integration.MCPConnection.open(command, **options)
        return await self._adopt(connection, connection.tools)

    def register_openapi(self, spec: Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> list[Tool]:
        """Make an OpenAPI service's operations tools of this conversation; see `aregister_openapi`."""
        return _sync.run(self.aregister_openapi(spec, **options))

    async def aregister_openapi(self, spec: Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> list[Tool]:
        """Register a tool per operation of an OpenAPI 3.x document (a dict, a file, or a URL). Options:
        `base_url`, `headers`, `include` (operationIds or a predicate), `timeout`, `max_response_chars`."""
        integration = _integration("openapi", "openapi")
        service = await integration.openapi_tools(spec, **options)
        return await self._adopt(service, service.tools)

    async def _adopt(self, resource: Any, tools: list[Tool]) -> list[Tool]:
        """Register all of `tools` or none, and close `resource` with the conversation."""
        clash = sorted({tool.name for tool in tools} & set(self._tools))
        if clash:
            await resource.aclose()
            raise ToolDefinitionError(f"tools named {', '.join(clash)} are already registered; pass prefix=...")
        for new in tools:
            self.register(new)
        self._resources.append(resource)
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
        fork = Conversation(
            self.model, tools=self.tools, tool_choice=self.tool_choice, max_turns=self.max_turns,
            parallel_tool_calls=self.parallel_tool_calls, max_concurrency=self.max_concurrency,
            on_approval=self.on_approval, limits=self.limits, max_result_chars=self.max_result_chars,
            context_window=self._context.context_window, history=self._context.history,
            trace_content=self.trace_content, deps=self.deps, output_retries=self.output_retries, **self.settings,
        )
        settled = self.messages[: self._run_start] if self._running else self.messages  # not a run in flight
        fork.messages = [dict(message) for message in settled]
        return fork

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    @property
    def tools(self) -> list[Tool]:
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
        for a person and no `on_approval` callback decides."""
        run = self._run(content, stream=False, answer=self._answer_rule(output_type))
        return await self._final(run, typed=output_type is not None)

    async def aresume(self, decisions: Mapping[str, Decision], *, output_type: Any = None) -> Any:
        """Go on with a run paused by `ApprovalRequired`: `decisions` maps each waiting call's id to True (run
        it), False or a reason string (decline). Returns the final answer as `asubmit` does."""
        check_decisions(self._gate, pending_calls(self.messages), decisions)
        answer = self._answer_rule(output_type)
        run = self._run(None, stream=False, answer=answer, decisions=decisions)
        return await self._final(run, typed=output_type is not None)

    def resume(self, decisions: Mapping[str, Decision], *, output_type: Any = None) -> Any:
        """`aresume` from sync code."""
        return _sync.run(self.aresume(decisions, output_type=output_type))

    @property
    def on_approval(self) -> ApprovalCallback | None:
        """Decides calls that need a yes: `fn(call)` (sync or async) returns True, False or a reason to decline
        with; None pauses the run instead (`ApprovalRequired`, then `resume`)."""
        return self._on_approval

    @on_approval.setter
    def on_approval(self, callback: ApprovalCallback | None) -> None:
        if callback is not None and not callable(callback):
            raise ConfigurationError(f"on_approval must be a function of the call, got {type(callback).__name__}")
        self._on_approval = callback
        self._gate.callback = off_the_loop(callback) if callback is not None else None

    @property
    def pending_approvals(self) -> list[PendingCall]:
        """The calls a paused run waits on (empty when none waits)."""
        return [PendingCall.of(call) for call in pending_calls(self.messages) if self._gate.needs_approval(call)]

    @staticmethod
    async def _final(events: AsyncIterator[Event], *, typed: bool) -> Any:
        final = FinalAnswer("")
        async with _closing(events) as running:  # closed at once, even when a pause raises
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
        from functionary_agent import notebook  # small, and it imports IPython only to display

        if output_type is None and (notebook.in_notebook() if display is None else display):
            return notebook.submit_with_display(self, content)
        return _sync.run(self.asubmit(content, output_type=output_type))

    def stream(self, content: Content = None, *, output_type: Any = None) -> Iterator[Event]:
        return _sync.iterate(self.astream(content, output_type=output_type))

    def _answer_rule(self, output_type: Any) -> AnswerRule:
        if output_type is None:
            return PlainAnswer()
        if FINAL_RESULT in self._tools:
            raise ToolDefinitionError(
                f"a tool named {FINAL_RESULT!r} clashes with the reserved tool that carries typed answers; rename it"
            )
        return TypedAnswer(output_type, self.output_retries)

    async def _run(
        self, content: Content, *, stream: bool, answer: AnswerRule, decisions: Mapping[str, Decision] | None = None
    ) -> AsyncIterator[Event]:
        with self._running_alone():
            self._start_run(content, resuming=decisions is not None)
            tracer = RunTracer(model_label(self.model), content=self.trace_content)
            runner = CallRunner(
                self._tools, RepeatGuard(), tracer, self.max_concurrency, self.max_result_chars, self._run_context
            )
            tool_choice = answer.first_choice(self.tool_choice)
            calls = pending_calls(self.messages) if decisions is not None else None  # a paused run goes on
            with tracer.run_span() as run_span:
                for _ in range(self.max_turns):
                    if calls is None:
                        verdict = Verdict()
                        async with _closing(self._turn(tool_choice, stream, tracer, answer)) as turn:
                            async for item in turn:
                                if isinstance(item, Verdict):
                                    verdict = item
                                else:
                                    yield item
                        run_span.finish(self.last_usage)
                        if verdict.final is not None:
                            yield verdict.final
                            return
                        calls = verdict.calls
                    results: dict[int, ToolResult] = {}
                    async with _closing(self._call(calls, runner, results, decisions)) as running:
                        async for event in running:
                            yield event
                            if isinstance(event, ApprovalRequested):
                                return
                    calls, decisions = None, None
                    tool_choice = answer.next_choice(bool(results) and all(r.repeated for r in results.values()))
                raise MaxTurnsExceeded(self.max_turns)

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

    def _take(self, message: AssistantMessage | None) -> AssistantMessage:
        """Record a model turn: its message joins the chat and its usage the run's."""
        if message is None:
            raise ModelError(f"{type(self.model).__name__} ended its stream without an assistant message")
        self.last_usage.add_response(message.usage)
        self.messages.append(message.to_dict())
        return message

    async def _turn(
        self, tool_choice: ToolChoice, stream: bool, tracer: RunTracer, answer: AnswerRule
    ) -> AsyncIterator[Event | Verdict]:
        """One model turn within the run's limits: its events, then the verdict on its message (added to the chat
        with its notes)."""
        self.limits.check_request(self.last_usage)
        message = None
        async with _closing(self._ask(tool_choice, stream, tracer, answer)) as asking:
            async for item in asking:
                if isinstance(item, AssistantMessage):
                    message = item
                else:
                    yield item
        verdict = answer.judge(self._take(message))
        self.messages += verdict.notes
        yield verdict

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

    async def _ask(
        self, tool_choice: ToolChoice, stream: bool, tracer: RunTracer, answer: AnswerRule
    ) -> AsyncIterator[Event | AssistantMessage]:
        """One model turn; in stream mode its deltas become events (not those of the answer's own tool), and the
        message comes last."""
        tools = self.tool_specs() + answer.tool_specs()
        request: dict[str, Any] = {**self.settings, "tools": tools, "tool_choice": tool_choice}
        if not self.parallel_tool_calls:
            request["parallel_tool_calls"] = False
        messages = await self._context.fit(self.messages, request["tools"], request)
        with tracer.request_span(messages, tool_choice) as span:
            if not stream:
                message = await self.model.acomplete(messages, **request)
                span.finish(message)
                yield message
                return
            async with _closing(self._streamed(messages, request, answer.hidden_tools)) as items:
                async for item in items:
                    if isinstance(item, AssistantMessage):
                        span.finish(item)
                    yield item

    async def _streamed(
        self, messages: list[dict[str, Any]], request: dict[str, Any], hidden_tools: frozenset[str]
    ) -> AsyncIterator[Event | AssistantMessage]:
        """The model's deltas as events, the message last; calls of `hidden_tools` make no events."""
        call_ids: dict[int, str] = {}
        hidden: set[int] = set()
        async with _closing(self.model.astream(messages, **request)) as deltas:
            async for item in deltas:
                if isinstance(item, AssistantMessage):
                    yield item
                    continue
                for event in _delta_events(item, call_ids):
                    if isinstance(event, ToolCallStarted) and event.name in hidden_tools:
                        hidden.add(event.index)
                    if not (isinstance(event, (ToolCallStarted, ToolCallArgumentsDelta)) and event.index in hidden):
                        yield event

    async def _call(
        self,
        calls: Sequence[ToolCall],
        runner: CallRunner,
        results: dict[int, ToolResult],
        decisions: Mapping[str, Decision] | None,
    ) -> AsyncIterator[ToolResult | ApprovalRequested]:
        """Run a turn's calls within the run's tool-call budget, once approved. Every call gets its tool message,
        in the model's order, even one cut short by cancellation, so the message list stays valid; a call that
        waits for a person pauses the run before any call runs, with no tool message yet."""
        if not calls:
            return
        self._check_call_budget(calls)
        review = await self._gate.review(calls, decisions)
        if review.waiting:
            yield ApprovalRequested(review.waiting)
            return
        self.last_usage.tool_calls += len(calls)
        for index, note in review.declined.items():
            results[index] = ToolResult(calls[index].id, calls[index].name, calls[index].arguments, note, True)
            yield results[index]
        running = runner.run([calls[i] for i in review.run], results, positions=review.run)
        try:
            async with _closing(running):
                async for result in running:
                    yield result
        finally:
            self.messages += [
                tool_message(call, results[index].content if index in results else CANCELLED)
                for index, call in enumerate(calls)
            ]

    def _check_call_budget(self, calls: Sequence[ToolCall]) -> None:
        if not self.limits.calls_allowed(self.last_usage, len(calls)):
            exceeded = self.limits.tool_calls_exceeded(self.last_usage, len(calls))
            note = f"Error: not run: this run reached its tool-call limit ({exceeded.limit}={exceeded.value})"
            self.messages += [tool_message(call, note) for call in calls]
            raise exceeded

    def _run_context(self, call: ToolCall) -> RunContext[Any]:
        return RunContext(self.deps, call.id, self.last_usage, self)

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
        resources, self._resources = self._resources, []
        closers += [resource.aclose for resource in resources]
        if self._owns_model:
            closers.append(self.model.aclose)
        await _close_all(closers)

    def close(self) -> None:
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

    def _repr_markdown_(self) -> str:
        from functionary_agent.notebook import render_markdown

        return render_markdown(self.messages)

    def _repr_html_(self) -> str:
        from functionary_agent.notebook import image_resolver, render_html

        return render_html(self.messages, resolve_image=image_resolver(self))

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


T = TypeVar("T")


@asynccontextmanager
async def _closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an async generator when the block ends: leaving a run early must cancel what it started now, not
    whenever the garbage collector gets to it."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


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


def _delta_events(delta: Mapping[str, Any], call_ids: dict[int, str]) -> Iterator[Event]:
    """A model's delta -> events; `call_ids` maps each call index seen so far to its id. A delta without
    `index` (some servers omit it) is placed the way the OpenAI-compatible engine places it."""
    if delta.get("content"):
        yield TextDelta(delta["content"])
    for part in delta.get("tool_calls") or ():
        index = part.get("index")
        if index is None:
            index = stream_call_index(call_ids, part.get("id") or None)
        function = part.get("function") or {}
        if index not in call_ids:
            call_ids[index] = part.get("id") or ""
            yield ToolCallStarted(index, call_ids[index], function.get("name", ""))
        if function.get("arguments"):
            yield ToolCallArgumentsDelta(index, call_ids[index], function["arguments"])


def _check_run_controls(
    max_turns: int, max_concurrency: int | None, limits: object, context_window: int | None, history: object,
    output_retries: int,
) -> None:
    if max_turns < 1:
        raise ConfigurationError(f"max_turns must be at least 1, got {max_turns}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ConfigurationError(f"max_concurrency must be at least 1 or None, got {max_concurrency}")
    if limits is not None and not isinstance(limits, Limits):
        raise ConfigurationError(f"limits must be a Limits(...), got {type(limits).__name__}")
    if context_window is not None and (not isinstance(context_window, int) or context_window < 256):
        raise ConfigurationError(f"context_window must be at least 256 tokens (or None), got {context_window!r}")
    if history is not None and not callable(history):
        raise ConfigurationError(f"history must be a function of the messages, got {type(history).__name__}")
    if not isinstance(output_retries, int) or output_retries < 0:
        raise ConfigurationError(f"output_retries must be 0 or more, got {output_retries!r}")


def _integration(module: str, extra: str) -> Any:
    """Import an optional integration, or say which extra installs it."""
    try:
        return importlib.import_module(f"functionary_agent.integrations.{module}")
    except ImportError as exc:
        raise ConfigurationError(f"{exc}; install it with: pip install 'functionary-agent[{extra}]'") from None
