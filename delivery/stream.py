"""The reference live-stream client: balances rebuilt from a snapshot plus the stream after it.

    async with BalanceStream(url, key, ["acc_42"]) as stream:
        async for event in stream:               # every event, per account 1, 2, 3, ... once
            print(event["sequence"], stream.balances("acc_42"))

For each account it reads ``GET /v1/accounts/{id}/balances`` (sequence N) once, then follows
``GET /v1/stream`` ``after`` N. When the connection ends (4008 fell behind, 1001 the server is
stopping, 1011 a server error, 1013 too many clients, or the network is lost or silent for
``silence_timeout_s``) it connects again after a bounded backoff and resumes ``after`` the last
sequence it applied, so nothing is missed and nothing is applied twice. A refusal that trying
again cannot mend (a bad key, a key without ``read``, a subscribe message the server refused)
raises ``StreamRefusedError`` from the iterator and from ``caught_up``.

The connection runs in one task owned by the ``async with`` block. Events are applied as they
arrive whether or not anyone iterates; once someone iterates, the iterator is fed through a
bounded queue, so a consumer slower than the stream slows the connection, and the server's
4008 plus the resume ``after`` keeps that correct.

The client is aiohttp's (already a dependency of the platform): the reference client adds no
package. The acceptance tests speak to the same server through the ``websockets`` library too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import structlog

from delivery.api.stream_protocol import CLOSE_BAD_SUBSCRIBE
from delivery.errors import StreamRefusedError

log = structlog.get_logger("delivery.stream")

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
# Three missed heartbeats (the server sends one at least every 15 s) mean a dead connection.
SILENCE_TIMEOUT_S = 45.0
ITERATOR_QUEUE_EVENTS = 1_000
_ENDED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
_END = object()  # put on the iterator's queue when the connection task has ended


def backoff_s(attempt: int, *, initial_s: float, max_s: float, rng: random.Random) -> float:
    """The delay before reconnect ``attempt`` (1, 2, ...): doubling from ``initial_s``, capped
    at ``max_s``, with full jitter in its upper half so many clients do not return at once."""
    ceiling = min(max_s, initial_s * (1 << min(attempt - 1, 32)))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass
class AccountState:
    """One account as the client has rebuilt it: balances as of ``sequence``."""

    sequence: int = 0
    balances: dict[str, Decimal] = field(default_factory=dict)

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply the account's next event; False for one already applied (not applied again)."""
        sequence = int(event["sequence"])
        if sequence <= self.sequence:
            return False
        self.sequence = sequence
        if event["type"] == "account.balance_changed":
            data = event["data"]
            self.balances[str(data["asset"])] = Decimal(str(data["balance"]))
        return True


class _Gap(Exception):
    """An event came after a sequence the client never saw: resume from the last one applied."""


