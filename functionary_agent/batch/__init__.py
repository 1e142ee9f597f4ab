"""Batch runs: many independent conversations, one per input item, answered concurrently and written as JSONL.

Input, one JSON object a line (blank lines are ignored):

    {"id": "q1", "prompt": "What is the weather in Istanbul?"}
    {"id": 2, "messages": [{"role": "user", "content": "..."}], "tool_choice": "required"}

`id` is a string or an integer, unique in the input; an item has `prompt` (the user's message) or `messages` (a
chat to continue: OpenAI message dicts; the settings' system message goes first unless they start with one), never
both; `tool_choice` is optional (for the item's first model turn, as `Conversation` applies it); `output_type`
(optional) names a class defined (not imported) in one of the tools files or modules (a pydantic model, a
dataclass, a TypedDict, a NamedTuple or an Enum) or one of `str`, `int`, `float`, `bool`, and nothing else (never
a function: pydantic would call it with the model's answer): the item is answered as a typed answer
(`submit(output_type=...)`) and `answer` is that value as JSON; a tools file may define only such types (no
tools) when items name them. Any bad item refuses the whole run before anything is written or sent, with one
`BatchInputError` that lists every problem of every line (its shape, a duplicate id, an output_type that names no
type) with its line number.

Output, one JSON object a line per item, in the order items finish:

    {"id", "answer", "error", "usage", "seconds", "messages"}

`error` is null for an answer; for a failed item (the server failed, the run hit `max_turns`, ...) it is
`{"type", "message"}` and `answer` is null. A failed item never stops the batch; faults the model can fix (a tool
that raised, bad arguments) are not failures, the model reads them as tool messages as usual.

The output is never the input file (`refuse_output_as_input` compares the files, not their names; an output
whose lines are input items is refused too).

Resume: with an output file that exists, ids answered there are skipped and new lines are appended; ids that
*failed* there are tried again (their old lines are removed first), so a finished file holds each id once. One
writer appends each line with one write; a last line cut short by a killed run is cut away by the next run. One run
at a time writes an output: a run holds a lock on `OUTPUT.lock` beside it (an empty file, left in place), and a
second run on the same output is refused at once.

    from functionary_agent.batch import BatchSettings, read_items, run_batch

    summary = run_batch(read_items("questions.jsonl"), "answers.jsonl", conversation=BatchSettings(
        tools=("examples/weather.py",), base_url="http://127.0.0.1:8000/v1"), concurrency=16)

Where things are: `items.py` checks the input (`read_items`, `check_items`, `resolve_output_types`), `settings.py`
says how each conversation is made (`BatchSettings`), `output.py` is the locked, resumable output file
(`BatchOutput`), `runner.py` the worker pool (`run_batch`, `answer_all`); `functionary_agent.batch.ray` runs the
same items on a Ray cluster. Every public name of those modules is importable from here. Not imported by
`import functionary_agent`.
"""

from functionary_agent.batch.items import (
    MAX_PROBLEMS_SHOWN,
    BatchInputError,
    BatchItem,
    check_batch,
    check_items,
    read_items,
    resolve_output_types,
)
from functionary_agent.batch.output import BatchOutput, Record, refuse_output_as_input
from functionary_agent.batch.runner import (
    BatchSummary,
    answer_all,
    answer_item,
    answer_items,
    arun_batch,
    failure_record,
    run_batch,
)
from functionary_agent.batch.settings import BatchSettings, ConversationFactory

__all__ = [
    "MAX_PROBLEMS_SHOWN",
    "BatchInputError",
    "BatchItem",
    "BatchOutput",
    "BatchSettings",
    "BatchSummary",
    "ConversationFactory",
    "Record",
    "answer_all",
    "answer_item",
    "answer_items",
    "arun_batch",
    "check_batch",
    "check_items",
    "failure_record",
    "read_items",
    "refuse_output_as_input",
    "resolve_output_types",
    "run_batch",
]
