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
    if len(key) < 24:
        raise InputError("secret: must hold at least 24 random bytes")
    return key


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
    """What a subscriber does: raise ``SignatureError`` unless a v1 signature matches."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        header = lowered["webhook-signature"]
    except (KeyError, ValueError):
        raise SignatureError("missing or malformed webhook headers") from None
    if abs(now_s - timestamp) > tolerance_s:
        raise SignatureError("timestamp outside tolerance")
    expected = sign([secret_key(secret)], msg_id, timestamp, body).split(",", 1)[1]
    for candidate in header.split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return
    raise SignatureError("no matching signature")
