"""Standard Webhooks signatures: ``v1`` (HMAC-SHA256, ``whsec_`` secrets) and ``v1a`` (Ed25519).

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}`` for both. ``v1``: the key is the
base64-decoded part of the ``whsec_`` secret. ``v1a``: the platform keeps ``whsk_`` + base64 of
the 32-byte Ed25519 private seed and the subscriber verifies with ``whpk_`` + base64 of the
32-byte raw public key. During a rotation every valid secret signs, and the header carries the
signatures separated by spaces: a Standard Webhooks verifier accepts if any one matches.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from enum import StrEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from delivery.errors import InputError, SignatureError

SECRET_PREFIX = "whsec_"
PRIVATE_KEY_PREFIX = "whsk_"
PUBLIC_KEY_PREFIX = "whpk_"
ED25519_KEY_BYTES = 32
SECRET_BYTES = 32
# An operator's secret: at least 24 random bytes (guessing is hopeless), at most 64 (HMAC-SHA256
# hashes a longer key first, so more adds nothing).
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
DEFAULT_TOLERANCE_S = 300
# Parsed Ed25519 keys kept per secret: deriving one costs a scalar multiplication, which an
# attempt need not pay again.
_PARSED_KEYS = 4096

SigningKey = bytes | Ed25519PrivateKey  # an HMAC key (v1) or an Ed25519 private key (v1a)


class Signing(StrEnum):
    """How a subscription signs: the column ``subscriptions.signing``."""

    HMAC = "hmac"  # v1, whsec_ secrets
    ED25519 = "ed25519"  # v1a, whsk_ secret keys and whpk_ public keys


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ``InputError`` if it is not valid base64."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("secret: must be whsec_ followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise InputError(f"secret: must hold at least {MIN_SECRET_BYTES} random bytes")
    return key


def validate_secret(secret: str) -> str:
    """A secret an operator gives: ``whsec_`` + base64 of 24 to 64 bytes, or ``InputError``."""
    if not secret.startswith(SECRET_PREFIX):
        raise InputError("secret: must start with whsec_")
    if len(secret) > len(SECRET_PREFIX) + 4 * MAX_SECRET_BYTES:  # before decoding a huge one
        raise InputError(f"secret: must hold at most {MAX_SECRET_BYTES} bytes")
    if len(secret_key(secret)) > MAX_SECRET_BYTES:
        raise InputError(f"secret: must hold at most {MAX_SECRET_BYTES} bytes")
    return secret


def generate_private_key() -> str:
    """A new ``whsk_`` secret key: base64 of a random 32-byte Ed25519 seed."""
    seed = Ed25519PrivateKey.generate().private_bytes_raw()
    return PRIVATE_KEY_PREFIX + base64.b64encode(seed).decode()


def _key_bytes(text: str, prefix: str, what: str) -> bytes:
    if not (isinstance(text, str) and text.startswith(prefix)):
        raise InputError(f"{what}: must start with {prefix}")
    encoded = text.removeprefix(prefix)
    if len(encoded) > 4 * ED25519_KEY_BYTES:  # before decoding a huge one
        raise InputError(f"{what}: must be {prefix} followed by base64 of 32 bytes")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != ED25519_KEY_BYTES:
        raise InputError(f"{what}: must be {prefix} followed by base64 of 32 bytes")
    return raw


@functools.lru_cache(maxsize=_PARSED_KEYS)
def private_key(secret: str) -> Ed25519PrivateKey:
    """The Ed25519 key of a ``whsk_`` secret key; ``InputError`` if it is not one."""
    return Ed25519PrivateKey.from_private_bytes(_key_bytes(secret, PRIVATE_KEY_PREFIX, "secret"))


def public_key(secret: str) -> str:
    """The ``whpk_`` public key a subscriber verifies with, from the ``whsk_`` secret key."""
    raw = private_key(secret).public_key().public_bytes_raw()
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def validate_verifying_key(key: str) -> str:
    """What a subscriber verifies with: a ``whsec_`` secret or a ``whpk_`` public key."""
    if isinstance(key, str) and key.startswith(PUBLIC_KEY_PREFIX):
        _key_bytes(key, PUBLIC_KEY_PREFIX, "public key")
    else:
        secret_key(key)
    return key


def generate(signing: Signing) -> str:
    return generate_private_key() if signing == Signing.ED25519 else generate_secret()


def validate(signing: Signing, secret: str) -> str:
    """A secret an operator gives for a subscription signing this way, or ``InputError``."""
    if signing == Signing.ED25519:
        private_key(secret)
        return secret
    return validate_secret(secret)


def signing_key(secret: str) -> SigningKey:
    """What signs with a stored (opened) secret: an HMAC key or an Ed25519 key."""
    if secret.startswith(PRIVATE_KEY_PREFIX):
        return private_key(secret)
    return secret_key(secret)


def sign(keys: Iterable[SigningKey], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<b64>`` per HMAC key and one
    ``v1a,<b64>`` per Ed25519 key, space-separated."""
    prefix = f"{msg_id}.{timestamp}.".encode()
    parts = []
    for key in keys:
        if isinstance(key, Ed25519PrivateKey):
            parts.append(_sign_v1a(key, prefix, body))
            continue
        mac = hmac.new(key, prefix, hashlib.sha256)
        mac.update(body)
        parts.append("v1," + base64.b64encode(mac.digest()).decode())
    return " ".join(parts)


