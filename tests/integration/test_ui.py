"""The web page (``/ui/``) in a real browser: Debian's headless Chromium driven by Playwright,
on a real ``delivery api`` and pipeline. A subscriber signs in, subscribes a failing endpoint,
reads why its deliveries failed, fixes it, bulk-replays and sees them delivered, pauses,
resumes, sends a test event, rotates the secret and signs out; an ordered subscription shows
the account a dead letter holds, and Skip releases it; another tenant sees none of
it; a change with the session cookie but without the CSRF token is refused, and revoking the
key ends its session; the page fits a 390 px phone and works from the keyboard; on-call's page
shows the platform's health.

Screenshots of both widths are written to the test's tmp_path (``--basetemp`` to keep them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from delivery.store import keys
from delivery.testing.api import ApiProcess, api_process
from delivery.testing.env import IN_CI
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver, RefusingSubscriber, scripted_subscriber
from delivery.testing.waits import wait_until
from tests.support import key_for, running, settings_env, tenant_with_key

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# Debian's chromium, never a browser `playwright install` would download; no network beyond
# loopback, so nothing in the background may try.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 20_000
HAVE_CHROMIUM = Path(CHROMIUM).exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        if IN_CI:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def _sign_in(page: Page, api: ApiProcess, key: str) -> None:
    await page.goto(api.url + "/ui/")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Subscriptions", exact=True)).to_be_visible(
        timeout=WAIT_MS
    )


async def _fetch(page: Page, method: str, path: str, body: object, csrf: str | None) -> int:
    """A request from the page's own origin with its cookie, as a forged form would send it
    (with or without the session's CSRF token)."""
    status = await page.evaluate(
        """async ([method, path, body, csrf]) => {
            const headers = {"Content-Type": "application/json"};
            if (csrf) headers["X-CSRF-Token"] = csrf;
            const r = await fetch(path, {method, headers, body: JSON.stringify(body),
                                         credentials: "same-origin"});
            return r.status;
        }""",
        [method, path, body, csrf],
    )
    return int(status)


async def test_a_subscriber_fixes_a_failing_endpoint_and_replays_from_the_page(
    settings, browser: Browser, tmp_path: Path
):
    tenant, key = await tenant_with_key(settings, "merchant")
    async with (
        Receiver() as receiver,
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        running(settings),
    ):
        receiver.set_behaviour("/hook", Behaviour(status=400))  # a 4xx: dead letters at once
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        await _sign_in(page, api, key)
        assert key not in page.url
        [cookie] = await context.cookies()
        assert cookie["name"] == "delivery_session" and cookie["value"] != key
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert not cookie["secure"]  # plain HTTP here; Secure behind TLS: the next test
        await expect(page.get_by_text("No subscriptions yet")).to_be_visible()

        # Create a subscription to the failing endpoint; its secret is shown once.
        await page.get_by_label("Endpoint URL").fill(receiver.url("/hook"))
        await page.get_by_label("Event types").fill("trade.*")
        await page.get_by_role("button", name="Create subscription").click()
        shown = page.locator("#shown-secret")
        await expect(shown).to_have_text(receiver_secret_pattern(), timeout=WAIT_MS)
        secret = await shown.inner_text()
        receiver.expect_secret("/hook", secret)
        link = page.locator("a[href^='#/subscriptions/sub_']")
        sub_id = (await link.inner_text()).strip()

        for i in range(2):
            async with http.post("/v1/events", json=trade(i, id=f"evt_ui{i}")) as answer:
                assert answer.status == 202

        async def dead_twice() -> bool:
            async with http.get("/v1/dead-letters") as answer:
                return len((await answer.json())["items"]) == 2

        await wait_until(dead_twice, timeout_s=30, what="2 dead letters")
        # On-call's view of the same fault, through the operator route the page calls.
        _, operator = await key_for(settings, tenant, "operator")
        async with api.client(operator) as ops, ops.get("/v1/ops/overview") as answer:
            unhealthy = (await answer.json())["unhealthy"]
        assert [(s["id"], s["tenant_id"], s["dead"]) for s in unhealthy] == [(sub_id, tenant, 2)]
        await link.click()
        await expect(page.get_by_role("heading", name=f"Subscription {sub_id}")).to_be_visible()
        rows = page.locator("table tbody tr")
        await expect(rows).to_have_count(2)
        for i in range(2):
            row = rows.filter(has_text=f"evt_ui{i}")
            await expect(row.locator("td.state-dead")).to_have_text("dead")
            await expect(row.locator("td[data-label='Reason']")).to_contain_text("400")
        await expect(page.locator("svg.chart")).to_have_attribute("aria-label", _two_failed())
        await page.screenshot(path=str(tmp_path / "failed-1280.png"), full_page=True)
        utc = await page.locator("td[data-label='Last attempt'] time").first.get_attribute("title")
        assert utc is not None and utc.endswith("Z (UTC)")

        # Fix the endpoint; replay in bulk from the dead letters of this subscription.
        receiver.set_behaviour("/hook", Behaviour(status=200))
        await page.get_by_role("link", name="Dead letters of this subscription").click()
        await expect(page.locator("table tbody tr")).to_have_count(2)
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.screenshot(path=str(tmp_path / "dead-letters-390.png"), full_page=True)
        await page.set_viewport_size({"width": 1280, "height": 900})
        await page.get_by_role("button", name="Replay all matching the filter").click()
        await expect(page.locator("#progress")).to_contain_text("Replayed 2", timeout=WAIT_MS)
        await receiver.wait_for(lambda r: r.unique_count("/hook") == 2, 30, "2 replayed")
        assert all(a.signature_ok for a in receiver.delivered("/hook"))

        async def delivered_twice() -> bool:
            path = f"/v1/subscriptions/{sub_id}/deliveries?state=delivered"
            async with http.get(path) as answer:
                return len((await answer.json())["items"]) == 2

        await wait_until(delivered_twice, timeout_s=30, what="both recorded as delivered")
        await page.goto(f"{api.url}/ui/#/subscriptions/{sub_id}?state=delivered")
        await expect(page.locator("td.state-delivered")).to_have_count(2, timeout=WAIT_MS)
        await page.screenshot(path=str(tmp_path / "subscription-1280.png"), full_page=True)

        # Pause and resume.
        state_card = page.locator(".card .big").first
        await page.get_by_role("button", name="Pause").click()
        await expect(state_card).to_have_text("paused", timeout=WAIT_MS)
        await page.get_by_role("button", name="Resume").click()
        await expect(state_card).to_have_text("active", timeout=WAIT_MS)

        # A test event goes through the publish route to this endpoint, signed.
        await page.get_by_role("button", name="Send test event").click()
        await expect(page.get_by_role("status")).to_contain_text("published", timeout=WAIT_MS)
        await receiver.wait_for(lambda r: r.unique_count("/hook") == 3, 30, "the test event")
        assert all(a.signature_ok for a in receiver.delivered("/hook"))

        # Rotate the secret: a new one, shown once.
        page.once("dialog", lambda dialog: dialog.accept())
        await page.get_by_role("button", name="Rotate secret").click()
        await expect(page.locator("#shown-secret")).to_have_text(
            receiver_secret_pattern(), timeout=WAIT_MS
        )
        assert await page.locator("#shown-secret").inner_text() != secret

        # Sign out: the session is gone, so the cookie alone no longer reads anything.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("API key")).to_be_visible(timeout=WAIT_MS)
        status = await page.evaluate("fetch('/v1/subscriptions').then(r => r.status)")
        assert status == 401
        await context.close()


async def test_an_ordered_subscriptions_blocked_account_is_shown_and_skipped(
    settings, browser: Browser, tmp_path: Path
):
    _, key = await tenant_with_key(settings, "orderly")
    subscriber = RefusingSubscriber(refused={("acc_ui", 2)})
    async with (
        scripted_subscriber(subscriber.answer) as base,
        api_process(settings_env(settings)) as api,
        api.client(key) as http,
        running(settings),
    ):
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        await _sign_in(page, api, key)
        # Create it from the form, with the Ordered box ticked.
        await page.get_by_label("Endpoint URL").fill(f"{base}/ordered")
        await page.get_by_label("Event types").fill("trade.*")
        await page.get_by_label("Ordered").check()
        await page.get_by_role("button", name="Create subscription").click()
        await expect(page.locator("#shown-secret")).to_be_visible(timeout=WAIT_MS)
        link = page.locator("a[href^='#/subscriptions/sub_']")
        sub_id = (await link.inner_text()).strip()
        async with http.get(f"/v1/subscriptions/{sub_id}") as answer:
            assert (await answer.json())["ordered"] is True

        events = {"events": [trade(i, account="acc_ui", id=f"evt_ord{i}") for i in range(1, 4)]}
        async with http.post("/v1/events", json=events) as answer:
            assert answer.status == 202

        async def blocked() -> bool:
            async with http.get(f"/v1/subscriptions/{sub_id}/blocked-accounts") as answer:
                return len((await answer.json())["items"]) == 1

        await wait_until(blocked, timeout_s=30, what="acc_ui held behind its dead letter")
        assert subscriber.of("acc_ui") == [1]  # 3 waits behind the refused 2
        await page.reload()
        await expect(page.get_by_text("ordered · 1 blocked account")).to_be_visible(
            timeout=WAIT_MS
        )
        await link.click()
        row = page.locator("#blocked tbody tr")
        await expect(row).to_have_count(1, timeout=WAIT_MS)
        await expect(row.locator("td[data-label='Account']")).to_have_text("acc_ui")
        await expect(row.locator("td[data-label='Sequence held']")).to_have_text("2")
        await expect(row.locator("td[data-label='Dead letter']")).to_contain_text("evt_ord2")
        await expect(row.locator("td[data-label='Reason']")).to_contain_text("400")
        await page.screenshot(path=str(tmp_path / "blocked-1280.png"), full_page=True)

        # Skip, confirmed: the account is released and the later event arrives.
        dialogs: list[str] = []

        async def accept(dialog) -> None:  # type: ignore[no-untyped-def]
            dialogs.append(dialog.message)
            await dialog.accept()

        page.once("dialog", accept)
        await page.get_by_role("button", name="Skip evt_ord2 of account acc_ui").click()
        await expect(page.locator("#blocked-result")).to_contain_text(
            "Skipped evt_ord2", timeout=WAIT_MS
        )
        assert dialogs and "evt_ord2" in dialogs[0]
        await expect(page.get_by_text("No account is blocked")).to_be_visible(timeout=WAIT_MS)
        await wait_until(
            lambda: subscriber.of("acc_ui") == [1, 3], timeout_s=30, what="3 after the skip"
        )
        async with http.get(f"/v1/subscriptions/{sub_id}/deliveries") as answer:
            states = {d["event_id"]: d["state"] for d in (await answer.json())["items"]}
        assert states["evt_ord2"] == "skipped"  # kept, never sent
        await context.close()


def receiver_secret_pattern():  # a whsec_ secret, as the contract spells it
    import re

    return re.compile(r"^whsec_[A-Za-z0-9+/=]+$")


def _two_failed():
    import re

    return re.compile(r"^2 attempts, 2 failed")


async def test_tenants_csrf_phone_width_keyboard_and_on_call(
    settings, browser: Browser, tmp_path: Path
):
    tenant_a, key_a = await tenant_with_key(settings, "first")
    tenant_b, key_b = await tenant_with_key(settings, "second")
    _, operator = await key_for(settings, tenant_b, "read,operator")
    async with api_process(settings_env(settings)) as api:
        async with api.client(key_a) as http:
            body = {"url": "http://127.0.0.1:9/a", "events": ["*"]}
            async with http.post("/v1/subscriptions", json=body) as answer:
                assert answer.status == 201
                sub_a = (await answer.json())["id"]
        # Behind a TLS-terminating proxy the cookie is Secure; over plain HTTP it cannot be.
        async with api.client() as http:
            for proto, secure in (("https", True), ("http", False)):
                headers = {"X-Forwarded-Proto": proto}
                async with http.post("/v1/session", json={"key": key_a}, headers=headers) as r:
                    assert r.status == 201
                    assert ("; Secure" in r.headers["Set-Cookie"]) is secure, proto

        # A phone: tenant B signs in from the keyboard alone and sees none of A's objects.
        phone = await browser.new_context(viewport={"width": 390, "height": 844})
        page = await phone.new_page()
        await page.goto(api.url + "/ui/")
        await expect(page.get_by_label("API key")).to_be_focused()
        await page.keyboard.type(key_b)
        await page.keyboard.press("Enter")
        await expect(page.get_by_text("No subscriptions yet")).to_be_visible(timeout=WAIT_MS)
        assert sub_a not in await page.content()
        await page.goto(f"{api.url}/ui/#/subscriptions/{sub_a}")
        await expect(page.get_by_role("alert")).to_contain_text("another tenant")
        await page.goto(f"{api.url}/ui/#/subscriptions")
        await expect(page.get_by_label("Endpoint URL")).to_be_visible()
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page scrolls sideways at 390 px by {overflow} px"
        # Every control has a label a screen reader announces.
        unlabelled = await page.evaluate(
            """[...document.querySelectorAll('input, select, button')]
               .filter(e => !e.labels?.length && !e.getAttribute('aria-label')
                            && !e.textContent.trim()).map(e => e.outerHTML)"""
        )
        assert unlabelled == []
        # Keyboard: Tab reaches the form, typing fills it, Enter creates the subscription.
        await page.get_by_label("Endpoint URL").focus()
        await page.keyboard.type("http://127.0.0.1:9/b")
        for _ in range(4):  # events, account, ordered, then the button
            await page.keyboard.press("Tab")
        await expect(page.get_by_role("button", name="Create subscription")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator("#shown-secret")).to_be_visible(timeout=WAIT_MS)
        await page.screenshot(path=str(tmp_path / "subscriptions-390.png"), full_page=True)

        # CSRF: the cookie alone changes nothing; with the session's token it does.
        csrf = await page.evaluate("fetch('/v1/session').then(r => r.json())")
        body = {"url": "http://127.0.0.1:9/forged", "events": ["*"]}
        assert await _fetch(page, "POST", "/v1/subscriptions", body, None) == 403
        assert await _fetch(page, "POST", "/v1/subscriptions", body, "x" * 43) == 403
        assert await _fetch(page, "POST", "/v1/subscriptions", body, csrf["csrf_token"]) == 201
        # Revoking the key ends its sessions at once.
        conn = await asyncpg.connect(settings.database_url)
        try:
            await keys.revoke(conn, csrf["key_id"])
        finally:
            await conn.close()
        assert await page.evaluate("fetch('/v1/subscriptions').then(r => r.status)") == 401
        await phone.close()

        # On-call: the operator key's page shows the platform's health; the runbook anchors.
        desk = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await desk.new_page()
        await _sign_in(page, api, operator)
        await page.get_by_role("link", name="On-call").click()
        for heading in (
            "Outbox backlog",
            "Queue depths",
            "Unhealthy since",
            "Unhealthy subscriptions, by impact",
        ):
            await expect(page.get_by_role("heading", name=heading)).to_be_visible()
        await page.goto(f"{api.url}/ui/#/ops/queues")
        await expect(page.get_by_role("heading", name="Queue depths")).to_be_focused()
        await page.screenshot(path=str(tmp_path / "ops-1280.png"), full_page=True)
        await desk.close()
    assert tenant_a != tenant_b