class BalanceStream:
    """Follow ``accounts`` on the API at ``url`` with ``key`` (a key with ``read``)."""

    def __init__(
        self,
        url: str,
        key: str,
        accounts: Sequence[str],
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        silence_timeout_s: float = SILENCE_TIMEOUT_S,
        rng: random.Random | None = None,
    ) -> None:
        if not accounts:
            raise ValueError("follow at least one account")
        self._url = url
        self._key = key
        self._accounts = list(dict.fromkeys(accounts))
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._silence_timeout_s = silence_timeout_s
        self._rng = rng or random.Random()
        self._states = {a: AccountState() for a in self._accounts}
        self._changed = asyncio.Condition()
        self._queue: asyncio.Queue[object] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self.connections = 0  # WebSocket sessions opened: 1 + the reconnects
        self.close_codes: list[int | None] = []  # how each session ended (None: network)

    # -- what the caller reads ---------------------------------------------------------------

    def balances(self, account_id: str) -> dict[str, Decimal]:
        """The account's balances as of ``last_sequence(account_id)`` (a copy)."""
        return dict(self._states[account_id].balances)

    def last_sequence(self, account_id: str) -> int:
        return self._states[account_id].sequence

    async def caught_up(self, sequences: Mapping[str, int], *, timeout_s: float) -> None:
        """Wait until each account has applied at least its sequence in ``sequences``;
        ``TimeoutError`` after ``timeout_s``, ``StreamRefusedError`` if the server refused."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._failure is not None
                    or all(self.last_sequence(a) >= n for a, n in sequences.items())
                )
            )
        self._raise_failure()

    # -- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> BalanceStream:
        self._http = aiohttp.ClientSession(
            base_url=self._url, headers={"Authorization": f"Bearer {self._key}"}
        )
        try:
            for account in self._accounts:
                await self._snapshot(account)
        except BaseException:
            await self._http.close()
            raise
        self._task = asyncio.create_task(self._run(), name="delivery.stream")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._queue is None:
            self._queue = asyncio.Queue(ITERATOR_QUEUE_EVENTS)
            if self._task is not None and self._task.done():
                self._queue.put_nowait(_END)
        return self._iterate(self._queue)

    async def _iterate(self, queue: asyncio.Queue[object]) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await queue.get()
            if item is _END:
                self._raise_failure()
                return
            assert isinstance(item, dict)
            yield item

    # -- the connection ----------------------------------------------------------------------

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _snapshot(self, account: str) -> None:
        assert self._http is not None
        async with self._http.get(f"/v1/accounts/{account}/balances") as answer:
            if answer.status == 404:  # nothing published yet: start from sequence 0
                return
            if answer.status in (401, 403):
                raise StreamRefusedError(f"balances of {account}: HTTP {answer.status}")
            answer.raise_for_status()
            snap = await answer.json()
        self._states[account] = AccountState(
            sequence=int(snap["sequence"]),
            balances={asset: Decimal(v) for asset, v in snap["balances"].items()},
        )

    async def _run(self) -> None:
        attempt = 0
        try:
            while True:
                applied_before = sum(s.sequence for s in self._states.values())
                code = await self._session()
                self.close_codes.append(code)
                if sum(s.sequence for s in self._states.values()) > applied_before:
                    attempt = 0  # progress was made: the next failure starts the backoff anew
                attempt += 1
                delay_s = backoff_s(
                    attempt,
                    initial_s=self._backoff_initial_s,
                    max_s=self._backoff_max_s,
                    rng=self._rng,
                )
                log.info("stream.reconnecting", close_code=code, delay_s=round(delay_s, 3))
                await asyncio.sleep(delay_s)
        except StreamRefusedError as exc:
            self._failure = exc
        except Exception as exc:  # a frame we cannot read: end the waits, not hang them
            log.exception("stream.failed")
            self._failure = exc
        finally:
            async with self._changed:
                self._changed.notify_all()
            if self._queue is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    self._queue.put_nowait(_END)

    async def _session(self) -> int | None:
        """One WebSocket session, resuming after what was applied; its close code, or None
        when the network failed or went silent."""
        assert self._http is not None
        subscribe = {
            "op": "subscribe",
            "accounts": self._accounts,
            "after": {a: s.sequence for a, s in self._states.items()},
        }
        try:
            async with self._http.ws_connect("/v1/stream", heartbeat=None) as ws:
                self.connections += 1
                await ws.send_str(orjson.dumps(subscribe).decode())
                while True:
                    # Silence longer than a few heartbeats is a lost connection: TimeoutError.
                    msg = await ws.receive(timeout=self._silence_timeout_s)
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        await self._frame(orjson.loads(msg.data))
                    elif msg.type in _ENDED:
                        break
                if ws.close_code == CLOSE_BAD_SUBSCRIBE:
                    raise StreamRefusedError("the server refused the subscribe message (4400)")
                return ws.close_code
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise StreamRefusedError(f"stream: HTTP {exc.status}") from None
            return None
        except _Gap:
            log.warning("stream.gap", accounts=len(self._accounts))
            return None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def _frame(self, obj: dict[str, Any]) -> None:
        if obj.get("op") == "heartbeat":
            return
        state = self._states.get(obj.get("account_id", ""))
        if state is None:
            return
        if int(obj["sequence"]) > state.sequence + 1:
            raise _Gap
        if not state.apply(obj):
            return
        async with self._changed:
            self._changed.notify_all()
        if self._queue is not None:
            await self._queue.put(obj)
