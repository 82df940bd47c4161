"""Signing secrets at rest and Ed25519 signatures, end to end on the real services: what the
subscriber receives verifies with cryptography's Ed25519 and the Standard Webhooks library (not
only our verifier), the database holds only ciphertext once a key is set, a process without the
key refuses to start, and `secrets rotate-key` moves every secret to a new key."""

from __future__ import annotations

import base64
import json

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import SecretStr
from standardwebhooks.webhooks import Webhook

from delivery import publish_many
from delivery.secrets import SecretBox, generate_key
from delivery.settings import Settings
from delivery.signing import Signing
from delivery.store import subscriptions
from delivery.testing.factories import add_subscription, trade
from delivery.testing.receiver import Arrival, Receiver
from tests.support import cli, run_until_idle

pytestmark = pytest.mark.integration

KEY_A, KEY_B = generate_key(), generate_key()


def with_key(settings: Settings, keys: str) -> Settings:
    return settings.model_copy(update={"secrets_key": SecretStr(keys)})


def ed25519_signatures_verified(public_key: str, arrival: Arrival) -> int:
    """How many of the arrival's ``v1a`` signatures cryptography's Ed25519 accepts under
    ``public_key`` (``whpk_`` + base64 of the raw key), over id.timestamp.body."""
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key.removeprefix("whpk_")))
    signed = f"{arrival.webhook_id}.{arrival.webhook_timestamp}.".encode() + arrival.body
    good = 0
    for part in arrival.signature_header.split(" "):
        version, _, signature = part.partition(",")
        assert version == "v1a", arrival.signature_header
        try:
            key.verify(base64.b64decode(signature), signed)
            good += 1
        except Exception:  # noqa: S112 - InvalidSignature: that key did not sign this one
            continue
    return good


def standard_webhooks_verifies(secret: str, arrival: Arrival) -> bool:
    headers = {
        "webhook-id": arrival.webhook_id,
        "webhook-timestamp": arrival.webhook_timestamp,
        "webhook-signature": arrival.signature_header,
    }
    Webhook(secret).verify(arrival.body, headers)  # raises unless one signature matches
    return True


async def publish_trades(conn: asyncpg.Connection, count: int, prefix: str) -> None:
    async with conn.transaction():
        await publish_many(conn, [trade(i, id=f"{prefix}_{i}") for i in range(count)])


