"""How texts are cut and compacted for people and models: one rule each, used by tools, OpenAPI, the terminal and
the notebook. (The code interpreter keeps head *and* tail inside its kernel: see `sandbox.output`.)"""

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


def compact_json(arguments: str) -> str:
    """Call arguments on one line: JSON re-written compactly (non-ASCII kept), anything else with its whitespace
    squashed (arguments still being written, or not JSON, are shown as sent)."""
    try:
        return json.dumps(json.loads(arguments or "{}"), ensure_ascii=False)
    except json.JSONDecodeError:
        return " ".join(arguments.split())
