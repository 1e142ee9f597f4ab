"""Functions -> tool schemas, and running calls with every fault turned into a message for the model."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import enum
import functools
import json
import threading
from typing import Annotated, Any, Literal, Optional, Union

import pydantic
import pytest
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from functionary_agent import Tool, ToolDefinitionError, tool


def run(tool_: Tool, arguments: Any) -> Any:
    return asyncio.run(tool_.run(arguments))


def props(tool_: Tool) -> dict[str, Any]:
    return tool_.parameters["properties"]


class Unit(enum.Enum):
    CELSIUS = "c"
    FAHRENHEIT = "f"


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(description="City name")
    zip_code: Optional[str] = None


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0


class Options(TypedDict):
    verbose: bool
    depth: int


class TreeNode(pydantic.BaseModel):
    label: str
    children: list[TreeNode] = []


# -- schema ------------------------------------------------------------------------------------------------
def test_weather_example_schema_is_clean_openai_tool() -> None:
    def get_weather(location: str, unit: Literal["c", "f"] = "c") -> dict:
        """Get the current weather.

        Args:
            location: The city and state, e.g. San Francisco, CA
            unit: Temperature unit.
        """
        return {}

    spec = Tool.from_function(get_weather).to_openai()
    assert spec == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "enum": ["c", "f"], "default": "c", "description": "Temperature unit."},
                },
                "required": ["location"],
            },
        },
    }
    assert "title" not in json.dumps(spec)


def test_scalar_container_and_union_types() -> None:
    def f(
        a: int, b: float, c: bool, d: None, e: list[int], f: tuple[int, str], g: set[str], h: dict[str, float],
        i: Optional[int] = None, j: Union[int, str] = 1,
    ) -> None: ...

    p = props(Tool.from_function(f))
    assert p["a"] == {"type": "integer"} and p["b"] == {"type": "number"} and p["c"] == {"type": "boolean"}
    assert p["d"] == {"type": "null"}
    assert p["e"] == {"type": "array", "items": {"type": "integer"}}
    assert p["f"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert p["g"]["uniqueItems"] is True
    assert p["h"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert p["i"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert p["j"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert Tool.from_function(f).parameters["required"] == ["a", "b", "c", "d", "e", "f", "g", "h"]


def test_enum_models_dataclasses_typeddict_are_inlined() -> None:
    def f(unit: Unit, address: Address, point: Point, options: Options) -> None: ...

    params = Tool.from_function(f).parameters
    assert "$defs" not in params and "$ref" not in json.dumps(params)
    p = params["properties"]
    assert p["unit"] == {"type": "string", "enum": ["c", "f"]}
    assert p["address"]["properties"]["city"] == {"type": "string", "description": "City name"}
    assert p["point"]["required"] == ["x"]
    assert set(p["options"]["properties"]) == {"verbose", "depth"}


def test_recursive_model_keeps_defs_and_ref() -> None:
    def f(tree: TreeNode) -> None: ...

    params = Tool.from_function(f).parameters
    assert params["properties"]["tree"]["properties"]["children"]["items"] == {"$ref": "#/$defs/TreeNode"}
    assert "label" in params["$defs"]["TreeNode"]["properties"]
    assert "title" not in json.dumps(params)


def test_property_named_title_survives_title_stripping() -> None:
    def f(title: str, body: str = "") -> None: ...

    assert set(props(Tool.from_function(f))) == {"title", "body"}


def test_annotated_descriptions_win_over_docstring() -> None:
    def f(
        a: Annotated[int, "from annotated"],
        b: Annotated[int, pydantic.Field(description="from field", ge=1)],
        c: int,
    ) -> None:
        """Summary.

        Args:
            a: from docstring a
            b: from docstring b
            c: from docstring c
        """

    p = props(Tool.from_function(f))
    assert p["a"]["description"] == "from annotated"
    assert p["b"] == {"type": "integer", "minimum": 1, "description": "from field"}
    assert p["c"]["description"] == "from docstring c"


@pytest.mark.parametrize(
    "doc",
    [
        "Add numbers.\n\nLonger text.\n\nArgs:\n    x: first number\n    y: second number\n",
        "Add numbers.\n\nLonger text.\n\nParameters\n----------\nx : int\n    first number\n"
        "y : int\n    second number\n",
        "Add numbers.\n\nLonger text.\n\n:param x: first number\n:param y: second number\n",
        "Add numbers.\n\nLonger text.\n\n@param x: first number\n@param y: second number\n",
    ],
    ids=["google", "numpy", "rest", "epydoc"],
)
def test_docstring_styles(doc: str) -> None:
    def add(x: int, y: int) -> int:
        return x + y

    add.__doc__ = doc
    t = Tool.from_function(add)
    assert t.description == "Add numbers.\n\nLonger text."
    assert props(t)["x"]["description"] == "first number"
    assert props(t)["y"]["description"] == "second number"


def test_unannotated_parameter_is_any_json_value() -> None:
    def f(anything, count: int = 0):  # type: ignore[no-untyped-def]
        return anything

    t = Tool.from_function(f)
    assert props(t)["anything"] == {}
    assert run(t, {"anything": {"nested": [1, 2]}}).content == '{"nested":[1,2]}'


def test_parameter_schema_pydantic_model_and_raw_openai_dict() -> None:
    class Search(pydantic.BaseModel):
        query: str = pydantic.Field(description="What to look for")
        limit: int = 10

    def search(query: str, limit: int) -> str:
        return f"{query}:{limit}"

    t = Tool.from_function(search, parameter_schema=Search)
    assert props(t)["query"] == {"type": "string", "description": "What to look for"}
    assert run(t, '{"query": "cats"}').content == "cats:10"

    spec = {"type": "function", "function": {"name": "lookup", "description": "Look up.",
            "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}}}
    raw = Tool.from_openai(spec, lambda key: key.upper())
    assert raw.to_openai() == spec
    assert run(raw, {"key": "abc"}).content == "ABC"
    missing = run(raw, {})
    assert missing.is_error and "key: Field required" in missing.content


@pytest.mark.parametrize("bad_name", ["has space", "dotted.name", "", "x" * 65, "ünïcode"])
def test_invalid_names_are_refused(bad_name: str) -> None:
    def f() -> None: ...

    with pytest.raises(ToolDefinitionError, match="must match"):
        Tool.from_function(f, name=bad_name)


def test_var_args_are_refused_naming_function_and_parameter() -> None:
    def f(a: int, *rest: int) -> None: ...

    def g(**options: Any) -> None: ...

    with pytest.raises(ToolDefinitionError, match=r"f: parameter \*rest"):
        Tool.from_function(f)
    with pytest.raises(ToolDefinitionError, match=r"g: parameter \*\*options"):
        Tool.from_function(g)


def test_annotation_without_json_schema_is_refused_naming_parameter() -> None:
    def f(ok: int, lock: threading.Lock) -> None: ...

    def g(ok: int, callback: Any = None, hook: Optional[type] = None) -> None: ...

    with pytest.raises(ToolDefinitionError, match=r"parameter 'lock'"):
        Tool.from_function(f)
    with pytest.raises(ToolDefinitionError, match=r"parameter 'hook'"):
        Tool.from_function(g)


def test_tool_decorator_keeps_function_callable() -> None:
    @tool
    def double(x: int) -> int:
        """Double it."""
        return 2 * x

    @tool(name="triple_it", timeout=5)
    def triple(x: int) -> int:
        return 3 * x

    assert isinstance(double, Tool) and double(4) == 8 and double.__doc__ == "Double it."
    assert triple.name == "triple_it" and triple.timeout == 5 and triple(2) == 6


# -- running -----------------------------------------------------------------------------------------------
def test_arguments_are_converted_to_real_python_types() -> None:
    seen: dict[str, Any] = {}

    def f(when: datetime.date, unit: Unit, address: Address, point: Point, tags: set[str]) -> str:
        seen.update(when=when, unit=unit, address=address, point=point, tags=tags)
        return "ok"

    arguments = {"when": "2024-03-01", "unit": "f", "address": {"city": "Hanoi"}, "point": {"x": 1}, "tags": ["a"]}
    assert run(Tool.from_function(f), json.dumps(arguments)).content == "ok"
    assert seen["when"] == datetime.date(2024, 3, 1)
    assert seen["unit"] is Unit.FAHRENHEIT
    assert isinstance(seen["address"], Address) and seen["address"].city == "Hanoi"
    assert seen["point"] == Point(1.0, 0.0)
    assert seen["tags"] == {"a"}


def test_positional_only_and_reserved_looking_names() -> None:
    def f(json: str, model_config: int, /, _private: int = 1) -> str:
        return f"{json}-{model_config}-{_private}"

    t = Tool.from_function(f)
    assert set(props(t)) == {"json", "model_config", "_private"}
    assert run(t, {"json": "a", "model_config": 2, "_private": 3}).content == "a-2-3"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"location": "Ist', "not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('"text"', "must be a JSON object, got str"),
    ],
)
def test_bad_json_becomes_an_error_message(arguments: str, expected: str) -> None:
    def f(location: str) -> str:
        return location

    outcome = run(Tool.from_function(f), arguments)
    assert outcome.is_error and outcome.content.startswith("Error: ") and expected in outcome.content


def test_validation_errors_list_every_field() -> None:
    def f(location: str, unit: Literal["c", "f"] = "c", days: int = 1) -> str:
        return location

    outcome = run(Tool.from_function(f), {"unit": "k", "days": "many", "color": "red"})
    assert outcome.is_error
    lines = outcome.content.splitlines()
    assert lines[0] == "Error: invalid arguments for f:"
    assert any(line.startswith("- location: Field required") for line in lines)
    assert any(line.startswith("- unit: Input should be 'c' or 'f'") and '"k"' in line for line in lines)
    assert any(line.startswith("- days:") and "integer" in line for line in lines)
    assert any(line.startswith("- color: Extra inputs are not permitted") for line in lines)


def test_empty_or_missing_arguments_mean_no_arguments() -> None:
    def now() -> str:
        return "noon"

    assert run(Tool.from_function(now), "").content == "noon"
    assert run(Tool.from_function(now), None).content == "noon"


def test_tool_exception_becomes_type_and_message() -> None:
    def explode(x: int) -> None:
        raise ValueError(f"bad x {x}")

    outcome = run(Tool.from_function(explode), {"x": 3})
    assert outcome.is_error and outcome.content == "Error: explode raised ValueError: bad x 3"


def test_timeouts_for_async_and_sync_tools() -> None:
    async def slow_async() -> str:
        await asyncio.sleep(5)
        return "late"

    def slow_sync() -> str:
        threading.Event().wait(1)
        return "late"

    for fn in (slow_async, slow_sync):
        outcome = run(Tool.from_function(fn, timeout=0.1), {})
        assert outcome.is_error and outcome.content == f"Error: {fn.__name__} timed out after 0.1 s"
        assert outcome.duration < 0.9


def test_a_timeout_error_raised_by_the_tool_is_not_called_a_timeout() -> None:
    async def f() -> None:
        raise TimeoutError("upstream took too long")

    outcome = run(Tool.from_function(f, timeout=5), {})
    assert outcome.content == "Error: f raised TimeoutError: upstream took too long"


def test_results_are_serialised_for_the_model() -> None:
    class Report:
        def _repr_llm_(self) -> str:
            return "a report for the model"

    class Opaque:
        def __str__(self) -> str:
            return "opaque thing"

    cases: list[tuple[Any, str]] = [
        ("plain text", "plain text"),
        ({"city": "İstanbul", "temp": 21.5}, '{"city":"İstanbul","temp":21.5}'),
        ([1, None, True], "[1,null,true]"),
        (Address(city="Hà Nội"), '{"city":"Hà Nội","zip_code":null}'),
        (Point(1, 2), '{"x":1,"y":2}'),
        (datetime.date(2024, 1, 2), '"2024-01-02"'),
        (Report(), "a report for the model"),
        (Opaque(), "opaque thing"),
    ]
    for value, expected in cases:
        assert run(Tool.from_function(_returning(value), name="f"), {}).content == expected


def _returning(value: Any) -> Any:
    return lambda: value


def test_sync_tools_run_off_the_event_loop() -> None:
    loop_threads: list[bool] = []

    def where() -> str:
        try:
            asyncio.get_running_loop()
            loop_threads.append(True)
        except RuntimeError:
            loop_threads.append(False)
        return threading.current_thread().name

    assert run(Tool.from_function(where), {}).content.startswith("functionary-tool")
    assert loop_threads == [False]


def test_async_callable_object_and_partial_are_awaited() -> None:
    class Fetch:
        __name__ = "fetch"

        async def __call__(self, url: str) -> str:
            await asyncio.sleep(0)
            return f"fetched {url}"

    assert run(Tool.from_function(Fetch()), {"url": "x"}).content == "fetched x"

    async def greet(greeting: str, name: str) -> str:
        return f"{greeting}, {name}"

    hello = Tool.from_function(functools.partial(greet, "hello"), name="hello")
    assert list(props(hello)) == ["name"]
    assert run(hello, {"name": "Ada"}).content == "hello, Ada"


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST_ID", default="unset")


def test_sync_tools_see_the_callers_context_variables() -> None:
    def which_request() -> str:
        return REQUEST_ID.get()

    async def caller() -> str:
        REQUEST_ID.set("req-42")
        return (await Tool.from_function(which_request).run({})).content

    assert asyncio.run(caller()) == "req-42"


def test_a_sync_tool_raising_stop_iteration_is_reported_not_lost() -> None:
    def drained() -> str:
        raise StopIteration("nothing left")

    outcome = run(Tool.from_function(drained, timeout=2), {})
    assert outcome.is_error and outcome.content == "Error: drained raised RuntimeError: StopIteration: nothing left"
