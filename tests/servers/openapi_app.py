"""A small FastAPI shop that serves its own OpenAPI document at /openapi.json, for tests/test_openapi.py.

`serve()` runs it under uvicorn on a free loopback port in a background thread. `/echo/...` (not in the document)
answers with what it received, so tests can check how hand-written operations serialise their arguments.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Literal, Optional

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

app = FastAPI(title="Shop", version="1.0")
_ids = itertools.count(1)
ITEMS: dict[int, dict] = {}


class Size(BaseModel):
    width: float
    height: float


class ItemIn(BaseModel):
    name: str = Field(description="What the item is called")
    price: float = Field(gt=0)
    tags: list[str] = []
    size: Optional[Size] = None


class Item(ItemIn):
    id: int
    request_id: Optional[str] = None


class Node(BaseModel):
    label: str
    children: list[Node] = []


@app.post("/items", status_code=201, operation_id="create_item", summary="Add an item to the shop")
def create_item(item: ItemIn, x_request_id: Annotated[Optional[str], Header()] = None) -> Item:
    stored = Item(id=next(_ids), request_id=x_request_id, **item.model_dump())
    ITEMS[stored.id] = stored.model_dump()
    return stored


@app.get("/items/{item_id}", operation_id="get_item", summary="One item by id")
def get_item(item_id: int, currency: Literal["EUR", "USD"] = "EUR") -> dict:
    if item_id not in ITEMS:
        raise HTTPException(404, detail=f"Item {item_id} not found")
    item = ITEMS[item_id]
    price = item["price"] if currency == "EUR" else round(item["price"] * 1.1, 2)
    return {**item, "price": price, "currency": currency}


@app.get("/items", operation_id="list_items", summary="Items that carry all of the given tags")
def list_items(tag: Annotated[list[str], Query()] = [], limit: int = 10) -> list[str]:  # noqa: B006 - FastAPI idiom
    names = [item["name"] for item in ITEMS.values() if set(tag) <= set(item["tags"])]
    return sorted(names)[:limit]


@app.delete("/items/{item_id}", status_code=204, operation_id="delete_item")
def delete_item(item_id: int) -> Response:
    ITEMS.pop(item_id, None)
    return Response(status_code=204)


@app.get("/secret", operation_id="read_secret")
def read_secret(authorization: Annotated[Optional[str], Header()] = None) -> dict:
    if authorization != "Bearer letmein":
        raise HTTPException(401, detail="a bearer token is needed")
    return {"secret": 42}


@app.post("/tree/size", operation_id="tree_size", summary="How many nodes a tree has")
def tree_size(node: Node) -> int:
    return 1 + sum(tree_size(child) for child in node.children)


@app.get("/fail", operation_id="fail")
def fail() -> PlainTextResponse:
    return PlainTextResponse("trace line\n" * 2000, status_code=500)


@app.api_route("/echo/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def echo(request: Request) -> dict:
    body = await request.body()
    return {
        "method": request.method,
        "raw_path": request.scope["raw_path"].decode(),
        "query": request.scope["query_string"].decode(),
        "headers": {k: v for k, v in request.headers.items() if k.startswith("x-") or k == "cookie"},
        "content_type": request.headers.get("content-type"),
        "body": body.decode() or None,
    }


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """The app on 127.0.0.1 at a free port, for the duration of the block; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test app did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
