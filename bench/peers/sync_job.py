"""The peers' job written the way a Celery or Dramatiq task is: blocking psycopg + requests,
one connection and one HTTP session per worker thread (per process under prefork)."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import requests

from bench.peers.common import (
    HTTP_TIMEOUT_S,
    INBOX_SQL,
    RECORD_SQL,
    DeliveryFailed,
    PeerConfig,
)
from delivery.signing import secret_key, webhook_headers


class SyncJob:
    def __init__(self, config: PeerConfig) -> None:
        self._config = config
        self._keys = [secret_key(config.secret)]
        self._local = threading.local()

    def _resources(self) -> tuple[psycopg.Connection, requests.Session]:
        local = self._local
        # Created lazily in the process and thread that uses them (prefork children fork after
        # the app is imported, and a connection must not cross a fork).
        if getattr(local, "pid", None) != os.getpid():
            local.conn = psycopg.connect(self._config.database_url, autocommit=True)
            local.session = requests.Session()
            local.pid = os.getpid()
        return local.conn, local.session

    def __call__(self, event_id: str, body_text: str) -> None:
        conn, session = self._resources()
        body = body_text.encode()
        with conn.transaction():
            if conn.execute(INBOX_SQL, (event_id,)).rowcount == 0:
                return  # a redelivery of an event already delivered: ack, no second POST
            headers = webhook_headers(self._keys, event_id, int(time.time()), body)
            started = time.perf_counter()
            response = session.post(
                self._config.target_url, data=body, headers=headers, timeout=HTTP_TIMEOUT_S
            )
            if not 200 <= response.status_code < 300:
                raise DeliveryFailed(f"HTTP {response.status_code}")
            duration_ms = (time.perf_counter() - started) * 1000
            conn.execute(RECORD_SQL, (event_id, response.status_code, duration_ms))
