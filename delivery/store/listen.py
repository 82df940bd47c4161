"""LISTEN on a dedicated connection, kept open across faults.

Three loops wait on NOTIFY (the relay and the API's stream feed on the outbox, dispatch's
subscription index on subscription changes); this is the one place that keeps their connection.
The traps it exists for (PITFALLS.md, asyncpg): a pooled connection runs ``UNLISTEN *`` when
released, so LISTEN needs a connection of its own; a lost connection must LISTEN again on a new
one; and whatever was notified while none listened is lost, so each time LISTEN takes effect the
caller is told to resync (read what it may have missed), the first time included.

    listener = Listener(url, {"delivery_outbox": on_payload}, resync=on_resync, name="relay")
    tg.create_task(listener.run(stop))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import asyncpg
import structlog

from delivery.aio import backoff_s, wait_any

log = structlog.get_logger("delivery.listen")

CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
# A link cut without a FIN or RST (a blackhole) never fires the termination callback; a fresh
# connection now and then bounds how long such a listener can stay deaf.
RECONNECT_EVERY_S = 3600.0
# Between failed attempts; the first retry comes quickly (a backend terminated by hand), later
# ones no slower than the fixed 2 s this replaced.
_BACKOFF_BASE_S = 0.25
_BACKOFF_MAX_S = 2.0

START = "start"
RECONNECT = "reconnect"


class Listener:
    """One dedicated LISTEN connection on ``channels`` until ``stop``.

    ``channels`` maps a channel to the handler of its payloads (called on the event loop; it must
    not block). ``resync(reason)`` is called each time LISTEN has taken effect, with ``START`` the
    first time and ``RECONNECT`` after a lost connection: anything committed before that moment
    was not notified to this listener, so the caller reads it now.
    """

    def __init__(
        self,
        database_url: str,
        channels: Mapping[str, Callable[[str], None]],
        *,
        resync: Callable[[str], None],
        name: str,
    ) -> None:
        self._database_url = database_url
        self._channels = dict(channels)
        self._resync = resync
        self._name = name
        self._listening = False

    @property
    def listening(self) -> bool:
        """True while a connection is LISTENing (notifications are arriving as they are sent)."""
        return self._listening

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        first = True
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._database_url, timeout=CONNECT_TIMEOUT_S)
            except Exception as exc:
                failures += 1
                log.warning("listen_connect_failed", listener=self._name, error=repr(exc)[:200])
                await wait_any(
                    stop,
                    timeout_s=backoff_s(failures, base_s=_BACKOFF_BASE_S, max_s=_BACKOFF_MAX_S),
                )
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: self._on_lost(lost))
                for channel, handler in self._channels.items():
                    await conn.add_listener(channel, _payload_to(handler))
                self._listening = True
                failures = 0
                self._resync(START if first else RECONNECT)
                first = False
                await wait_any(stop, lost, timeout_s=RECONNECT_EVERY_S)
            except Exception as exc:  # the link was cut while setting up: listen again
                failures += 1
                log.warning("listen_failed", listener=self._name, error=repr(exc)[:200])
                await wait_any(
                    stop,
                    timeout_s=backoff_s(failures, base_s=_BACKOFF_BASE_S, max_s=_BACKOFF_MAX_S),
                )
            finally:
                self._listening = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)

    def _on_lost(self, lost: asyncio.Event) -> None:
        self._listening = False
        lost.set()


def _payload_to(
    handler: Callable[[str], None],
) -> Callable[[object, int, str, str], None]:
    def on_notification(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        handler(payload)

    return on_notification
