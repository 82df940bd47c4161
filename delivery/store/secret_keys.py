"""The stored secrets against ``DELIVERY_SECRETS_KEY``: the start-up check of every process that
signs or shows secrets, and ``delivery secrets rotate-key``.

A process refuses to start (``ConfigError``, exit 2, naming the variable) when a stored secret is
sealed and no given key opens it: running on would fail every attempt of those subscriptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from delivery.errors import ConfigError
from delivery.secrets import KEYS_VARIABLE, SEALED_PREFIX, SecretBox
from delivery.settings import Settings

_SEALED = f"""
SELECT id, secret, previous_secret FROM delivery.subscriptions
WHERE state <> 'removed'
  AND (secret LIKE '{SEALED_PREFIX}%' OR previous_secret LIKE '{SEALED_PREFIX}%')
"""
# Removed subscriptions too: their rows keep a secret, which an operator without the key must
# not read either.
_ALL_FOR_UPDATE = """
SELECT id, secret, previous_secret FROM delivery.subscriptions ORDER BY id FOR UPDATE
"""
_WRITE = "UPDATE delivery.subscriptions SET secret = $2, previous_secret = $3 WHERE id = $1"
_NAMED = 3  # subscriptions named in a refusal; the count says the rest


@dataclass(frozen=True, slots=True)
class Resealed:
    sealed: int  # plaintext secrets sealed for the first time
    resealed: int  # sealed secrets moved to the first key

    def as_dict(self) -> dict[str, int]:
        return {"sealed": self.sealed, "resealed": self.resealed}


async def open_box(conn: asyncpg.Connection, settings: Settings) -> SecretBox:
    """The process's ``SecretBox``, once it opens every stored secret (each opened here, so
    the first batch pays nothing); ``ConfigError`` naming ``DELIVERY_SECRETS_KEY`` if not."""
    box = SecretBox.from_text(settings.secrets_key.get_secret_value())
    rows = await conn.fetch(_SEALED)
    _refuse_unopened(box, rows)
    return box


def _refuse_unopened(box: SecretBox, rows: list[asyncpg.Record]) -> None:
    unopened = [
        r["id"]
        for r in rows
        if not box.opens(r["secret"])
        or (r["previous_secret"] is not None and not box.opens(r["previous_secret"]))
    ]
    if not unopened:
        return
    named = ", ".join(unopened[:_NAMED]) + (" ..." if len(unopened) > _NAMED else "")
    if not box.has_key:
        raise ConfigError(
            f"{KEYS_VARIABLE} is not set, and the secrets of {len(unopened)} subscription(s)"
            f" are sealed ({named}): set it to the key they were sealed with"
        )
    raise ConfigError(
        f"{KEYS_VARIABLE}: no given key opens the secrets of {len(unopened)} subscription(s)"
        f" ({named}): add the key they were sealed with"
    )


async def rotate_key(conn: asyncpg.Connection, box: SecretBox) -> Resealed:
    """Seal every plaintext secret and move every sealed one to the first key, in one
    transaction (all or nothing; rows are locked meanwhile, reads are not blocked)."""
    if not box.has_key:
        raise ConfigError(f"{KEYS_VARIABLE} is not set: rotate-key seals under its first key")
    sealed = resealed = 0
    async with conn.transaction():
        rows = await conn.fetch(_ALL_FOR_UPDATE)
        _refuse_unopened(box, rows)  # before anything is written
        writes = []
        for row in rows:
            values = []
            for stored in (row["secret"], row["previous_secret"]):
                new = None if stored is None else box.reseal(stored)
                if new is not None:
                    if stored.startswith(SEALED_PREFIX):
                        resealed += 1
                    else:
                        sealed += 1
                values.append(new or stored)
            if values != [row["secret"], row["previous_secret"]]:
                writes.append((row["id"], *values))
        await conn.executemany(_WRITE, writes)
    return Resealed(sealed=sealed, resealed=resealed)
