"""`RunContext`: what a tool may know of the run that called it.

Annotate a tool parameter with `RunContext` (or `RunContext[MyDeps]`) and it is left out of the schema the model
reads; each call receives the conversation's `deps` (any object you passed as `Conversation(deps=...)`: a database
handle, an HTTP client), the call's id, the run's usage so far, and the conversation itself. Treat the
conversation as read-only: a tool runs while the loop owns the message list.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from functionary_agent.conversation import Conversation
    from functionary_agent.usage import Usage

__all__ = ["RunContext"]


DepsT = TypeVar("DepsT")


@dataclass(frozen=True)
class RunContext(Generic[DepsT]):
    """Given to a tool parameter annotated with it; never part of the tool's schema.

    Attributes:
        deps: The conversation's `deps` (whatever was passed as `Conversation(deps=...)`; None by default).
        call_id: The id of the call being run.
        usage: The usage of the run so far (the conversation's `last_usage`, still being counted).
        conversation: The conversation running the call; read it, do not change it while the run goes on.
    """

    deps: DepsT
    call_id: str
    usage: Usage
    conversation: Conversation


def is_run_context(annotation: Any) -> bool:
    """Whether a parameter's annotation asks for the run context: `RunContext`, `RunContext[T]`, either inside
    `Annotated[...]`, or in a union (`RunContext | None`, which is then refused for its default)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is RunContext or typing.get_origin(annotation) is RunContext:
        return True
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    return is_union and any(is_run_context(member) for member in typing.get_args(annotation))
