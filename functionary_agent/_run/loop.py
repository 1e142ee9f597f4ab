"""The agent loop: ask the model, run the calls it asks for, feed the results back, until it answers.

Each turn is two steps (`model_step`, `call_step`) over one `RunState`; a resumed run starts with its waiting
calls. The loop ends with the answer, a pause for approval, a limit, or an error, and records which in
`state.end` whatever happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from functionary_agent._run.call_step import call_step
from functionary_agent._run.model_step import model_step
from functionary_agent._run.state import RunDeps, RunEnd, RunState
from functionary_agent._sync import closing
from functionary_agent.errors import LimitExceeded, MaxTurnsExceeded
from functionary_agent.events import Event


async def run_loop(deps: RunDeps, state: RunState) -> AsyncIterator[Event]:
    """The run's events, up to its `FinalAnswer` (or `ApprovalRequested`, or an exception)."""
    try:
        with deps.tracer.run_span() as span:
            for _ in range(deps.config.max_turns):
                if state.calls is None:
                    async with closing(model_step(deps, state)) as asking:
                        async for event in asking:
                            yield event
                    span.finish(state.usage)
                    if state.final is not None:
                        yield state.final
                        return
                async with closing(call_step(deps, state)) as calling:
                    async for event in calling:
                        yield event
                if state.end is not None:  # paused for approval
                    return
                state.next_turn()
            raise MaxTurnsExceeded(deps.config.max_turns)
    except BaseException as exc:
        state.end = state.end or _ended_by(exc)
        raise


def _ended_by(exc: BaseException) -> RunEnd:
    if isinstance(exc, LimitExceeded):
        return RunEnd("limit", detail=str(exc))
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)):
        return RunEnd("cancelled")
    return RunEnd("error", detail=f"{type(exc).__name__}: {exc}")
