"""Every operation of the served /openapi.json, walked automatically (not a hand-picked list):
no key, a malformed key, an unknown key and a revoked key answer 401; a key without the
operation's scope answers 403; another tenant's object answers 404, exactly as a missing id.
Through real HTTP on a real ``delivery api`` process."""

from __future__ import annotations

import asyncpg
import pytest

from delivery.store import keys
from delivery.testing.api import ApiProcess, api_process
from delivery.testing.factories import trade
from tests.support import key_for, settings_env, tenant_with_key

pytestmark = pytest.mark.integration

ALL_SCOPES = ("publish", "manage", "read")
# A valid body per operation that takes one: the wrong-tenant check must get past validation.
BODIES = {
    "publishEvents": trade(1, id="evt_sweep_b"),
    "createSubscription": {"url": "http://127.0.0.1:9/hook", "events": ["trade.*"]},
    "updateSubscription": {"events": ["account.*"]},
    "replaySubscription": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"},
    "replayDeadLetters": {"all": True},
    "purgeDeadLetters": {"all": True},
    "skipDeadLetters": {"all": True},
}


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if op.get("security", spec["security"])
    ]


async def _call(api: ApiProcess, key: str | None, method: str, path: str, body: object) -> tuple:
    async with api.client(key) as http, http.request(method, path, json=body) as answer:
        payload = await answer.json(content_type=None)
        return answer.status, payload, answer.headers


def _is_error(payload: object, code: str) -> bool:
    return (
        isinstance(payload, dict)
        and set(payload) == {"error"}
        and payload["error"]["code"] == code
        and set(payload["error"]) == {"code", "message", "field"}
    )


async def test_every_operation_refuses_missing_bad_revoked_keys_wrong_scope_and_tenant(settings):
    tenant_a, key_a = await tenant_with_key(settings, "sweep-a")
    tenant_b, key_b = await tenant_with_key(settings, "sweep-b")
    revoked_id, revoked = await key_for(settings, tenant_a, "publish,manage,read")
    conn = await asyncpg.connect(settings.database_url)
    try:
        await keys.revoke(conn, revoked_id)
    finally:
        await conn.close()
    unknown = "dk_" + "A" * 43  # well-formed, never issued

    async with api_process(settings_env(settings)) as api:
        async with api.client() as http, http.get("/openapi.json") as answer:
            assert answer.status == 200  # the one route without a key
            spec = await answer.json()
        # Tenant A's objects, which tenant B must not see.
        async with api.client(key_a) as http:
            async with http.post("/v1/events", json=trade(1, id="evt_sweep_a")) as answer:
                assert answer.status == 202
            sub_body = {"url": "http://127.0.0.1:9/a", "events": ["*"]}
            async with http.post("/v1/subscriptions", json=sub_body) as answer:
                assert answer.status == 201
                sub_a = (await answer.json())["id"]
        # Per path parameter: tenant A's object, and an id that exists nowhere.
        owned = {"/v1/events/{id}": ("evt_sweep_a", "evt_missing_1")}
        account = ("acc_1", "acc_missing_1")  # trade() publishes for acc_1

        operations = _operations(spec)
        assert len(operations) >= 17  # the contract's table, balances and the stream included
        for method, template, op in operations:
            placeholder = next((p for p in ("{id}", "{account_id}") if p in template), None)
            if placeholder == "{account_id}":
                object_id, missing = account
            elif placeholder == "{id}":
                object_id, missing = owned.get(template, (sub_a, "sub_0000000000000000"))
            else:
                object_id = missing = None
            path = (
                template.replace(placeholder, object_id) if placeholder and object_id else template
            )
            body = BODIES.get(op["operationId"]) if "requestBody" in op else None
            assert "requestBody" not in op or body is not None, f"no body for {op['operationId']}"
            what = f"{method} {template}"

            for key in (None, "not-a-key", unknown, revoked):
                status, payload, headers = await _call(api, key, method, path, body)
                assert status == 401, (what, key, status, payload)
                assert _is_error(payload, "unauthenticated"), (what, payload)
                assert headers["WWW-Authenticate"].startswith("Bearer")

            scope = op["x-scope"]
            others = ",".join(s for s in ALL_SCOPES if s != scope)
            _, narrow = await key_for(settings, tenant_a, others)
            status, payload, _ = await _call(api, narrow, method, path, body)
            assert status == 403, (what, status, payload)
            assert _is_error(payload, "forbidden") and scope in payload["error"]["message"]

            if object_id is None:
                continue
            assert placeholder is not None and missing is not None
            status, payload, _ = await _call(api, key_b, method, path, body)
            gone_status, gone, _ = await _call(
                api, key_b, method, template.replace(placeholder, missing), body
            )
            assert (status, gone_status) == (404, 404), (what, payload, gone)
            assert _is_error(payload, "not_found"), (what, payload)
            # Word for word the answer a missing id gets: nothing tells the two apart.
            assert (
                payload["error"]["message"].replace(object_id, missing) == gone["error"]["message"]
            ), what

        # Tenant B's attempts changed nothing of A's, and B's listings show none of it.
        async with api.client(key_a) as http, http.get(f"/v1/subscriptions/{sub_a}") as answer:
            assert answer.status == 200
            assert (await answer.json())["events"] == ["*"]
        async with api.client(key_b) as http:
            for listing in ("/v1/events", "/v1/subscriptions", "/v1/dead-letters"):
                async with http.get(listing) as answer:
                    text = await answer.text()
                    assert answer.status == 200, listing
                    assert "evt_sweep_a" not in text and sub_a not in text, listing
    assert tenant_a != tenant_b
