"""What one route is (``Route``), what its handler gets (``Call``) and returns (``Reply``).

A route names its scope, its models (path, query, body) and its answers by status; the
adapter in ``app`` validates with the models before the handler runs, and ``openapi``
describes the same route from the same fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web
from pydantic import BaseModel

from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.keys import Caller, Scope


@dataclass(frozen=True)
class Header:
    """A request header a route reads (documented as a parameter)."""

    name: str
    description: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Call:
    """One validated request, as a handler sees it."""

    request: web.Request
    caller: Caller
    pool: asyncpg.Pool
    settings: Settings
    box: SecretBox  # opens and seals the stored signing secrets
    path: Any  # the route's path model, validated
    query: Any  # the route's query model, validated
    body: Any  # the route's body model, validated; raw JSON when ``raw_body``


@dataclass(frozen=True)
class Reply:
    status: int
    body: BaseModel | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # A response the handler already sent itself (the stream's WebSocket), returned as is.
    stream: web.StreamResponse | None = None


Handler = Callable[[Call], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # aiohttp's template: /v1/subscriptions/{id}
    operation: str  # the OpenAPI operationId
    summary: str
    scope: Scope
    handler: Handler
    responses: Mapping[int, type[BaseModel] | None]  # success statuses; errors are added
    path_model: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    raw_body: bool = False  # the handler validates the parsed JSON itself
    headers: tuple[Header, ...] = ()
    errors: tuple[int, ...] = ()  # statuses beyond those every route may answer
    tag: str = ""
    # OpenAPI links from the success answer: operationId -> the path's {id} as a runtime
    # expression ("$response.body#/id"), so clients and fuzzers can chain calls.
    links: Mapping[str, str] = field(default_factory=dict)
    # No key asked for by the adapter: the handler authenticates by itself (the web page's
    # session routes: sign-in takes the key in its body). ``scope`` is then unused.
    anonymous: bool = False

    def error_statuses(self) -> tuple[int, ...]:
        common = {400, 503} if self.anonymous else {400, 401, 403, 503}
        if self.path_model is not None:
            common.add(404)
        if self.body is not None:
            common.add(413)
        return tuple(sorted(common | set(self.errors)))
