"""The tiny service ``bench.api_frameworks`` measures, written once per framework.

Run by path in the benchmark's own venv (``python bench/api_service.py FRAMEWORK --port N``),
so it imports nothing from this checkout: only the standard library and the frameworks.

Every variant answers the same two routes with the same bytes:

* ``POST /v1/events``: ``{"events": [...]}`` of envelopes validated into pydantic v2 models
  (a discriminated union on ``type``, decimal strings, aware datetimes, as ``delivery.events``
  does), answered ``202 {"published": N, "duplicates": 0, "ids": [...]}``;
* ``GET /v1/events/{id}``: a small JSON object.

Each framework is set up the way its docs recommend for throughput: one process, uvloop, the C
HTTP parser (aiohttp's own, httptools under uvicorn), no access log, no debug; aiohttp and
Starlette call pydantic's JSON fast path themselves (``model_validate_json``,
``model_dump_json``), FastAPI and Litestar validate and serialise through their own
integration (a typed body parameter and a typed return value). ``litestar-msgspec`` is
Litestar's native path: the same models as ``msgspec.Struct``.
"""

# No ``from __future__ import annotations``: the msgspec models are local to their server, and
# Litestar reads handlers' annotations as objects, which a string naming a local cannot be.
import argparse
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
PositiveDecimal = Annotated[str, StringConstraints(pattern=r"^\d{1,30}(\.\d{1,18})?$", strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TradeExecutedData(_Strict):
    trade_id: Text
    order_id: Text
    instrument: Text
    side: Literal["buy", "sell"]
    quantity: PositiveDecimal
    price: PositiveDecimal
    executed_at: AwareDatetime


class TradeCancelledData(_Strict):
    trade_id: Text
    order_id: Text
    reason: Text


class TradeExecuted(_Strict):
    id: EventId | None = None
    type: Literal["trade.executed"]
    account_id: Text
    occurred_at: AwareDatetime | None = None
    data: TradeExecutedData


class TradeCancelled(_Strict):
    id: EventId | None = None
    type: Literal["trade.cancelled"]
    account_id: Text
    occurred_at: AwareDatetime | None = None
    data: TradeCancelledData


Envelope = Annotated[TradeExecuted | TradeCancelled, Field(discriminator="type")]


class Batch(_Strict):
    events: Annotated[list[Envelope], Field(min_length=1, max_length=1000)]


class Accepted(BaseModel):
    published: int
    duplicates: int
    ids: list[str]


class EventView(BaseModel):
    id: str
    type: str
    account_id: str
    sequence: int
    created_at: str
    deliveries: list[dict[str, Any]]


def accept(batch: Batch) -> Accepted:
    return Accepted(
        published=len(batch.events),
        duplicates=0,
        ids=[e.id or f"gen_{i}" for i, e in enumerate(batch.events)],
    )


def view(event_id: str) -> EventView:
    return EventView(
        id=event_id,
        type="trade.executed",
        account_id="acc_42",
        sequence=7,
        created_at="2026-12-07T21:00:00.123456Z",
        deliveries=[{"subscription_id": "sub_1", "state": "succeeded", "attempts": 1}],
    )


def serve_aiohttp(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def publish(request: web.Request) -> web.Response:
        try:
            batch = Batch.model_validate_json(await request.read())
        except ValidationError as e:
            return web.Response(status=400, text=e.json(), content_type="application/json")
        body = accept(batch).model_dump_json()
        return web.Response(status=202, text=body, content_type="application/json")

    async def show(request: web.Request) -> web.Response:
        body = view(request.match_info["event_id"]).model_dump_json()
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/events", publish)
    app.router.add_get("/v1/events/{event_id}", show)
    # access_log=None: no access logger at all (aiohttp's docs: the cheapest setting).
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


def _uvicorn(app: Any, port: int) -> None:
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )


def serve_starlette(port: int) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def publish(request: Request) -> Response:
        try:
            batch = Batch.model_validate_json(await request.body())
        except ValidationError as e:
            return Response(e.json(), status_code=400, media_type="application/json")
        body = accept(batch).model_dump_json()
        return Response(body, status_code=202, media_type="application/json")

    async def show(request: Request) -> Response:
        body = view(request.path_params["event_id"]).model_dump_json()
        return Response(body, media_type="application/json")

    _uvicorn(
        Starlette(
            routes=[
                Route("/v1/events", publish, methods=["POST"]),
                Route("/v1/events/{event_id}", show, methods=["GET"]),
            ]
        ),
        port,
    )


def serve_fastapi(port: int) -> None:
    from fastapi import FastAPI

    # No docs routes; the typed parameter and return value are FastAPI's way (since 0.130 it
    # serialises a declared return type with pydantic straight to JSON; ORJSONResponse is
    # deprecated for it).
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v1/events", status_code=202)
    async def publish(batch: Batch) -> Accepted:
        return accept(batch)

    @app.get("/v1/events/{event_id}")
    async def show(event_id: str) -> EventView:
        return view(event_id)

    _uvicorn(app, port)


def serve_litestar(port: int) -> None:
    from litestar import Litestar, get, post

    @post("/v1/events", status_code=202)
    async def publish(data: Batch) -> Accepted:
        return accept(data)

    @get("/v1/events/{event_id:str}")
    async def show(event_id: str) -> EventView:
        return view(event_id)

    # openapi_config=None: no schema generation; the pydantic plugin is registered by default.
    _uvicorn(Litestar([publish, show], debug=False, openapi_config=None), port)


def serve_litestar_msgspec(port: int) -> None:
    import msgspec
    from litestar import Litestar, get, post

    id_meta = msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    text_meta = msgspec.Meta(min_length=1, max_length=256)
    decimal_meta = msgspec.Meta(pattern=r"^\d{1,30}(\.\d{1,18})?$")
    aware = msgspec.Meta(tz=True)

    class TradeExecutedDataS(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        trade_id: Annotated[str, text_meta]
        order_id: Annotated[str, text_meta]
        instrument: Annotated[str, text_meta]
        side: Literal["buy", "sell"]
        quantity: Annotated[str, decimal_meta]
        price: Annotated[str, decimal_meta]
        executed_at: Annotated[datetime, aware]

    class TradeCancelledDataS(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
        trade_id: Annotated[str, text_meta]
        order_id: Annotated[str, text_meta]
        reason: Annotated[str, text_meta]

    class TradeExecutedS(
        msgspec.Struct, tag_field="type", tag="trade.executed", forbid_unknown_fields=True
    ):
        account_id: Annotated[str, text_meta]
        data: TradeExecutedDataS
        id: Annotated[str, id_meta] | None = None
        occurred_at: Annotated[datetime, aware] | None = None

    class TradeCancelledS(
        msgspec.Struct, tag_field="type", tag="trade.cancelled", forbid_unknown_fields=True
    ):
        account_id: Annotated[str, text_meta]
        data: TradeCancelledDataS
        id: Annotated[str, id_meta] | None = None
        occurred_at: Annotated[datetime, aware] | None = None

    class BatchS(msgspec.Struct, forbid_unknown_fields=True):
        events: Annotated[list[TradeExecutedS | TradeCancelledS], msgspec.Meta(min_length=1)]

    class AcceptedS(msgspec.Struct):
        published: int
        duplicates: int
        ids: list[str]

    class EventViewS(msgspec.Struct):
        id: str
        type: str
        account_id: str
        sequence: int
        created_at: str
        deliveries: list[dict[str, Any]]

    @post("/v1/events", status_code=202)
    async def publish(data: BatchS) -> AcceptedS:
        ids = [e.id or f"gen_{i}" for i, e in enumerate(data.events)]
        return AcceptedS(published=len(data.events), duplicates=0, ids=ids)

    @get("/v1/events/{event_id:str}")
    async def show(event_id: str) -> EventViewS:
        return EventViewS(**view(event_id).model_dump())

    _uvicorn(Litestar([publish, show], debug=False, openapi_config=None), port)


SERVERS: dict[str, Callable[[int], None]] = {
    "aiohttp": serve_aiohttp,
    "starlette": serve_starlette,
    "fastapi": serve_fastapi,
    "litestar": serve_litestar,
    "litestar-msgspec": serve_litestar_msgspec,
}


def main() -> None:
    p = argparse.ArgumentParser(description="One framework's variant of the benchmark service.")
    p.add_argument("framework", choices=list(SERVERS), help="which framework serves it")
    p.add_argument("--port", type=int, required=True, help="loopback port to listen on")
    args = p.parse_args()
    SERVERS[args.framework](args.port)


if __name__ == "__main__":
    main()
