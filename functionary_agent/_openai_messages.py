"""Small facts about OpenAI chat messages that formats, engines, the code interpreter and the displays all need.

Stdlib only and imported by `formats` (which otherwise imports nothing of ours but the schema helpers), so each
fact has one home: a call id, the text of a message's content, the code of a python call.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any


def new_call_id() -> str:
    """An OpenAI-style call id, for servers and formats that send none."""
    return "call_" + secrets.token_hex(12)


def message_text(content: Any, separator: str = "", *, name_other_parts: bool = False) -> str:
    """Message content as text: None is empty, a string is itself, a list of parts keeps its text parts (joined
    by `separator`; with `name_other_parts` an image or audio part shows as "[image_url]")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type", "text") == "text":
                pieces.append(str(part.get("text", "")))
            elif name_other_parts:
                pieces.append(f"[{part.get('type', 'part')}]")
        return separator.join(pieces)
    return str(content)


def code_of(arguments: str | Mapping[str, Any] | None) -> str:
    """The code of a python call: our messages carry `{"code": ...}` (JSON text or a dict; an object without a
    string `code` holds none); a JSON string is its value; anything else (raw code, as in upstream data, even code
    that happens to be JSON such as `42`) is itself."""
    if isinstance(arguments, Mapping):
        return str(arguments.get("code", ""))
    text = arguments or ""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict):
        return value["code"] if isinstance(value.get("code"), str) else ""
    return value if isinstance(value, str) else text
