"""The OpenAPI document: the committed ops/openapi.json is the generated one (scripts/openapi
rewrites it), and the document describes every route of the table, with its scope, its
parameters and every status the server may answer. Pure: no server, no services."""

from __future__ import annotations

import json
from pathlib import Path

from jsonschema.validators import Draft202012Validator

from delivery.api import openapi
from delivery.api.routes import ROUTES

COMMITTED = Path(__file__).resolve().parents[2] / "ops" / "openapi.json"


def test_the_committed_document_is_the_generated_one():
    assert COMMITTED.read_text() == openapi.rendered(ROUTES), (
        "ops/openapi.json is stale: run scripts/openapi and commit it"
    )


def test_every_route_is_described_with_its_scope_and_its_errors():
    doc = openapi.document(ROUTES)
    assert doc["openapi"].startswith("3.1")
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        statuses = set(op["responses"])
        assert {str(s) for s in route.responses} <= statuses
        if route.anonymous:  # the web page's session routes: no key asked for up front
            assert op["security"] == [] and "x-scope" not in op
            assert {"400", "401"} <= statuses
            continue
        assert op["x-scope"] == route.scope.value
        assert {"400", "401", "403"} <= statuses
        if "{id}" in route.path:
            assert "404" in statuses
            assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == ["id"]
    publish = doc["paths"]["/v1/events"]["post"]
    assert "Retry-After" in publish["responses"]["429"]["headers"]
    assert any(p["name"] == "Idempotency-Key" for p in publish["parameters"])
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []


def test_every_schema_in_the_document_is_a_valid_json_schema():
    doc = openapi.document(ROUTES)
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    json.dumps(doc)  # serialisable as it is served
