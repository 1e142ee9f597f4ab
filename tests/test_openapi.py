"""OpenAPI operations as tools, against a real FastAPI app on loopback that serves its own document.

`tests/servers/openapi_app.py` is the service; hand-written documents point at its `/echo/...` route to check how
each kind of parameter and body goes over the wire.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("yaml")

import jsonschema
import yaml

from functionary_agent import ConfigurationError, Conversation, _sync
from functionary_agent.integrations.openapi import OpenAPITools, openapi_tools
from functionary_agent.testing import ScriptedModel, call
from functionary_agent.tools import Tool, ToolOutcome
from tests.servers.openapi_app import serve

ECHO_SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Echo", "version": "1"},
    "servers": [{"url": "{scheme}://example.invalid/v1", "variables": {"scheme": {"default": "https"}}}],
    "paths": {
        "/files/{path}": {
            "parameters": [{"$ref": "#/components/parameters/Trace"}],
            "get": {
                "operationId": "files.get/by path",
                "summary": "Read a file",
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}, "description": "P"},
                    {"name": "ids", "in": "query", "explode": False, "schema": {"type": "array", "items": {}}},
                    {"name": "filter", "in": "query", "style": "deepObject", "schema": {"type": "object"}},
                    {"name": "recursive", "in": "query", "schema": {"type": "boolean"}},
                    {"name": "meta", "in": "query", "content": {"application/json": {"schema": {"type": "object"}}}},
                    {"name": "session", "in": "cookie", "schema": {"type": "string"}},
                    {"name": "Authorization", "in": "header", "schema": {"type": "string"}},
                ],
            },
        },
        "/pets": {
            "post": {"requestBody": {"$ref": "#/components/requestBodies/PetList"}},
            "put": {
                "operationId": "update_pet",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pet"}}},
                },
            },
        },
        "/form": {
            "post": {
                "operationId": "send_form",
                "requestBody": {
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {"type": "object", "properties": {"a": {"type": "string"}}}
                        }
                    }
                },
            }
        },
        "/upload": {
            "post": {
                "operationId": "upload",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object"}}}},
            }
        },
        "/remote": {
            "get": {
                "operationId": "remote_ref",
                "parameters": [{"name": "q", "in": "query", "schema": {"$ref": "https://example.com/s.json#/Q"}}],
            }
        },
    },
    "components": {
        "parameters": {"Trace": {"name": "X-Trace", "in": "header", "schema": {"type": "string"}}},
        "requestBodies": {
            "PetList": {
                "content": {
                    "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Pet"}}}
                }
            }
        },
        "schemas": {
            "Pet": {
                "type": "object",
                "title": "Pet",
                "required": ["id", "name"],
                "properties": {
                    "id": {"type": "integer", "readOnly": True},
                    "name": {"type": "string"},
                    "title": {"type": "string", "description": "a property that happens to be called title"},
                    "nickname": {"type": "string", "nullable": True},
                    "owner": {"$ref": "#/components/schemas/Owner"},
                },
            },
            "Owner": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    },
}


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve() as url:
        yield url


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


def run_calls(spec: Any, calls: list[tuple[str, dict[str, Any]]], **options: Any) -> list[ToolOutcome]:
    async def main() -> list[ToolOutcome]:
        async with await openapi_tools(spec, **options) as api:
            tools = by_name(api.tools)
            return [await tools[name].run(arguments) for name, arguments in calls]

    return asyncio.run(main())


def echoed(outcome: ToolOutcome) -> dict[str, Any]:
    assert not outcome.is_error, outcome.content
    return json.loads(outcome.content)


# -- the FastAPI app's own document ----------------------------------------------------------------------------
def test_every_operation_of_a_served_document_becomes_a_tool(base: str) -> None:
    async def main() -> OpenAPITools:
        async with await openapi_tools(f"{base}/openapi.json") as api:
            return api

    api = asyncio.run(main())
    assert api.base_url == base  # the document names no server: its own origin
    tools = by_name(api.tools)
    assert set(tools) == {"create_item", "get_item", "list_items", "delete_item", "read_secret", "tree_size", "fail"}
    get_item = tools["get_item"].to_openai()["function"]
    assert get_item["description"] == "One item by id"
    assert get_item["parameters"] == {
        "type": "object",
        "properties": {
            "item_id": {"type": "integer"},
            "currency": {"enum": ["EUR", "USD"], "type": "string", "default": "EUR"},
        },
        "required": ["item_id"],
    }
    create = tools["create_item"].parameters
    assert set(create["properties"]) == {"x-request-id", "name", "price", "tags", "size"}  # the body sits flat
    assert create["required"] == ["name", "price"]
    assert create["properties"]["name"]["description"] == "What the item is called"
    assert create["properties"]["size"]["anyOf"][0]["properties"]["width"] == {"type": "number"}  # $ref inlined
    assert "#/components" not in json.dumps([t.parameters for t in api.tools])


def test_path_query_header_and_body_round_trip(base: str) -> None:
    item = {"name": "lamp", "price": 10, "tags": ["home", "light"], "size": {"width": 1, "height": 2}}
    created, = run_calls(f"{base}/openapi.json", [("create_item", {**item, "x-request-id": "req-7"})])
    stored = echoed(created)
    assert stored["request_id"] == "req-7" and stored["size"] == {"width": 1.0, "height": 2.0}
    got, listed, listed_none, deleted, gone = run_calls(f"{base}/openapi.json", [
        ("get_item", {"item_id": stored["id"], "currency": "USD"}),
        ("list_items", {"tag": ["home", "light"]}),
        ("list_items", {"tag": ["home", "garden"]}),
        ("delete_item", {"item_id": stored["id"]}),
        ("get_item", {"item_id": stored["id"]}),
    ])
    assert echoed(got)["price"] == 11.0 and echoed(got)["currency"] == "USD"
    assert "lamp" in echoed(listed) and "lamp" not in echoed(listed_none)
    assert (deleted.content, deleted.is_error) == ("HTTP 204 No Content", False)
    assert gone.is_error


def test_http_errors_reach_the_model_with_status_and_trimmed_body(base: str) -> None:
    missing, invalid, failed = run_calls(f"{base}/openapi.json", [
        ("get_item", {"item_id": 987654}),
        ("create_item", {"name": "free lunch", "price": -1}),
        ("fail", {}),
    ])
    assert missing.is_error
    assert missing.content == (
        f"Error: get_item raised HTTPCallError: GET {base}/items/987654 returned HTTP 404 Not Found: "
        '{"detail":"Item 987654 not found"}'
    )
    assert invalid.is_error and "HTTP 422" in invalid.content and "greater than 0" in invalid.content
    assert failed.is_error and "HTTP 500 Internal Server Error" in failed.content
    assert len(failed.content) < 1300 and "more characters not shown" in failed.content  # the body was 22,000


def test_network_errors_are_tool_errors(base: str) -> None:
    with urllib.request.urlopen(f"{base}/openapi.json") as response:
        document = json.load(response)
    outcome, = run_calls(document, [("get_item", {"item_id": 1})], base_url="http://127.0.0.1:9")
    assert outcome.is_error
    assert outcome.content.startswith("Error: get_item raised HTTPCallError: GET http://127.0.0.1:9/items/1 failed:")
    assert "ConnectError" in outcome.content


def test_headers_go_with_every_request(base: str) -> None:
    refused, = run_calls(f"{base}/openapi.json", [("read_secret", {})])
    allowed, = run_calls(f"{base}/openapi.json", [("read_secret", {})], headers={"Authorization": "Bearer letmein"})
    assert refused.is_error and "HTTP 401" in refused.content
    assert echoed(allowed) == {"secret": 42}


def test_recursive_schemas_stay_in_defs_and_validate(base: str) -> None:
    tree = {"label": "root", "children": [{"label": "a", "children": [{"label": "b"}]}, {"label": "c"}]}

    async def main() -> tuple[dict[str, Any], ToolOutcome]:
        async with await openapi_tools(f"{base}/openapi.json", include=["tree_size"]) as api:
            tool, = api.tools
            return tool.parameters, await tool.run(tree)

    schema, outcome = asyncio.run(main())
    assert set(schema["$defs"]) == {"Node"}
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    jsonschema.validate(tree, schema)  # the references resolve inside the tool's own schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"label": "x", "children": [{"children": []}]}, schema)
    assert outcome.content == "4"


def test_include_keeps_only_the_named_operations(base: str) -> None:
    async def names(include: Any) -> list[str]:
        async with await openapi_tools(f"{base}/openapi.json", include=include) as api:
            return sorted(t.name for t in api.tools)

    assert asyncio.run(names(["get_item", "list_items"])) == ["get_item", "list_items"]
    assert asyncio.run(names("fail")) == ["fail"]
    assert asyncio.run(names(lambda op_id: op_id.endswith("_item"))) == ["create_item", "delete_item", "get_item"]
    with pytest.raises(ConfigurationError, match=r"unknown operations \['get_itme'\].*'get_item'"):
        asyncio.run(names(["get_itme"]))


def test_a_conversation_calls_the_service(base: str) -> None:
    model = ScriptedModel([
        {"tool_calls": [call("create_item", {"name": "kettle", "price": 30})]},
        {"tool_calls": [call("list_items", {"limit": 100})]},
        "The shop has a kettle.",
    ])

    async def main() -> str:
        async with await openapi_tools(f"{base}/openapi.json") as api:
            return await Conversation(model, tools=api.tools).asubmit("Add a kettle for 30 and list the items.")

    assert asyncio.run(main()) == "The shop has a kettle."
    created, listed = [m["content"] for m in model.requests[2].messages if m["role"] == "tool"]
    assert json.loads(created)["name"] == "kettle" and "kettle" in json.loads(listed)
    assert model.requests[0].tools[0]["function"]["name"] in {"create_item", "list_items"}


def test_tools_work_from_another_event_loop_and_after_their_loop_ends(base: str) -> None:
    api = _sync.run(openapi_tools(f"{base}/openapi.json", include=["read_secret"], headers={
        "Authorization": "Bearer letmein"
    }))
    tool, = api.tools
    assert asyncio.run(tool.run({})).content == '{"secret":42}'  # handed to the loop that owns the client
    _sync.run(api.aclose())

    api = asyncio.run(openapi_tools(f"{base}/openapi.json", include=["read_secret"], headers={
        "Authorization": "Bearer letmein"
    }))
    tool, = api.tools
    assert asyncio.run(tool.run({})).content == '{"secret":42}'  # the first loop is closed: a new client
    asyncio.run(api.aclose())
    closed = asyncio.run(tool.run({}))
    assert closed.is_error and "were closed" in closed.content


# -- hand-written documents against /echo ---------------------------------------------------------------------
def test_parameter_styles_go_over_the_wire_as_openapi_says(base: str) -> None:
    arguments = {
        "path": "a/b c", "ids": [1, 2], "filter": {"kind": "txt"}, "recursive": True, "meta": {"x": 1},
        "session": "s 1", "X-Trace": "t-1",
    }
    full, dots = run_calls(ECHO_SPEC, [
        ("files_get_by_path", arguments),
        ("files_get_by_path", {"path": ".."}),
    ], base_url=f"{base}/echo/")
    request = echoed(full)
    assert request["raw_path"] == "/echo/files/a%2Fb%20c"
    assert parse_qsl(request["query"]) == [
        ("ids", "1,2"), ("filter[kind]", "txt"), ("recursive", "true"), ("meta", '{"x":1}')
    ]
    assert request["headers"] == {"x-trace": "t-1", "cookie": "session=s%201"}
    assert echoed(dots)["raw_path"] == "/echo/files/%2E%2E"  # a value cannot climb out of its path


def test_bodies_refs_and_openapi_30_quirks(base: str) -> None:
    async def main() -> tuple[dict[str, Tool], list[ToolOutcome]]:
        async with await openapi_tools(ECHO_SPEC, base_url=f"{base}/echo") as api:
            tools = by_name(api.tools)
            return tools, [
                await tools["post_pets"].run({"body": [{"name": "Rex"}]}),
                await tools["update_pet"].run({"name": "Rex", "nickname": None, "owner": {"name": "Ann"}}),
                await tools["send_form"].run({"a": "x y"}),
                await tools["update_pet"].run({"name": "Rex", "colour": "brown"}),
                await tools["files_get_by_path"].run({"path": "p", "colour": "brown"}),
            ]

    tools, (posted, updated, form, extra, unknown) = asyncio.run(main())
    assert "upload" not in tools  # a required multipart body cannot be sent as JSON: skipped with a warning
    pet = tools["update_pet"].parameters
    assert set(pet["properties"]) == {"name", "title", "nickname", "owner"}  # readOnly `id` is not sent
    assert pet["required"] == ["name"]
    assert pet["properties"]["nickname"] == {"type": ["string", "null"]}
    assert pet["properties"]["owner"] == {"type": "object", "properties": {"name": {"type": "string"}}}
    assert tools["post_pets"].parameters["properties"]["body"]["items"]["properties"]["name"] == {"type": "string"}
    assert "(a value described by https://example.com/s.json#/Q" in json.dumps(tools["remote_ref"].parameters)
    files = tools["files_get_by_path"].parameters
    assert "Authorization" not in files["properties"] and files["required"] == ["path"]
    assert files["properties"]["path"]["description"] == "P"
    assert json.loads(echoed(posted)["body"]) == [{"name": "Rex"}]
    assert json.loads(echoed(updated)["body"]) == {"name": "Rex", "nickname": None, "owner": {"name": "Ann"}}
    assert (echoed(form)["content_type"], echoed(form)["body"]) == ("application/x-www-form-urlencoded", "a=x+y")
    assert json.loads(echoed(extra)["body"])["colour"] == "brown"  # an open object body takes extra properties
    assert unknown.is_error and "unknown argument(s) colour" in unknown.content


def test_yaml_file_and_its_servers(tmp_path: Path, base: str) -> None:
    path = tmp_path / "echo.yaml"
    path.write_text(yaml.safe_dump(ECHO_SPEC), encoding="utf-8")

    async def main() -> tuple[str | None, str]:
        async with await openapi_tools(path, include=["update_pet"]) as api:
            default = api.base_url
        async with await openapi_tools(str(path), base_url=f"{base}/echo", include=["update_pet"]) as api:
            return default, (await api.tools[0].run({"name": "Rex"})).content

    default, content = asyncio.run(main())
    assert default == "https://example.invalid/v1"  # server variables take their defaults
    assert json.loads(json.loads(content)["body"]) == {"name": "Rex"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"swagger": "2.0", "paths": {}}, "Swagger 2.0; only OpenAPI 3.x"),
        ({"openapi": "3.1.0", "servers": [{"url": "/api"}], "paths": {"/a": {"get": {}}}}, "relative.*base_url="),
        (
            {"openapi": "3.1.0", "servers": [{"url": "http://x"}], "paths": {"/a": {"get": {"parameters": [
                {"$ref": "#/components/parameters/nope"}
            ]}}}},
            "'#/components/parameters/nope' points to nothing",
        ),
        ("/no/such/openapi.yaml", "is not a file"),
    ],
)
def test_documents_that_cannot_work_are_configuration_errors(spec: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        asyncio.run(openapi_tools(spec))


def test_an_unreachable_document_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="could not fetch the OpenAPI document"):
        asyncio.run(openapi_tools("http://127.0.0.1:9/openapi.json"))
