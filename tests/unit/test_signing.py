"""Standard Webhooks signatures: the spec's published vector, rotation, verification."""

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from delivery.errors import InputError, SignatureError
from delivery.signing import (
    generate_secret,
    secret_key,
    sign,
    validate_secret,
    verify,
    webhook_headers,
)

SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_published_standard_webhooks_vector():
    assert sign([secret_key(SPEC_SECRET)], SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_rotation_signs_with_every_valid_secret_separated_by_spaces():
    new = generate_secret()
    header = sign([secret_key(new), secret_key(SPEC_SECRET)], SPEC_ID, SPEC_TS, SPEC_BODY)
    parts = header.split(" ")
    assert len(parts) == 2
    assert parts[1] == SPEC_SIGNATURE
    # A subscriber holding either secret accepts the request.
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": header,
    }
    verify(new, headers, SPEC_BODY, now_s=SPEC_TS)
    verify(SPEC_SECRET, headers, SPEC_BODY, now_s=SPEC_TS)


def test_verify_rejects_tampered_body_wrong_secret_and_stale_timestamp():
    headers = webhook_headers([secret_key(SPEC_SECRET)], SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers["content-type"] == "application/json"
    verify(SPEC_SECRET, headers, SPEC_BODY, now_s=SPEC_TS + 10)
    with pytest.raises(SignatureError):
        verify(SPEC_SECRET, headers, SPEC_BODY + b" ", now_s=SPEC_TS)
    with pytest.raises(SignatureError):
        verify(generate_secret(), headers, SPEC_BODY, now_s=SPEC_TS)
    with pytest.raises(SignatureError):
        verify(SPEC_SECRET, headers, SPEC_BODY, now_s=SPEC_TS + 3600)


def test_generated_secrets_are_whsec_base64_of_at_least_24_bytes():
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(secret_key(secret)) >= 24
    assert generate_secret() != secret


def test_bad_secrets_are_one_line_input_errors():
    with pytest.raises(InputError, match="secret: must be whsec_ followed by base64"):
        secret_key("whsec_not base64!")
    with pytest.raises(InputError, match="at least 24"):
        secret_key("whsec_c2hvcnQ=")


# The official Standard Webhooks library is the judge here, not our own verify (which shares
# sign() with the code under test and so would agree with any slip in it).


def test_a_signed_request_verifies_with_the_standard_webhooks_library():
    body = b'{"type": "trade.executed", "data": {"qty": 3}}'
    headers = webhook_headers([secret_key(SPEC_SECRET)], "evt_lib_1", int(time.time()), body)
    assert Webhook(SPEC_SECRET).verify(body, headers) == {
        "type": "trade.executed",
        "data": {"qty": 3},
    }
    # The library rejects the same request under another secret or with another body.
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SPEC_SECRET).verify(body.replace(b"3", b"4"), headers)


def test_during_a_rotation_each_secret_alone_verifies_with_the_standard_webhooks_library():
    new, old = generate_secret(), generate_secret()
    body = b'{"id": "evt_rotating"}'
    headers = webhook_headers(
        [secret_key(new), secret_key(old)], "evt_rotating", int(time.time()), body
    )
    # A subscriber that has switched to the new secret, and one still on the old one.
    Webhook(new).verify(body, headers, json_parse=False)
    Webhook(old).verify(body, headers, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers, json_parse=False)
    # Each signature is the library's own for its secret, and they are space-separated.
    parts = headers["webhook-signature"].split(" ")
    ts = int(headers["webhook-timestamp"])
    when = datetime.fromtimestamp(ts, tz=UTC)
    assert parts == [
        Webhook(new).sign("evt_rotating", when, body.decode()),
        Webhook(old).sign("evt_rotating", when, body.decode()),
    ]


def test_an_operators_secret_holds_24_to_64_bytes():
    assert validate_secret(whsec(24)) and validate_secret(whsec(64))
    for size in (23, 65, 4096):
        with pytest.raises(InputError, match=r"^secret: must hold at (least 24|most 64) "):
            validate_secret(whsec(size))
    with pytest.raises(InputError, match=r"^secret: must start with whsec_"):
        validate_secret("c2VjcmV0")


def whsec(size: int) -> str:
    return "whsec_" + base64.b64encode(b"k" * size).decode()


_GOOD = webhook_headers([secret_key(SPEC_SECRET)], SPEC_ID, SPEC_TS, SPEC_BODY)


@pytest.mark.parametrize(
    ("secret", "headers", "body"),
    [
        ("whsec_not base64!", _GOOD, SPEC_BODY),  # a bad secret
        ("whsec_c2hvcnQ=", _GOOD, SPEC_BODY),  # a short one
        (None, _GOOD, SPEC_BODY),  # not a string at all
        (SPEC_SECRET, {**_GOOD, "webhook-signature": "v1,é"}, SPEC_BODY),  # non-ASCII signature
        (SPEC_SECRET, {**_GOOD, "webhook-signature": None}, SPEC_BODY),
        (SPEC_SECRET, {**_GOOD, "webhook-timestamp": "١٦١٤٢٦٥٣٣٠"}, SPEC_BODY),  # Arabic digits
        (SPEC_SECRET, {**_GOOD, "webhook-timestamp": "9" * 5000}, SPEC_BODY),
        (SPEC_SECRET, {**_GOOD, "webhook-timestamp": 1614265330}, SPEC_BODY),  # an int
        (SPEC_SECRET, {**_GOOD, "webhook-timestamp": "1_614_265_330"}, SPEC_BODY),
        (SPEC_SECRET, {b"webhook-id": b"x"}, SPEC_BODY),  # bytes keys
        (SPEC_SECRET, {1: 2}, SPEC_BODY),
        (SPEC_SECRET, None, SPEC_BODY),
        (SPEC_SECRET, _GOOD, "not bytes"),
        (SPEC_SECRET, _GOOD, None),
    ],
)
def test_verify_raises_nothing_but_signature_error(secret, headers, body):
    with pytest.raises(SignatureError):
        verify(secret, headers, body, now_s=SPEC_TS)
