"""One assistant turn as a loop over segments: choose an opener, decode its text or call, repeat.

The loop follows the format's call grammar (`functionary_agent.formats.grammar`) and the request's limits. Where
steering is on (small models, see `_steering`), the plan says which tools a first call may go to, reviews each
call before anyone sees it (a rejected call is rewound and replaced by text), adds the calls for the other values
the user listed, and shapes how text may open. The decoder (`_llama_decode`) knows none of that policy.

Decoder states used here: `mark` (a checkpoint), `hold` (keep output back), `release` (pass it on, maybe with the
reviewed arguments in place of what was written), `discard` + `rewind` (drop a rejected call and go back).

Runaway guards (on unless `FUNCTIONARY_AGENT_RUNAWAY_GUARDS=off`, a switch for measuring them): a call identical to
one already made in this turn (same name, same arguments) ends the turn with the calls made so far, and prose ends
where the model starts to loop (`Decoder.free_text`'s `cycles`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from functionary_agent.formats import CallGrammar, CallSpec, arguments_gbnf
from functionary_agent.models._code_segment import CodeEnd, code_opening
from functionary_agent.models._llama_decode import Decoder
from functionary_agent.models._steering import CopyBias, text_opening

CallReview = Callable[[CallSpec, str, bool], "str | None"]
logger = logging.getLogger(__name__)


def runaway_guards_on() -> bool:
    """Whether the runaway guards are on: they are unless `FUNCTIONARY_AGENT_RUNAWAY_GUARDS` is "off" (or "0")."""
    return os.environ.get("FUNCTIONARY_AGENT_RUNAWAY_GUARDS", "").strip().lower() not in {"off", "0", "false"}


@dataclass(frozen=True)
class TurnPlan:
    """What one request allows: the format's call grammar plus our limits, and the review of each call (given the
    call, its argument JSON and whether text may replace it, it returns the arguments to send, or None: no call)."""

    grammar: CallGrammar
    triggers: tuple[str, ...]
    stops: tuple[str, ...]
    max_calls: int | None
    max_items: int
    max_length: int
    review: CallReview
    prose: bool = False  # steer text segments (see `Decoder.free_text`); for small models that misread the format
    after_result: bool = False  # the conversation ends with a tool result (see `Decoder.free_text`)
    calls_first: bool = False  # where text or a call may come first, try the best call first (the review decides)
    candidates: frozenset[str] | None = None  # with calls_first: the tools that call may be to (None: any)
    answer_first: bool = False  # with calls_first: text comes first (a python cell's result is there to report)
    # with calls_first and no candidate: how much more likely (log-probability of the first token) the model must
    # find a call than text for a call to any tool to be tried; None: text then
    strong_call: float | None = None
    # given a call just made (name, arguments), the arguments of a further call of the same tool, or None
    further: Callable[[str, str], str | None] | None = None
    copy_source: str = ""  # the conversation's text, for `CopyBias`
    copy_bias: float = 0.0
    copy_examples: str = ""  # the tool descriptions, for `CopyBias`
    runaway_guards: bool = field(default_factory=runaway_guards_on)  # see the module's docstring

    def arguments_grammar(self, spec: CallSpec) -> str:
        parameters = _nonempty_required_strings(spec.parameters)
        return arguments_gbnf(replace(spec, parameters=parameters), max_items=self.max_items,
                              max_length=self.max_length, closed_objects=True)


def _nonempty_required_strings(schema: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A required free string may not be empty: "" is a small model's way of not knowing, never a useful value."""
    if not schema or not isinstance(schema.get("properties"), Mapping):
        return schema
    properties = dict(schema["properties"])
    for name in schema.get("required") or ():
        prop = properties.get(name)
        if not isinstance(prop, Mapping) or any(k in prop for k in ("enum", "const", "pattern", "minLength")):
            continue
        if prop.get("type") == "string":
            properties[name] = {**prop, "minLength": 1}
    return {**schema, "properties": properties}


def run_turn(decoder: Decoder, plan: TurnPlan) -> None:
    """The decode loop of `functionary_agent.formats.grammar`: choose an opener, decode its text or call, repeat.
    A JSON call the review rejects is rewound and replaced by free text, where the protocol allows text."""
    grammar = plan.grammar
    openers: Mapping[str, CallSpec | None] = grammar.first_openers()
    calls, may_stop, first = 0, False, plan.calls_first
    made: set[tuple[str, str]] = set()  # the JSON calls of this turn, see `_call_key`
    while openers:
        mark = decoder.mark()
        decoder.hold()
        target = _open(decoder, _first_openers(decoder, plan, openers) if first else openers, may_stop)
        first = False
        if target is _STOP:
            decoder.release()
            return
        if isinstance(target, CallSpec) and target.parameters is not None:
            outcome = _json_call(decoder, plan, target, _text_opener(openers), made)
            if outcome is _STOP:
                return
            if outcome is not _REJECTED:
                count = _further_calls(decoder, plan, target, outcome, calls + 1, made)
                if count > calls + 1 or (plan.max_calls is not None and count >= plan.max_calls):
                    return  # the limit, or a list the further calls have covered: the turn is complete
                calls = count
                openers, may_stop = grammar.openers(), calls >= grammar.min_calls
                continue
            decoder.discard()
            decoder.rewind(mark)
            decoder.force(_text_opener(openers) or "")
            target = None
        if target is None:
            decoder.release()
        marker = _free_text(decoder, plan) if target is None else _code_cell(decoder, plan, mark)
        if marker is _STOP:
            return
        calls += target is not None
        if marker is None or (plan.max_calls is not None and calls >= plan.max_calls):
            return
        openers, may_stop = grammar.continuations(marker), False


