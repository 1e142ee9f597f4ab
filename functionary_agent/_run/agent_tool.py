"""Agents as tools: a configured conversation (its model, tools, system prompt) becomes a tool of another.

Each call runs the task on a fresh copy of the sub-agent's messages, so concurrent calls share no history; the
answer (or the typed output as JSON) is what the calling model reads; the sub-run's usage is added to the caller's
run; an error of the sub-run becomes the tool error the calling model reads. Nesting is bounded: an agent that
(directly or not) calls itself deeper than `max_depth` gets a `LimitExceeded` as its tool error.
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol

import pydantic

from functionary_agent.errors import LimitExceeded
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Tool
from functionary_agent.usage import Usage


class Agent(Protocol):
    """What a tool needs of the conversation it runs: a copy for each task (a `Conversation` is one)."""

    last_usage: Usage

    def fork(self) -> Agent: ...

    async def asubmit(self, content: str, *, output_type: Any = None) -> Any: ...

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("functionary_agent_depth", default=0)


def agent_tool(agent: Agent, name: str, description: str, output_type: Any, max_depth: int) -> Tool:
    """The tool that runs `agent` on a task; see `Conversation.as_tool`."""
    dump = pydantic.TypeAdapter(output_type).dump_json if output_type is not None else None

    async def run_agent(task: str, ctx: RunContext[Any]) -> str:
        """Args:
            task: What to do, with everything needed to do it: the agent sees nothing else of this chat.
        """
        depth = _DEPTH.get()
        if depth >= max_depth:
            raise LimitExceeded("max_depth", max_depth, depth + 1,
                                f"agents called agents {depth + 1} deep; the bound is max_depth={max_depth}")
        token = _DEPTH.set(depth + 1)
        copy = agent.fork()
        try:
            answer = await copy.asubmit(task, output_type=output_type)
        finally:
            _DEPTH.reset(token)
            if ctx is not None:
                ctx.usage.add(copy.last_usage)
        return dump(answer).decode() if dump is not None else str(answer)

    run_agent.__name__ = name
    return Tool.from_function(run_agent, name, description)
