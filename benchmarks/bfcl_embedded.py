"""BFCL v3 "simple" with the embedded engine, steering on and off, vs llama-cpp-python's `chatml-function-calling`.

    python benchmarks/bfcl_embedded.py [--limit N] [--tool-choice auto|required] [--skip-anchor] [--show-failures]
                                       [--set KEY=VALUE ...]

The file is a dev set to measure on, never a source of rules or tests; report the whole set (`--limit` is for
quick looks only), with the ablation (`steer=False`) beside it, all from one run.

Both run the bundled SmolLM2-135M-Instruct GGUF on the same CPU threads, greedy. Scoring follows the data's README
(BFCL's AST checker for single calls): one call to the right function (dots in names become "_"), every required
parameter present, no unknown parameter, each value among the acceptable ones (strings compared case-insensitively
without spaces and , . / - _ * ^; an int is accepted for a float; "" means the parameter may be left out).
Prints one line per measure, `name: value (ratio vs the handler)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from functionary_agent.models.embedded import EmbeddedModel, default_model_path  # noqa: E402

DATA = ROOT.parent / "shared" / "fixtures" / "bfcl"
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}
_STRIP = re.compile(r"[ ,./\-_*^]")

Call = tuple[str, Any]  # (name, arguments: a dict, or the raw text when it is not a JSON object)


def load_items(limit: int | None) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in (DATA / "BFCL_v3_simple.json").read_text().splitlines() if line.strip()]
    answers = {
        entry["id"]: entry["ground_truth"]
        for entry in map(json.loads, (DATA / "possible_answer" / "BFCL_v3_simple.json").read_text().splitlines())
    }
    for item in items:
        item["answer"] = answers[item["id"]]
    return items[:limit] if limit else items


def openai_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BFCL's dialect -> OpenAI tools, the way BFCL itself converts it."""

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(item) for item in node]
        if not isinstance(node, dict):
            return node
        fixed = {key: fix(value) for key, value in node.items()}
        if isinstance(fixed.get("type"), str):
            fixed["type"] = _TYPES.get(fixed["type"], fixed["type"])
        return fixed

    return [
        {
            "type": "function",
            "function": {
                "name": function["name"].replace(".", "_"),
                "description": function.get("description", ""),
                "parameters": fix(function["parameters"]),
            },
        }
        for function in functions
    ]


# -- scoring ----------------------------------------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        return _STRIP.sub("", value).lower().replace("'", '"')
    if isinstance(value, list):
        return [_norm(item) for item in value]
    return value


def _type_ok(value: Any, kind: str | None) -> bool:
    checks: dict[str, Callable[[Any], bool]] = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "tuple": lambda v: isinstance(v, list),
        "dict": lambda v: isinstance(v, dict),
    }
    return checks.get(kind or "", lambda v: True)(value)


def _value_ok(value: Any, accepted: list[Any]) -> bool:
    for option in accepted:
        if option == "":
            continue
        if isinstance(option, dict) and isinstance(value, dict):
            if all(key in option or False for key in value) and all(
                (key in value and _value_ok(value[key], opts)) or (key not in value and "" in opts)
                for key, opts in option.items()
            ):
                return True
        elif isinstance(option, list) and isinstance(value, list):
            if len(option) == len(value) and all(_value_ok(v, [o]) for v, o in zip(value, option, strict=False)):
                return True
        elif isinstance(option, float) and isinstance(value, int) and not isinstance(value, bool):
            if float(value) == option:
                return True
        elif _norm(value) == _norm(option) and type(value) is type(option):
            return True
    return False


def score(calls: list[Call], item: dict[str, Any]) -> bool:
    """BFCL's simple-call check."""
    if len(calls) != 1 or not isinstance(calls[0][1], dict):
        return False
    name, arguments = calls[0]
    (expected_name, accepted), = item["answer"][0].items()
    function = item["function"][0]
    if name != expected_name.replace(".", "_"):
        return False
    properties = function["parameters"].get("properties", {})
    if any(key not in properties or key not in accepted for key in arguments):
        return False
    if any(key not in arguments for key in function["parameters"].get("required", [])):
        return False
    for key, options in accepted.items():
        if key not in arguments:
            if "" not in options:
                return False
        elif not _type_ok(arguments[key], properties[key].get("type")) or not _value_ok(arguments[key], options):
            return False
    return True


