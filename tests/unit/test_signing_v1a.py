"""Ed25519 signatures (Standard Webhooks v1a): checked with cryptography's own Ed25519 verifier,
not only ours, since no reference library implements v1a yet (standard-webhooks#124)."""

import base64
import time

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from delivery.errors import InputError, SignatureError
from delivery.signing import (
    Signing,
    generate,
    generate_private_key,
    generate_secret,
    private_key,
    public_key,
    secret_key,
    sign_v1a,
    signing_key,
    validate,
    verify,
    webhook_headers,
)

MSG_ID, TS, BODY = "evt_v1a_1", 1_796_000_000, b'{"id": "evt_v1a_1", "n": 1}'
# A fixed seed, so the vector below is reproducible by anyone with any Ed25519 library.
SEED = bytes(range(32))
WHSK = "whsk_" + base64.b64encode(SEED).decode()


def cryptography_verifies(whpk: str, header: str, msg_id: str, ts: int, body: bytes) -> int:
    """How many ``v1a`` signatures of ``header`` verify under ``whpk``, by cryptography alone."""
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(whpk.removeprefix("whpk_")))
    good = 0
    for part in header.split(" "):
        version, _, sig = part.partition(",")
        assert version == "v1a"
        try:
            key.verify(base64.b64decode(sig), f"{msg_id}.{ts}.".encode() + body)
            good += 1
        except InvalidSignature:
            pass
    return good


def test_the_keys_are_base64_of_the_raw_32_byte_seed_and_public_key():
    expected = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
    assert public_key(WHSK) == "whpk_" + base64.b64encode(expected).decode()
    generated = generate_private_key()
    assert generated.startswith("whsk_")
    assert len(base64.b64decode(generated.removeprefix("whsk_"))) == 32
    assert generate(Signing.ED25519).startswith("whsk_")
    assert generate(Signing.HMAC).startswith("whsec_")


def test_the_signature_is_ed25519_over_id_timestamp_and_body():
    header = sign_v1a([private_key(WHSK)], MSG_ID, TS, BODY)
    assert header.startswith("v1a,")
    # Ed25519 is deterministic: the same key and content always give the same signature.
    raw = Ed25519PrivateKey.from_private_bytes(SEED).sign(f"{MSG_ID}.{TS}.".encode() + BODY)
    assert header == "v1a," + base64.b64encode(raw).decode()
    assert cryptography_verifies(public_key(WHSK), header, MSG_ID, TS, BODY) == 1
    assert cryptography_verifies(public_key(WHSK), header, MSG_ID, TS, BODY + b" ") == 0


def test_during_a_rotation_each_key_signs_and_each_public_key_alone_verifies():
    new = generate_private_key()
    headers = webhook_headers([signing_key(new), signing_key(WHSK)], MSG_ID, TS, BODY)
    header = headers["webhook-signature"]
    assert len(header.split(" ")) == 2
    for key in (new, WHSK):
        assert cryptography_verifies(public_key(key), header, MSG_ID, TS, BODY) == 1
        verify(public_key(key), headers, BODY, now_s=TS)
    with pytest.raises(SignatureError):
        verify(public_key(generate_private_key()), headers, BODY, now_s=TS)


def test_our_verifier_takes_a_public_key_and_checks_body_and_time():
    now = int(time.time())
    headers = webhook_headers([signing_key(WHSK)], MSG_ID, now, BODY)
    verify(public_key(WHSK), headers, BODY, now_s=now)
    with pytest.raises(SignatureError):
        verify(public_key(WHSK), headers, BODY + b"x", now_s=now)
    with pytest.raises(SignatureError):
        verify(public_key(WHSK), headers, BODY, now_s=now + 3600)
    # A v1 (HMAC) header is no v1a signature, and a v1a one is no v1 signature.
    hmac_secret = generate_secret()
    hmac_headers = webhook_headers([secret_key(hmac_secret)], MSG_ID, now, BODY)
    with pytest.raises(SignatureError):
        verify(public_key(WHSK), hmac_headers, BODY, now_s=now)
    with pytest.raises(SignatureError):
        verify(hmac_secret, headers, BODY, now_s=now)


@pytest.mark.parametrize(
    "header",
    ["v1a,not base64!", "v1a,", "v1a,é", "v1a," + base64.b64encode(b"short").decode(), ""],
)
def test_a_malformed_v1a_header_is_a_signature_error_only(header):
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(TS), "webhook-signature": header}
    with pytest.raises(SignatureError):
        verify(public_key(WHSK), headers, BODY, now_s=TS)


@pytest.mark.parametrize("key", ["whpk_", "whpk_not base64", "whpk_" + "A" * 5000, "whpk_AAAA"])
def test_a_malformed_public_key_is_a_signature_error_only(key):
    headers = webhook_headers([signing_key(WHSK)], MSG_ID, TS, BODY)
    with pytest.raises(SignatureError):
        verify(key, headers, BODY, now_s=TS)


def test_an_operators_secret_must_match_the_signing():
    assert validate(Signing.ED25519, WHSK) == WHSK
    with pytest.raises(InputError, match=r"^secret: must start with whsk_"):
        validate(Signing.ED25519, generate_secret())
    with pytest.raises(InputError, match=r"^secret: must be whsk_ followed by base64 of 32"):
        validate(Signing.ED25519, "whsk_" + base64.b64encode(b"k" * 31).decode())
    with pytest.raises(InputError, match=r"^secret: must start with whsec_"):
        validate(Signing.HMAC, WHSK)
