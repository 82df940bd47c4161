"""Signing secrets at rest: sealed with Fernet under ``DELIVERY_SECRETS_KEY``.

A stored secret describes itself: ``fernet:<token>`` is sealed, anything else (``whsec_...``,
``whsk_...``) is plaintext from before a key was set, and still reads. The first key seals,
every key opens (``MultiFernet``), so a key is rotated by adding the new one first, re-sealing
(``delivery secrets rotate-key``), then dropping the old one.

Opening is memoised per stored value: a worker loads its subscriptions for every batch, and a
sealed value never changes (a rotation writes a new token), so each is decrypted once per
process, never per attempt.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

SEALED_PREFIX = "fernet:"
KEYS_VARIABLE = "DELIVERY_SECRETS_KEY"
MAX_KEYS = 8  # old keys stay only while rows are re-sealed; more is a forgotten clean-up
_FERNET_KEY_BYTES = 32
# Distinct sealed values kept opened: two per subscription (current and previous secret).
_OPENED_CACHE = 65_536


def parse_keys(text: str) -> tuple[str, ...]:
    """``DELIVERY_SECRETS_KEY`` as keys, first one sealing; ``ValueError`` naming the bad one
    by position (never by value: it is a secret)."""
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if len(keys) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} comma-separated keys, not {len(keys)}")
    for position, key in enumerate(keys, 1):
        try:
            raw = base64.urlsafe_b64decode(key.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeError):
            raw = b""
        if len(raw) != _FERNET_KEY_BYTES:
            raise ValueError(
                f"key {position} is not a Fernet key (url-safe base64 of 32 bytes; "
                "make one with `delivery secrets generate-key`)"
            )
    return keys


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def is_sealed(stored: str) -> bool:
    return stored.startswith(SEALED_PREFIX)


class SecretBox:
    """Seals secrets before they are written and opens them when a row is loaded."""

    def __init__(self, keys: Sequence[str] = ()) -> None:
        self._first = Fernet(keys[0]) if keys else None
        self._all = MultiFernet([Fernet(k) for k in keys]) if keys else None
        self._open_token = functools.lru_cache(maxsize=_OPENED_CACHE)(self._decrypt)

    @classmethod
    def from_text(cls, text: str) -> SecretBox:
        return cls(parse_keys(text))

    @property
    def has_key(self) -> bool:
        return self._first is not None

    def seal(self, secret: str) -> str:
        """What to store: sealed under the first key, or as given when no key is set."""
        if self._first is None or is_sealed(secret):
            return secret
        return SEALED_PREFIX + self._first.encrypt(secret.encode()).decode("ascii")

    def open(self, stored: str) -> str:
        """The plaintext of a stored secret; a sealed one no key opens is returned as it is
        (signing then refuses it, naming ``DELIVERY_SECRETS_KEY``)."""
        if not is_sealed(stored):
            return stored
        return self._open_token(stored) or stored

    def opens(self, stored: str) -> bool:
        return not is_sealed(stored) or self._open_token(stored) is not None

    def reseal(self, stored: str) -> str | None:
        """``stored`` sealed under the first key, or ``None`` when it already is (or when no
        key opens it: ``opens`` tells the two apart)."""
        assert self._first is not None, "reseal needs a key"
        if not is_sealed(stored):
            return self.seal(stored)
        token = stored.removeprefix(SEALED_PREFIX).encode("ascii")
        try:
            self._first.decrypt(token)
        except InvalidToken:
            plaintext = self._open_token(stored)
            return None if plaintext is None else self.seal(plaintext)
        return None

    def _decrypt(self, stored: str) -> str | None:
        if self._all is None:
            return None
        try:
            return self._all.decrypt(stored.removeprefix(SEALED_PREFIX).encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            return None


NO_KEYS = SecretBox()
