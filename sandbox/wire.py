"""Jupyter messages as the kernel sends them: signed frames of JSON turned into a dict, assuming a hostile sender.

The kernel holds the session key, so a valid signature proves nothing about the content; it is checked all the
same, as the protocol asks, but only after the signature's own size (jupyter_client's `Session.deserialize` keeps
every signature it sees, of any length, before comparing it). JSON can cost far more to hold than to send, so two
things are bounded before anything is parsed: the number of JSON values (three bytes of `{},` become about seventy
in Python), and the size of a part that is not ASCII (one emoji makes Python store a whole string at four bytes a
character, twice: decoded, then parsed). Large legitimate parts are images, base64 and so ASCII; text the kernel
sends is cut to the output budget first (`kernel_entry.py`). Binary buffers are dropped: nothing here reads them.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from typing import Any

from jupyter_client.session import Session

from .zmtp import Frame

DELIMITER = b"<IDS|MSG>"
MAX_JSON_VALUES = 1_000_000  # about 70 MB of Python objects at worst
_MAX_SIGNATURE = 128  # hex of a SHA-512 HMAC


class MalformedMessage(ValueError):
    """The frames are not a Jupyter message the host can read; the message says why, in words for the model."""


def decode(frames: Sequence[Frame], session: Session, max_unicode_bytes: int) -> dict[str, Any]:
    """The message in `frames` (identities first, then the delimiter) as jupyter_client's dict; header, parent
    header, metadata and content are whatever JSON the kernel sent, for the caller to check. A part larger than
    `max_unicode_bytes` must be ASCII."""
    start = _after_delimiter(frames)
    parts = list(frames[start : start + 5])
    if len(parts) < 5:
        raise MalformedMessage("it has fewer than the five parts of a Jupyter message")
    signature, body = parts[0], parts[1:]
    if len(signature) > _MAX_SIGNATURE or not hmac.compare_digest(bytes(signature), session.sign(body)):
        raise MalformedMessage("its signature does not match")
    if sum(_json_values(part) for part in body) > MAX_JSON_VALUES:
        raise MalformedMessage(f"it holds more than {MAX_JSON_VALUES} JSON values")
    if any(len(part) > max_unicode_bytes and not part.isascii() for part in body):
        raise MalformedMessage(f"a part of more than {max_unicode_bytes} bytes is not ASCII")
    header, parent, metadata, content = (_parse(part) for part in body)
    if not isinstance(header, dict):
        raise MalformedMessage(f"its header is a JSON {_json_type(header)}, not an object")
    return {
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
    }


def _after_delimiter(frames: Sequence[Frame]) -> int:
    for index, frame in enumerate(frames):
        if frame == DELIMITER:
            return index + 1
    raise MalformedMessage("it has no <IDS|MSG> delimiter")


def _json_values(part: Frame) -> int:
    """An upper bound on the values in a JSON text: each one after the first follows a comma or a colon, or opens
    a container (counted inside strings too, which only overestimates)."""
    return 1 + part.count(b",") + part.count(b":") + part.count(b"[") + part.count(b"{")


def _parse(part: Frame) -> Any:
    try:
        return json.loads(part)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"a part is not valid JSON ({type(exc).__name__})") from None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