async def stored_secrets(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT secret, previous_secret FROM delivery.subscriptions")
    return [v for r in rows for v in (r["secret"], r["previous_secret"]) if v is not None]


async def test_an_ed25519_delivery_verifies_with_cryptography_directly(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await add_subscription(conn, receiver, "/ed", patterns="*", signing=Signing.ED25519)
        assert sub.public_key is not None and sub.public_key.startswith("whpk_")
        await publish_trades(conn, 3, "evt_ed")
        await run_until_idle(settings)
        arrived = receiver.delivered("/ed")
        assert {a.webhook_id for a in arrived} == {"evt_ed_0", "evt_ed_1", "evt_ed_2"}
        for arrival in arrived:
            assert arrival.signature_header.startswith("v1a,")
            assert ed25519_signatures_verified(sub.public_key, arrival) == 1
            assert arrival.signature_ok  # and by our own verifier, given the whpk_ key
    await conn.close()


async def test_an_ed25519_rotation_signs_with_both_keys_during_the_grace_period(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await add_subscription(conn, receiver, "/ed", patterns="*", signing=Signing.ED25519)
        rotated = await subscriptions.rotate_secret(conn, sub.id, grace_s=3600)
        assert rotated.public_key not in (None, sub.public_key)
        await publish_trades(conn, 2, "evt_rot")
        await run_until_idle(settings)
        arrived = receiver.delivered("/ed")
        assert len(arrived) == 2
        for arrival in arrived:
            new_sig, old_sig = arrival.signature_header.split(" ")
            assert new_sig.startswith("v1a,") and old_sig.startswith("v1a,")
            # A subscriber on either public key accepts; exactly one signature is each key's.
            assert ed25519_signatures_verified(rotated.public_key, arrival) == 1
            assert ed25519_signatures_verified(sub.public_key, arrival) == 1
    await conn.close()


async def test_with_a_key_the_database_holds_only_ciphertext_and_deliveries_verify(settings):
    keyed = with_key(settings, KEY_A)
    async with Receiver() as receiver:
        # Written through the command line, as an operator would: add, rotate, add ed25519.
        added = cli(
            settings, "subscriptions", "add", receiver.url("/hmac"), "--events", "*",
            DELIVERY_SECRETS_KEY=KEY_A,
        )
        assert added.returncode == 0, added.stderr
        hmac_sub = json.loads(added.stdout)
        rotated = cli(
            settings, "subscriptions", "rotate-secret", hmac_sub["id"], DELIVERY_SECRETS_KEY=KEY_A
        )
        assert rotated.returncode == 0, rotated.stderr
        new_secret, old_secret = json.loads(rotated.stdout)["secret"], hmac_sub["secret"]
        ed = cli(
            settings, "subscriptions", "add", receiver.url("/ed"), "--events", "*",
            "--signing", "ed25519", DELIVERY_SECRETS_KEY=KEY_A,
        )
        assert ed.returncode == 0, ed.stderr
        ed_sub = json.loads(ed.stdout)
        assert "secret" not in ed_sub and ed_sub["public_key"].startswith("whpk_")

        conn = await asyncpg.connect(settings.database_url)
        stored = await stored_secrets(conn)
        assert len(stored) == 3  # the hmac one's current and previous, the ed25519 key
        assert all(s.startswith("fernet:") for s in stored)
        assert not any("whsec_" in s or "whsk_" in s for s in stored)
        assert not any(new_secret.removeprefix("whsec_") in s for s in stored)

        receiver.expect_secret("/hmac", new_secret)
        receiver.expect_secret("/ed", ed_sub["public_key"])
        await publish_trades(conn, 3, "evt_sealed")
        await run_until_idle(keyed)
        assert receiver.unique_count("/hmac") == 3 and receiver.unique_count("/ed") == 3
        assert all(a.signature_ok for a in receiver.arrivals)
        for arrival in receiver.delivered("/hmac"):
            # The official library, with the new secret and with the one rotated out.
            assert standard_webhooks_verifies(new_secret, arrival)
            assert standard_webhooks_verifies(old_secret, arrival)
        for arrival in receiver.delivered("/ed"):
            assert ed25519_signatures_verified(ed_sub["public_key"], arrival) == 1
        await conn.close()


async def test_a_process_refuses_to_start_without_the_key_once_a_secret_is_sealed(settings):
    conn = await asyncpg.connect(settings.database_url)
    await subscriptions.add(
        conn, url="http://127.0.0.1:9/h", patterns="*", box=SecretBox([KEY_A])
    )
    await conn.close()
    for command, key in [
        (["worker"], None),
        (["run"], KEY_B),
        (["subscriptions", "list"], None),
        (["subscriptions", "add", "http://127.0.0.1:9/x", "--events", "*"], KEY_B),
    ]:
        env = {} if key is None else {"DELIVERY_SECRETS_KEY": key}
        result = cli(settings, *command, **env)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "DELIVERY_SECRETS_KEY" in lines[0], (command, lines)
    # The right key opens them; and the refused add wrote nothing.
    listed = cli(settings, "subscriptions", "list", "--json", DELIVERY_SECRETS_KEY=KEY_A)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1


async def test_rotate_key_seals_then_moves_every_secret_to_the_new_key(settings):
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        # Plaintext, as a release before secrets at rest left them.
        hmac_sub = await add_subscription(conn, receiver, "/hmac", patterns="*")
        ed_sub = await add_subscription(conn, receiver, "/ed", patterns="*", signing="ed25519")
        plain = await stored_secrets(conn)
        assert sorted(s[:5] for s in plain) == ["whsec", "whsk_"]

        first = cli(settings, "secrets", "rotate-key", DELIVERY_SECRETS_KEY=KEY_A)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout) == {"sealed": 2, "resealed": 0}
        under_a = await stored_secrets(conn)
        assert all(s.startswith("fernet:") for s in under_a)

        # The new key first, the old one still listed: everything moves to the new key.
        second = cli(settings, "secrets", "rotate-key", DELIVERY_SECRETS_KEY=f"{KEY_B},{KEY_A}")
        assert json.loads(second.stdout) == {"sealed": 0, "resealed": 2}
        again = cli(settings, "secrets", "rotate-key", DELIVERY_SECRETS_KEY=f"{KEY_B},{KEY_A}")
        assert json.loads(again.stdout) == {"sealed": 0, "resealed": 0}
        under_b = await stored_secrets(conn)
        only_b = SecretBox([KEY_B])
        assert {only_b.open(s) for s in under_b} == {hmac_sub.secret, ed_sub.secret}

        # The old key dropped: a process given only it refuses, one given the new key delivers.
        refused = cli(settings, "worker", DELIVERY_SECRETS_KEY=KEY_A)
        assert refused.returncode == 2 and "DELIVERY_SECRETS_KEY" in refused.stderr
        await publish_trades(conn, 2, "evt_moved")
        await run_until_idle(with_key(settings, KEY_B))
        assert receiver.unique_count("/hmac") == 2 and receiver.unique_count("/ed") == 2
        assert all(a.signature_ok for a in receiver.arrivals)
        for arrival in receiver.delivered("/hmac"):
            assert standard_webhooks_verifies(hmac_sub.secret, arrival)
    await conn.close()


async def test_rotate_key_without_a_key_or_with_the_wrong_one_writes_nothing(settings):
    conn = await asyncpg.connect(settings.database_url)
    await subscriptions.add(conn, url="http://127.0.0.1:9/h", patterns="*", box=SecretBox([KEY_A]))
    before = await stored_secrets(conn)
    for key in (None, KEY_B):
        env = {} if key is None else {"DELIVERY_SECRETS_KEY": key}
        result = cli(settings, "secrets", "rotate-key", **env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "DELIVERY_SECRETS_KEY" in result.stderr
    assert await stored_secrets(conn) == before
    await conn.close()


async def test_the_cli_shows_an_ed25519_public_key_and_never_its_secret_key(settings):
    seed = bytes(range(32))
    added = cli(
        settings, "subscriptions", "add", "http://127.0.0.1:9/h", "--events", "*",
        "--signing", "ed25519", "--secret", "whsk_" + base64.b64encode(seed).decode(),
        DELIVERY_SECRETS_KEY=KEY_A,
    )
    assert added.returncode == 0, added.stderr
    sub = json.loads(added.stdout)
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert sub["signing"] == "ed25519"
    assert sub["public_key"] == "whpk_" + base64.b64encode(raw).decode()
    assert "whsk_" not in added.stdout
    for args in (["show", sub["id"], "--json"], ["rotate-secret", sub["id"]], ["list", "--json"]):
        shown = cli(settings, "subscriptions", *args, DELIVERY_SECRETS_KEY=KEY_A)
        assert shown.returncode == 0, shown.stderr
        assert "whpk_" in shown.stdout and "whsk_" not in shown.stdout
    # A secret of the other kind is refused, naming what was expected; nothing is written.
    wrong = cli(
        settings, "subscriptions", "add", "http://127.0.0.1:9/h", "--events", "*",
        "--signing", "ed25519", "--secret", "whsec_" + base64.b64encode(b"k" * 32).decode(),
        DELIVERY_SECRETS_KEY=KEY_A,
    )
    assert wrong.returncode == 2 and "secret: must start with whsk_" in wrong.stderr
    listed = cli(settings, "subscriptions", "list", "--json", DELIVERY_SECRETS_KEY=KEY_A)
    assert len(json.loads(listed.stdout)) == 1
