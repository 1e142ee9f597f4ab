"""How texts are cut and compacted for people and models: one rule each, used by tools, OpenAPI, the terminal and
the notebook. Long tool results keep their head and tail around the same marker the code interpreter writes inside
its kernel (`sandbox.output.omitted_marker`), so the model meets one wording for "something was cut here"."""

from __future__ import annotations

import json


def shorten(text: str, limit: int) -> str:
    """At most `limit` characters, ending in "…" when cut: for one-line previews."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: str, limit: int) -> str:
    """The first `limit` characters and how many more there were: for bodies a reader may need to know are partial."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters not shown]"


def omitted_marker(count: int) -> str:
    """The line that stands where a result was cut; word for word the code interpreter's (a test holds them equal)."""
    return f"\n… {count} characters omitted …\n"


def head_and_tail(text: str, limit: int) -> str:
    """At most about `limit` characters: the first and last halves, with the marker saying how much was cut."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return text[:head] + omitted_marker(len(text) - limit) + text[len(text) - tail :]


def compact_json(arguments: str) -> str:
    """Call arguments on one line: JSON re-written compactly (non-ASCII kept), anything else with its whitespace
    squashed (arguments still being written, or not JSON, are shown as sent)."""
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False)
    except json.JSONDecodeError:
        return " ".join(arguments.split())
