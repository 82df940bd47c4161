"""What every peer shares: its configuration (read once from the environment at start-up), the
two tables of its job, and the SQL it runs.

The job, identical in every peer, per message, in one PostgreSQL transaction:

1. ``INSERT INTO bench_inbox (event_id) ... ON CONFLICT DO NOTHING`` - a redelivered event finds
   its row and is acked without a second POST;
2. POST the body signed with Standard Webhooks headers (``delivery.signing``);
3. ``INSERT INTO bench_deliveries`` - a row per delivery with status and duration;
4. COMMIT, then ack. A failed POST rolls back (the inbox row goes too) and the message is not
   acked, so it is delivered again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_DATABASE_URL = "BENCH_DATABASE_URL"
ENV_AMQP_URL = "BENCH_AMQP_URL"
ENV_QUEUE = "BENCH_QUEUE"
ENV_TARGET_URL = "BENCH_TARGET_URL"
ENV_SECRET = "BENCH_SECRET"  # noqa: S105 (a variable name, not a secret)
ENV_CONCURRENCY = "BENCH_CONCURRENCY"
ENV_PREFETCH = "BENCH_PREFETCH"

SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_inbox (
    event_id    text PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     text        NOT NULL,
    status       int         NOT NULL,
    duration_ms  float8      NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now()
);
"""

# psycopg placeholders; the asyncio peer rewrites them as $1.. for asyncpg.
INBOX_SQL = "INSERT INTO bench_inbox (event_id) VALUES (%s) ON CONFLICT DO NOTHING"
RECORD_SQL = "INSERT INTO bench_deliveries (event_id, status, duration_ms) VALUES (%s, %s, %s)"
COUNT_SQL = "SELECT count(*) FROM bench_deliveries"

HTTP_TIMEOUT_S = 30.0


class DeliveryFailed(Exception):
    """The subscriber did not answer 2xx: roll back, do not ack, let the broker redeliver."""


@dataclass(frozen=True)
class PeerConfig:
    database_url: str
    amqp_url: str
    queue: str
    target_url: str
    secret: str
    concurrency: int
    prefetch: int

    @classmethod
    def from_env(cls) -> PeerConfig:
        env = os.environ
        return cls(
            database_url=env[ENV_DATABASE_URL],
            amqp_url=env[ENV_AMQP_URL],
            queue=env[ENV_QUEUE],
            target_url=env[ENV_TARGET_URL],
            secret=env[ENV_SECRET],
            concurrency=int(env.get(ENV_CONCURRENCY, "32")),
            prefetch=int(env.get(ENV_PREFETCH, "100")),
        )

    def env(self) -> dict[str, str]:
        return {
            ENV_DATABASE_URL: self.database_url,
            ENV_AMQP_URL: self.amqp_url,
            ENV_QUEUE: self.queue,
            ENV_TARGET_URL: self.target_url,
            ENV_SECRET: self.secret,
            ENV_CONCURRENCY: str(self.concurrency),
            ENV_PREFETCH: str(self.prefetch),
        }
