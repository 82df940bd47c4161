"""Standard Webhooks signatures (v1, HMAC-SHA256) and ``whsec_`` secrets.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the key is the base64-decoded
part of the ``whsec_`` secret. During a rotation every valid secret signs, and the header carries
the signatures separated by spaces: a Standard Webhooks verifier accepts if any one matches.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping

from delivery.errors import InputError, SignatureError

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
# An operator's secret: at least 24 random bytes (guessing is hopeless), at most 64 (HMAC-SHA256
# hashes a longer key first, so more adds nothing).
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
DEFAULT_TOLERANCE_S = 300


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


def sign(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<b64>`` per key, space-separated."""
    prefix = f"{msg_id}.{timestamp}.".encode()
    parts = []
    for key in keys:
        mac = hmac.new(key, prefix, hashlib.sha256)
        mac.update(body)
        parts.append("v1," + base64.b64encode(mac.digest()).decode())
    return " ".join(parts)


def webhook_headers(
    keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes
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
    """What a subscriber does: raise ``SignatureError`` unless a v1 signature matches.

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
    expected = sign([secret_key(secret)], msg_id, timestamp, body).split(",", 1)[1].encode()
    for candidate in header.split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return
    raise SignatureError("no matching signature")