def _parsed(name: str, arguments: str | None) -> Call:
    try:
        value = json.loads(arguments or "")
    except ValueError:
        return name, arguments
    return name, value


# -- engines ----------------------------------------------------------------------------------------------------------


def ours(model: EmbeddedModel, tool_choice: str, steer: bool) -> Callable[[dict[str, Any]], list[Call]]:
    def ask(item: dict[str, Any]) -> list[Call]:
        message = model.complete(item["question"][0], tools=openai_tools(item["function"]), tool_choice=tool_choice,
                                 steer=steer)
        return [_parsed(call.name, call.arguments) for call in message.tool_calls]

    return ask


def handler(threads: int) -> Callable[[dict[str, Any]], list[Call]]:
    from llama_cpp import Llama

    llama = Llama(str(default_model_path()), chat_format="chatml-function-calling", n_ctx=4096, n_threads=threads,
                  n_threads_batch=threads, verbose=False, seed=0)

    def ask(item: dict[str, Any]) -> list[Call]:
        try:
            response: Any = llama.create_chat_completion(
                item["question"][0], tools=openai_tools(item["function"]), tool_choice="auto", temperature=0.0,
                max_tokens=256,
            )
        except ValueError:  # its prompt and max_tokens do not fit the context: no answer, scored as a miss
            return []
        calls = response["choices"][0]["message"].get("tool_calls") or []
        return [_parsed(call["function"]["name"], call["function"]["arguments"]) for call in calls]

    return ask


def run(
    ask: Callable[[dict[str, Any]], list[Call]], items: list[dict[str, Any]], show: bool
) -> Iterator[tuple[bool, float]]:
    for item in items:
        start = time.perf_counter()
        calls = ask(item)
        elapsed = time.perf_counter() - start
        ok = score(calls, item)
        if show and not ok:
            question = item["question"][0][-1]["content"][:90]
            print(f"  {item['id']}: {question!r}\n    got {calls}\n    want {item['answer']}")
        yield ok, elapsed


def measure(
    ask: Callable[[dict[str, Any]], list[Call]], items: list[dict[str, Any]], show: bool = False
) -> tuple[float, float]:
    results = list(run(ask, items, show))
    return 100 * sum(ok for ok, _ in results) / len(results), sum(t for _, t in results) / len(results)


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only the first N items (default: all 400)")
    parser.add_argument("--tool-choice", default="auto", choices=["auto", "required"])
    parser.add_argument("--skip-anchor", action="store_true", help="do not run the chatml-function-calling handler")
    parser.add_argument("--show-failures", action="store_true", help="print each item our engine gets wrong")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EmbeddedModel setting for our engine, e.g. --set copy_bias=2 (numbers as JSON)")
    args = parser.parse_args()
    items = load_items(args.limit)
    model = EmbeddedModel(**dict(_setting(text) for text in args.set)).load()
    results = {steer: measure(ours(model, args.tool_choice, steer), items, args.show_failures and steer)
               for steer in (True, False)}
    anchor = None if args.skip_anchor else measure(handler(model.n_threads), items)
    for steer, (accuracy, seconds) in results.items():
        label = f"embedded steer {'on' if steer else 'off'}, tool_choice {args.tool_choice}, {len(items)} items"
        if anchor is None:
            print(f"bfcl simple accuracy ({label}): {accuracy:.1f} %")
            print(f"bfcl simple seconds per item ({label}): {seconds:.2f} s")
            continue
        ratio = f"{accuracy / anchor[0]:.1f}x" if anchor[0] else "handler scored 0"
        print(f"bfcl simple accuracy ({label}): {accuracy:.1f} % ({ratio} chatml-function-calling's {anchor[0]:.1f} %)")
        print(f"bfcl simple seconds per item ({label}): {seconds:.2f} s "
              f"({seconds / anchor[1]:.2f}x chatml-function-calling's {anchor[1]:.2f} s)")


if __name__ == "__main__":
    main()
