"""The aiohttp application: the route table mounted through one adapter (auth, then the
models), and one middleware that turns every answer, aiohttp's own errors included, into the
API's JSON error shape, counts it and logs it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from delivery.api.auth import caller_for
from delivery.api.openapi import document
from delivery.api.problems import ApiError, error_response, from_platform
from delivery.api.routing import Call, Route
from delivery.api.webpage import add_webpage
from delivery.errors import DeliveryPlatformError
from delivery.ops import metrics
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.keys import Caller
from delivery.store.pool import is_connection_error

log = structlog.get_logger("delivery.api")
access = structlog.get_logger("delivery.api.access")

POOL = web.AppKey("pool", asyncpg.Pool)
SETTINGS = web.AppKey("settings", Settings)
BOX = web.AppKey("box", SecretBox)
_CALLER = "delivery.caller"
# What an anonymous route's handler gets as its caller: no tenant, no scope.
NOBODY = Caller(key_id="", tenant_id="", scopes=frozenset())
_UNMATCHED = "unmatched"
# Methods we never serve are counted as one, so a client cannot add label values at will.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# aiohttp's own answers (no route, wrong method, body too large), in the API's codes.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def where(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a client reads it: ``events[3].data.price``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _invalid(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if not (isinstance(p, str) and "." in p)]  # union tags
    field = where(loc) or None
    return ApiError("invalid_request", f"{field or 'body'}: {err['msg']}", field=field)


def _validate(model: type[BaseModel] | None, raw: Any) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None


async def _json_body(request: web.Request) -> Any:
    body = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge (413)
    if not body:
        raise ApiError("invalid_request", "send a JSON body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError("invalid_request", f"the body is not valid JSON: {exc}") from None


def _adapter(route: Route) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        # Auth first: without a valid key nothing else about the request is answered.
        app = request.app
        caller = NOBODY if route.anonymous else await caller_for(app[POOL], request, route.scope)
        request[_CALLER] = caller
        path = _validate(route.path_model, dict(request.match_info))
        query = _validate(route.query, dict(request.query))
        body: Any = None
        if route.body is not None:
            raw = await _json_body(request)
            body = raw if route.raw_body else _validate(route.body, raw)
        call = Call(request, caller, app[POOL], app[SETTINGS], app[BOX], path, query, body)
        try:
            reply = await route.handler(call)
        except DeliveryPlatformError as exc:
            mapped = from_platform(exc)
            if mapped is None:
                raise
            raise mapped from None
        if reply.stream is not None:
            return reply.stream
        payload = reply.body.model_dump_json().encode() if reply.body is not None else None
        return web.Response(
            status=reply.status,
            body=payload,
            content_type="application/json" if payload is not None else None,
            headers=reply.headers,
        )

    return handle


def _route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else _UNMATCHED


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer in the API's error shape, counted and logged (never the key)."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc)
    except web.HTTPException as exc:
        code = _HTTP_CODES.get(exc.status, "invalid_request" if exc.status < 500 else "internal")
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        message = exc.reason if exc.status != 413 else "the body is over the size limit"
        response = error_response(ApiError(code, message, headers=headers))
        response.set_status(exc.status)
    except Exception as exc:
        if is_connection_error(exc):  # the database is away (failover, restart): try again
            log.warning("request_unavailable", route=_route_template(request), error=repr(exc))
            response = error_response(
                ApiError(
                    "unavailable",
                    "the database is unavailable; try again",
                    headers={"Retry-After": "1"},
                )
            )
        else:
            log.exception("request_failed", method=request.method, route=_route_template(request))
            response = error_response(ApiError("internal", "internal error; it was logged"))
    duration_s = time.perf_counter() - started
    route = _route_template(request)
    method = request.method if request.method in _METHODS else "other"
    metrics.API_REQUESTS.labels(route, method, str(response.status)).inc()
    metrics.API_REQUEST_DURATION.labels(route, method).observe(duration_s)
    caller = request.get(_CALLER)
    access.info(
        "request",
        method=method,
        route=route,
        status=response.status,
        duration_ms=round(duration_s * 1000, 2),
        tenant_id=(caller.tenant_id or None) if caller else None,
        key_id=(caller.key_id or None) if caller else None,
    )
    return response


def build_app(
    routes: Sequence[Route], pool: asyncpg.Pool, settings: Settings, box: SecretBox
) -> web.Application:
    app = web.Application(middlewares=[_observe], client_max_size=settings.api_max_body_bytes)
    app[POOL] = pool
    app[SETTINGS] = settings
    app[BOX] = box
    spec = orjson.dumps(document(routes))

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=spec, content_type="application/json")

    app.router.add_get("/openapi.json", openapi, allow_head=False)
    add_webpage(app)
    for route in routes:
        app.router.add_route(route.method, route.path, _adapter(route))
    return app
