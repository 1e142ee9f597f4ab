"""How texts are cut and compacted for people and models: one rule each, used by tools, OpenAPI, the terminal and
the notebook. Long tool results keep their head and tail around the same marker the code interpreter writes inside
its kernel (`sandbox.output.omitted_marker`), so the model meets one wording for "something was cut here".
Untrusted text bound for a terminal goes through `visible_controls`, which shows control characters instead of
letting the terminal act on them."""

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


# Controls that terminals act on rather than show, each mapped to a visible stand-in: C0 and DEL in caret notation
# (ESC is `^[`, BEL `^G`, CR `^M`, DEL `^?`), C1 and the bidirectional-text controls as `<U+XXXX>`, lone
# surrogates (which cannot be written as UTF-8) likewise. Newline and tab stay as they are.
_C0_AND_DEL = {code: "^" + chr(code ^ 0x40) for code in (*range(0x20), 0x7F) if code not in (0x09, 0x0A)}
_BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_VISIBLE = {
    **_C0_AND_DEL,
    **{code: f"<U+{code:04X}>" for code in (*range(0x80, 0xA0), *_BIDI_CONTROLS, *range(0xD800, 0xE000))},
}


def visible_controls(text: str) -> str:
    """`text` with every control a terminal would act on shown instead (see `_VISIBLE`), so untrusted text (model
    output, tool results, tool listings) cannot move the cursor, clear the screen, set the clipboard or title, or
    reorder what the user reads. Character by character, so pieces of a stream can be passed one at a time: an
    escape sequence split across pieces is neutralised all the same. CR LF is kept as a line end; any other CR
    (which would let later text overwrite the line) shows as `^M`."""
    return text.replace("\r\n", "\n").translate(_VISIBLE)