_STOP: Any = object()
_REJECTED: Any = object()


def _further_calls(
    decoder: Decoder, plan: TurnPlan, spec: CallSpec, arguments: str, calls: int, made: set[tuple[str, str]]
) -> int:
    """Steering: after a call, the further calls of the same tool that `plan.further` derives (the other values
    the user listed), written as the model would write them. Returns the number of calls made so far."""
    openers = plan.grammar.openers().items()
    opener = next((o for o, target in openers if target is not None and target.name == spec.name), None)
    while plan.further is not None and opener is not None and (plan.max_calls is None or calls < plan.max_calls):
        following = plan.further(spec.name, arguments)
        if following is None or (plan.runaway_guards and not _first_time(made, spec.name, following)):
            break
        decoder.force(opener + following + spec.end)
        arguments, calls = following, calls + 1
    return calls


def _open(decoder: Decoder, openers: Mapping[str, CallSpec | None], may_stop: bool) -> Any:
    """The segment the model opens next (a CallSpec, or None for text), or _STOP."""
    if "" in openers:
        return openers[""]
    chosen = decoder.choose(list(openers), may_stop)
    return _STOP if chosen is None else openers[chosen]


def _first_openers(decoder: Decoder, plan: TurnPlan, openers: Mapping[str, CallSpec | None]) -> Any:
    """Calls first, where text could come first too: the JSON calls to the candidate tools; when none is a
    candidate, to any tool if the model strongly prefers a call to text here, else text alone."""
    text = _text_opener(openers)
    if plan.answer_first and text is not None:
        return {text: None}
    calls = {k: v for k, v in openers.items()  # JSON calls; a raw-code call (python) where it is a candidate
             if v is not None and (v.parameters is not None or v.name in (plan.candidates or ()))}
    if text is None or not calls:
        return openers
    if plan.candidates is None:
        return calls
    chosen = {k: v for k, v in calls.items() if v is not None and v.name in plan.candidates}
    if chosen:
        return chosen
    if plan.strong_call is not None and decoder.preference(list(calls), text) >= plan.strong_call:
        return calls
    return {text: None}


def _text_opener(openers: Mapping[str, CallSpec | None]) -> str | None:
    return next((opener for opener, target in openers.items() if target is None), None)


def _json_call(
    decoder: Decoder, plan: TurnPlan, spec: CallSpec, text_opener: str | None, made: set[tuple[str, str]]
) -> Any:
    """Decode one call's arguments and let the review keep, tidy or reject them; returns the arguments kept.
    With the runaway guards on, a call identical to one in `made` is dropped and ends the turn (_STOP)."""
    start = decoder.held_size()
    copy = CopyBias(decoder.llama, plan.copy_source, plan.copy_bias, plan.copy_examples) if plan.copy_bias else None
    if not decoder.json_arguments(plan.arguments_grammar(spec), copy, cycles=plan.runaway_guards):
        decoder.release()
        return _STOP
    arguments = plan.review(spec, decoder.held_text(start), text_opener is not None)
    if arguments is None:
        return _REJECTED
    if not _first_time(made, spec.name, arguments) and plan.runaway_guards:
        decoder.discard()
        logger.info("turn ended at a repeated call: %s(%s) was already made in this turn", spec.name, arguments)
        return _STOP
    decoder.release(start, arguments)
    if spec.end:
        decoder.force(spec.end)
    return arguments


def _free_text(decoder: Decoder, plan: TurnPlan) -> str | None:
    """Text up to the end of the turn or a trigger; steered text opens as `text_opening` says.
    Prose (not code: it may well repeat lines) ends where it starts to loop, with the runaway guards on."""
    cycles = plan.runaway_guards
    if not plan.prose:
        return decoder.free_text(plan.triggers, plan.stops, cycles=cycles)
    ban, grammar = text_opening(after_result=plan.after_result)
    return decoder.free_text(plan.triggers, plan.stops, opening_ban=ban, opening_grammar=grammar, no_loops=True,
                             cycles=cycles)


def _code_cell(decoder: Decoder, plan: TurnPlan, mark: tuple[int, int]) -> Any:
    """A raw-code call's cell, its opener still held. Steered, the cell opens like Python and ends before its first
    line that is not Python (`_code_segment`). A blank cell is no call: it goes, with its opener, and the turn ends
    (_STOP). Returns the trigger the cell ended with, or None (the turn ends)."""
    start = decoder.held_size()
    end = CodeEnd() if plan.prose else None
    if end is None:
        marker = decoder.free_text(plan.triggers, plan.stops)
    else:
        ban, grammar = code_opening()
        marker = decoder.free_text(plan.triggers, plan.stops, opening_ban=ban, opening_grammar=grammar, stop_after=end)
    written = decoder.held_text(start)
    if not written[: len(written) - len(marker or "")].strip():
        decoder.discard()
        decoder.rewind(mark)
        logger.info("turn ended at an empty code cell: no call was made of it")
        return _STOP
    decoder.release()
    if end is not None and end.line:
        logger.info("code cell ended before a line that is not Python: %r", end.line[:80])
    return marker


def _first_time(made: set[tuple[str, str]], name: str, arguments: str) -> bool:
    """Record the call `name(arguments)`; False when this turn already made it."""
    key = _call_key(name, arguments)
    if key in made:
        return False
    made.add(key)
    return True


def _call_key(name: str, arguments: str) -> tuple[str, str]:
    """A call's identity: its name and its arguments as JSON with sorted keys (spacing and order do not count)."""
    try:
        canonical = json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
    except ValueError:
        canonical = arguments.strip()
    return name, canonical
