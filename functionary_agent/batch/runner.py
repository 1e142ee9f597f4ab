"""The worker pool: every item on a fresh conversation, `concurrency` at a time on one event loop, each record
handed on as it is done (`answer_items`, `answer_all`); `run_batch` / `arun_batch` add the checked input and the
resumable output file around it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from functionary_agent import _sync
from functionary_agent.batch.items import BatchItem, check_items, resolve_output_types
from functionary_agent.batch.output import BatchOutput, Record
from functionary_agent.batch.settings import BatchSettings, ConversationFactory
from functionary_agent.conversation import Conversation
from functionary_agent.errors import ConfigurationError


@dataclass
class BatchSummary:
    """What a batch run did: `total` items given, `skipped` (answered in the output already), and this run's
    `answered` and `failed` items."""

    total: int
    skipped: int
    answered: int
    failed: int
    seconds: float


async def answer_item(
    item: BatchItem, make_conversation: ConversationFactory, output_types: Mapping[str, Any] | None = None
) -> Record:
    """Run one item on a fresh conversation: its output record, with `error` set when it failed. `output_types`
    maps the items' `output_type` names to types (`resolve_output_types`)."""
    started = time.perf_counter()
    chat: Conversation | None = None
    answer: Any = None
    error: dict[str, str] | None = None
    try:
        output_type = _type_of(item, output_types or {})
        chat = make_conversation()
        if item.tool_choice is not None:
            chat.tool_choice = item.tool_choice
        if item.messages is not None:
            given = [dict(message) for message in item.messages]
            chat.messages = given if given[0]["role"] == "system" else [*chat.messages, *given]
        if output_type is None:
            answer = await chat.asubmit(item.prompt)
        else:
            answer = _as_json(output_type, await chat.asubmit(item.prompt, output_type=output_type))
    except Exception as exc:  # a failed item is a line in the output, never the end of the batch
        error = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        if chat is not None:
            with contextlib.suppress(Exception):
                await chat.aclose()
    usage = getattr(chat, "last_usage", None)
    return {
        "id": item.id, "answer": answer, "error": error, "usage": usage.to_dict() if usage is not None else None,
        "seconds": round(time.perf_counter() - started, 3), "messages": _messages(item, chat),
    }


def _type_of(item: BatchItem, output_types: Mapping[str, Any]) -> Any:
    if not isinstance(item.output_type, str):
        return item.output_type
    if item.output_type not in output_types:
        raise ConfigurationError(f"output_type {item.output_type!r} was not resolved (resolve_output_types)")
    return output_types[item.output_type]


def _as_json(output_type: Any, value: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(output_type).dump_python(value, mode="json")


def failure_record(item: BatchItem, kind: str, message: str) -> Record:
    """The record of an item that never ran to an end (its worker died, say)."""
    return {"id": item.id, "answer": None, "error": {"type": kind, "message": message}, "usage": None,
            "seconds": 0.0, "messages": _messages(item, None)}


def _messages(item: BatchItem, chat: Conversation | None) -> list[dict[str, Any]]:
    if chat is not None:
        return chat.messages
    return item.messages if item.messages is not None else [{"role": "user", "content": item.prompt}]


async def answer_items(
    items: Iterable[BatchItem], make_conversation: ConversationFactory, concurrency: int,
    deliver: Callable[[Record], object], output_types: Mapping[str, Any] | None = None,
) -> None:
    """Answer every item, at most `concurrency` at once, handing each record to `deliver` as it is done. A fixed
    pool of `concurrency` workers takes the next item as one frees up: a million items cost `concurrency` tasks.
    Cancelling this cancels the items under way; delivered ones stay delivered."""
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
    next_items: Iterator[BatchItem] = iter(items)  # shared: each worker takes the next (one thread, no race)

    async def work() -> None:
        for item in next_items:
            deliver(await answer_item(item, make_conversation, output_types))

    workers = [asyncio.ensure_future(work()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


async def arun_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    output: str | os.PathLike[str],
    *,
    conversation: BatchSettings | ConversationFactory,
    concurrency: int = 16,
    on_result: Callable[[Record], object] | None = None,
) -> BatchSummary:
    """Run every item not answered in `output` yet, `concurrency` at a time, appending a line per item (see the
    module's docstring for the formats and the resume rule). `conversation` makes each item's conversation:
    `BatchSettings`, or any function returning a fresh `Conversation` (its model is yours to close).
    `on_result(record)` is called after each line is written. Bad items raise `BatchInputError` before anything
    runs; failed items are counted in the summary, never raised."""
    checked = check_items(items, conversation=conversation)
    started = time.perf_counter()
    with BatchOutput(output) as out:
        todo = out.pending(checked)

        def deliver(record: Record) -> None:
            if out.write(record) and on_result is not None:
                on_result(record)

        await answer_all(todo, conversation, concurrency, deliver)
    return BatchSummary(len(checked), len(checked) - len(todo), out.answered, out.failed,
                        time.perf_counter() - started)


def run_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    output: str | os.PathLike[str],
    *,
    conversation: BatchSettings | ConversationFactory,
    concurrency: int = 16,
    on_result: Callable[[Record], object] | None = None,
) -> BatchSummary:
    """`arun_batch` from sync code (Jupyter included)."""
    return _sync.run(
        arun_batch(items, output, conversation=conversation, concurrency=concurrency, on_result=on_result)
    )


async def answer_all(
    items: Iterable[BatchItem], conversation: BatchSettings | ConversationFactory, concurrency: int,
    deliver: Callable[[Record], object],
) -> None:
    """`answer_items` with conversations from `BatchSettings` (their model closed at the end) or a factory; the
    items' output types are looked up in the settings' tools (a factory: str, int, float, bool only)."""
    items = list(items)
    tools = conversation.tools if isinstance(conversation, BatchSettings) else ()
    output_types = resolve_output_types(items, tools)
    if isinstance(conversation, BatchSettings):
        async with conversation.conversations() as make:
            await answer_items(items, make, concurrency, deliver, output_types)
    else:
        await answer_items(items, conversation, concurrency, deliver, output_types)
