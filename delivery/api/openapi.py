"""The OpenAPI 3.1 document, generated from the route table and its pydantic models: the
models that validate requests are the schemas, so the document cannot drift from the server.
``ops/openapi.json`` is this document, committed (``scripts/openapi`` rewrites it; a test
compares)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from delivery.api.models import ErrorBody
from delivery.api.routing import Route
from delivery.version import VERSION

_REF = "#/components/schemas/{model}"
_REASONS = {
    101: "Switching to WebSocket: frames as the summary says; closed with 4008 when the client"
    " falls behind (resume with after), 1013 at the tenant's client limit",
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    400: "The request is malformed or fails validation (`field` names the culprit)",
    401: "No API key, or an unknown or revoked one",
    403: "The API key lacks the route's scope",
    404: "No such object for this tenant (another tenant's id answers the same)",
    409: "Conflicts with the current state (or a quota is full)",
    413: "The body is over DELIVERY_API_MAX_BODY_BYTES",
    415: "The body is not JSON",
    422: "Valid JSON that the platform refuses (`field` names the culprit)",
    429: "Over the tenant's ingest rate: wait `Retry-After` seconds",
    503: "The database is unavailable (a failover, a restart): try again after `Retry-After`",
}
_RATE_HEADERS = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}},
    "RateLimit-Limit": {"description": "events per second allowed", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "events left now", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "seconds until full", "schema": {"type": "integer"}},
}


def _models(routes: Sequence[Route]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    found: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(ErrorBody, "serialization"): None}
    for route in routes:
        if route.body is not None:
            found[(route.body, "validation")] = None
        for model in route.responses.values():
            if model is not None:
                found[(model, "serialization")] = None
    return list(found)


def _parameters(model: type[BaseModel], where: str) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": where, "required": where == "path" or name in required, "schema": prop}
        for name, prop in schema.get("properties", {}).items()
    ]


def _operation(route: Route, refs: Mapping[tuple[Any, JsonSchemaMode], Any]) -> Any:
    params: list[dict[str, Any]] = []
    if route.path_model is not None:
        params += _parameters(route.path_model, "path")
    if route.query is not None:
        params += _parameters(route.query, "query")
    for header in route.headers:
        params.append(
            {
                "name": header.name,
                "in": "header",
                "required": False,
                "description": header.description,
                "schema": dict(header.schema),
            }
        )
    responses: dict[str, Any] = {}
    for status, model in route.responses.items():
        answer: dict[str, Any] = {"description": _REASONS.get(status, "OK")}
        if model is not None:
            answer["content"] = {"application/json": {"schema": refs[(model, "serialization")]}}
        if route.links:
            answer["links"] = {
                target: {"operationId": target, "parameters": {"id": expression}}
                for target, expression in route.links.items()
            }
        responses[str(status)] = answer
    error = {"application/json": {"schema": refs[(ErrorBody, "serialization")]}}
    for status in route.error_statuses():
        answer = {"description": _REASONS[status], "content": error}
        if status == 429:
            answer["headers"] = _RATE_HEADERS
        responses[str(status)] = answer
    op: dict[str, Any] = {
        "operationId": route.operation,
        "summary": route.summary,
        "tags": [route.tag] if route.tag else [],
        "parameters": params,
        "responses": responses,
    }
    if route.anonymous:
        op["security"] = []
    else:
        op["x-scope"] = route.scope.value
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    return op


def document(routes: Sequence[Route]) -> dict[str, Any]:
    """The whole document for ``routes`` (deterministic: same table, same bytes)."""
    refs, definitions = models_json_schema(_models(routes), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, refs)
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["meta"],
            "security": [],
            "parameters": [],
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "delivery",
            "version": VERSION,
            "description": "Reliable signed webhooks: the multi-tenant HTTP API (`delivery api`).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key from `delivery keys create`: dk_...",
                }
            },
        },
    }


def rendered(routes: Sequence[Route]) -> str:
    """The document as committed in ``ops/openapi.json``: sorted keys, two-space indent."""
    import json

    return json.dumps(document(routes), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """``python -m delivery.api.openapi [PATH]``: write the document (``scripts/openapi``)."""
    import sys
    from pathlib import Path

    from delivery.api.routes import ROUTES

    text = rendered(ROUTES)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