def sign_v1a(keys: Iterable[Ed25519PrivateKey], msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1a,<base64 Ed25519 signature of "{msg_id}.{timestamp}.{body}">`` per key."""
    return sign(keys, msg_id, timestamp, body)


def _sign_v1a(key: Ed25519PrivateKey, prefix: bytes, body: bytes) -> str:
    return "v1a," + base64.b64encode(key.sign(prefix + body)).decode()


def webhook_headers(
    keys: Iterable[SigningKey], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, msg_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: int,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> None:
    """What a subscriber does: raise ``SignatureError`` unless a signature matches: a ``v1``
    one given a ``whsec_`` secret, a ``v1a`` one given a ``whpk_`` public key.

    It raises nothing else, whatever it is given (a bad secret, odd header types, non-ASCII
    signatures), so a receiver answers 401 to any malformed request, never a 500."""
    try:
        _verify(secret, headers, body, now_s=now_s, tolerance_s=tolerance_s)
    except SignatureError:
        raise
    except Exception as exc:
        raise SignatureError(f"malformed webhook or secret ({type(exc).__name__})") from None


def _verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now_s: int, tolerance_s: int
) -> None:
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        stamp = lowered["webhook-timestamp"]
        header = lowered["webhook-signature"]
    except KeyError:
        raise SignatureError("missing webhook headers") from None
    if not (isinstance(stamp, str) and stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise SignatureError("malformed webhook-timestamp")
    timestamp = int(stamp)
    if abs(now_s - timestamp) > tolerance_s:
        raise SignatureError("timestamp outside tolerance")
    if secret.startswith(PUBLIC_KEY_PREFIX):
        _verify_v1a(secret, header, f"{msg_id}.{timestamp}.".encode() + body)
        return
    expected = sign([secret_key(secret)], msg_id, timestamp, body).split(",", 1)[1].encode()
    for candidate in header.split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return
    raise SignatureError("no matching signature")


def _verify_v1a(public: str, header: str, signed: bytes) -> None:
    key = Ed25519PublicKey.from_public_bytes(_key_bytes(public, PUBLIC_KEY_PREFIX, "public key"))
    for candidate in header.split(" "):
        version, _, signature = candidate.partition(",")
        if version != "v1a":
            continue
        try:
            key.verify(base64.b64decode(signature, validate=True), signed)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return
    raise SignatureError("no matching signature")
