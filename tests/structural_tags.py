"""A reference reading of the structural tags we send to vLLM: does a tag accept a given output?

xgrammar compiles these tags against a tokenizer; the tests only need their meaning on text, which is small:
constant strings, free text that avoids excluded strings, one JSON value, sequences, choices and repetitions.
JSON values are checked for shape (any JSON), not against their schema.
"""

from __future__ import annotations

import json
from typing import Any

Node = dict[str, Any]


def accepts(tag: Node, text: str) -> bool:
    """True when the whole of `text` is one way through the tag."""
    return len(text) in _Reader(text).ends(tag["format"], 0)


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[tuple[int, int], frozenset[int]] = {}

    def ends(self, node: Node, start: int) -> frozenset[int]:
        """Every position where `node` can end when it starts at `start`."""
        key = (id(node), start)
        if key not in self.memo:
            self.memo[key] = frozenset(self._ends(node, start))
        return self.memo[key]

    def _ends(self, node: Node, start: int) -> set[int]:
        kind = node["type"]
        if kind == "const_string":
            return {start + len(node["value"])} if self.text.startswith(node["value"], start) else set()
        if kind == "any_text":
            return self._free_text(start, node.get("excludes", []))
        if kind == "json_schema":
            return self._json(start)
        if kind == "sequence":
            return self._sequence(node["elements"], {start})
        if kind == "or":
            return set().union(*(self.ends(element, start) for element in node["elements"]))
        if kind == "star":
            return self._repeat(node["content"], start, 0, None)
        if kind == "repeat":
            return self._repeat(node["content"], start, node["min"], node["max"])
        raise ValueError(f"unknown structural tag node {kind!r}")

    def _free_text(self, start: int, excludes: list[str]) -> set[int]:
        ends = set()
        for end in range(start, len(self.text) + 1):
            if any(marker in self.text[start:end] for marker in excludes):
                break
            ends.add(end)
        return ends

    def _json(self, start: int) -> set[int]:
        try:
            _, end = json.JSONDecoder().raw_decode(self.text, start)
        except ValueError:
            return set()
        return {end}

    def _sequence(self, elements: list[Node], positions: set[int]) -> set[int]:
        for element in elements:
            positions = set().union(*(self.ends(element, p) for p in positions)) if positions else set()
        return positions

    def _repeat(self, content: Node, start: int, least: int, most: int | None) -> set[int]:
        reached, frontier, count = ({start} if least == 0 else set()), {start}, 0
        while frontier and (most is None or count < most):
            count += 1
            frontier = set().union(*(self.ends(content, p) for p in frontier)) - ({start} if count > 1 else set())
            if count >= least:
                new = frontier - reached
                reached |= frontier
                if most is None and not new:
                    break
        return reached
