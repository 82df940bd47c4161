"""A controllable, recording, verifying webhook receiver on 127.0.0.1.

Used by the demo, the tests, the chaos suite and the benchmarks: it answers as told (status,
failure rate, delay, hang, ``Retry-After``), records every request, and verifies Standard
Webhooks signatures for the paths it knows a secret for.

    async with Receiver() as receiver:
        receiver.expect_secret("/hook", subscription.secret)
        receiver.set_behaviour("/hook", Behaviour(fail_rate=0.3, seed=7))
        ...  # point a subscription at receiver.url("/hook")
        await receiver.wait_for(lambda r: len(r.unique_ids("/hook")) == 100, 30, "100 events")

It sits in the hot path of the benchmarks, so a request costs one body read, one HMAC (when a
secret is registered) and a few appends: the read-side views (``delivered``, ``unique_ids``,
``duplicates``) come from indexes kept up to date as requests arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import orjson
from aiohttp import web

from delivery.errors import SignatureError
from delivery.signing import validate_verifying_key, verify

__all__ = ["Arrival", "Behaviour", "Receiver", "RefusingSubscriber", "scripted_subscriber"]

_ALL = ""  # index key for "every path" (real request paths always start with "/")


@dataclass(frozen=True)
class Behaviour:
    """How a path answers. Failures are drawn from ``random.Random(seed)``: repeatable."""

    status: int = 200
    fail_rate: float = 0.0  # fraction of requests answered with ``fail_status``
    fail_status: int = 500
    delay_s: float = 0.0
    hang: bool = False  # never answer, until the client gives up or the receiver stops
    retry_after: str | None = None  # ``Retry-After`` header sent with non-2xx answers
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], not {self.fail_rate}")
        if self.delay_s < 0:
            raise ValueError(f"delay_s must not be negative, not {self.delay_s}")


@dataclass(frozen=True, slots=True)
class Arrival:
    path: str
    webhook_id: str
    webhook_timestamp: str
    signature_header: str
    body: bytes
    arrived_at: float  # time.time() when the request was read
    status: int | None  # what we answered; None: never answered (hang, or the client gave up)
    signature_ok: bool | None  # None: no secret registered for the path
    traceparent: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class _PathState:
    behaviour: Behaviour = field(default_factory=Behaviour)
    rng: random.Random = field(default_factory=random.Random)


class Receiver:
    """``async with Receiver() as r``: an aiohttp server on ``host`` (port 0: a free one)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._paths: dict[str, _PathState] = {}
        self._secrets: dict[str, str] = {}
        self.arrivals: list[Arrival] = []
        # Indexes of 2xx answers, per path and for every path (key ``_ALL``).
        self._delivered: dict[str, list[Arrival]] = {_ALL: []}
        self._ok_ids: dict[str, Counter[str]] = {_ALL: Counter()}
        self._waiters: set[asyncio.Event] = set()
        # Requests being handled now, and the most seen at once, per path.
        self._open: Counter[str] = Counter()
        self._max_open: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # -- set-up -----------------------------------------------------------------------------

    async def __aenter__(self) -> Receiver:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        # handler_cancellation: a client that gives up (timeout) ends a hang or a delay at
        # once, recorded as never answered, instead of a handler lingering until shutdown.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://{self._host}:{self._port}{path}"

    def expect_secret(self, path: str, secret: str) -> None:
        """Verify requests to ``path`` against ``secret`` from now on: a ``whsec_`` secret (v1)
        or a ``whpk_`` public key (v1a)."""
        validate_verifying_key(secret)  # a malformed one fails here, not inside every request
        self._secrets[path] = secret

    def set_behaviour(self, path: str, behaviour: Behaviour) -> None:
        """Answer requests to ``path`` like this from now on (the failure sequence restarts)."""
        self._paths[path] = _PathState(behaviour, random.Random(behaviour.seed))

    # -- serving ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self._open[path] += 1
        self._max_open[path] = max(self._max_open[path], self._open[path])
        try:
            return await self._answer(request)
        finally:
            self._open[path] -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        arrived_at = time.time()
        path = request.path
        headers = request.headers
        secret = self._secrets.get(path)
        signature_ok: bool | None = None
        if secret is not None:
            try:
                verify(secret, headers, body, now_s=int(arrived_at))
                signature_ok = True
            except SignatureError:
                signature_ok = False

        def record(status: int | None) -> None:
            self._record(
                Arrival(
                    path,
                    headers.get("webhook-id", ""),
                    headers.get("webhook-timestamp", ""),
                    headers.get("webhook-signature", ""),
                    body,
                    arrived_at,
                    status,
                    signature_ok,
                    headers.get("traceparent"),
                )
            )

        state = self._paths.get(path)
        if state is None:  # no behaviour set: a healthy subscriber
            record(200)
            return web.Response(text="ok")
        behaviour = state.behaviour
        if behaviour.hang:
            record(None)
            await self._stopping.wait()
            raise web.HTTPServiceUnavailable
        # Decided at arrival, so the failure sequence follows arrival order even with delays.
        failed = behaviour.fail_rate > 0 and state.rng.random() < behaviour.fail_rate
        status = behaviour.fail_status if failed else behaviour.status
        if behaviour.delay_s > 0:
            try:
                await asyncio.sleep(behaviour.delay_s)
            except asyncio.CancelledError:  # the client gave up (or we are stopping)
                record(None)
                raise
        record(status)
        if 200 <= status < 300:
            return web.Response(status=status, text="ok")
        extra = {"retry-after": behaviour.retry_after} if behaviour.retry_after is not None else {}
        return web.Response(status=status, headers=extra, text="no")

    def _record(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        if arrival.delivered:
            path = arrival.path
            self._delivered[_ALL].append(arrival)
            self._ok_ids[_ALL][arrival.webhook_id] += 1
            if path not in self._delivered:
                self._delivered[path] = []
                self._ok_ids[path] = Counter()
            self._delivered[path].append(arrival)
            self._ok_ids[path][arrival.webhook_id] += 1
        for waiter in self._waiters:
            waiter.set()

    # -- reading ----------------------------------------------------------------------------

    def delivered(self, path: str | None = None) -> list[Arrival]:
        """Arrivals answered 2xx (optionally on one path), in the order they were answered."""
        return list(self._delivered.get(path or _ALL, ()))

    def delivered_count(self, path: str | None = None) -> int:
        """``len(delivered(path))`` without the copy (for predicates checked at every arrival)."""
        return len(self._delivered.get(path or _ALL, ()))

    def max_concurrent(self, path: str) -> int:
        """The most requests to ``path`` the receiver was handling at the same time."""
        return self._max_open[path]

    def unique_ids(self, path: str | None = None) -> set[str]:
        """The ``webhook-id`` values answered 2xx at least once."""
        return set(self._ok_ids.get(path or _ALL, ()))

    def unique_count(self, path: str | None = None) -> int:
        """``len(unique_ids(path))`` without the copy."""
        return len(self._ok_ids.get(path or _ALL, ()))

    def duplicates(self, path: str | None = None) -> dict[str, int]:
        """``webhook-id`` -> times answered 2xx, for the ids answered 2xx more than once."""
        counts = self._ok_ids.get(path or _ALL, Counter[str]())
        return {webhook_id: n for webhook_id, n in counts.items() if n > 1}

    async def wait_for(
        self, predicate: Callable[[Receiver], bool], timeout_s: float, what: str
    ) -> None:
        """Return once ``predicate(self)`` holds, re-checked after arrivals (at most once per
        turn of the event loop); ``TimeoutError`` naming ``what`` after ``timeout_s``."""
        if predicate(self):
            return
        arrived = asyncio.Event()
        self._waiters.add(arrived)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await arrived.wait()
                    arrived.clear()
                    if predicate(self):
                        return
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}") from None
        finally:
            self._waiters.discard(arrived)


@contextlib.asynccontextmanager
async def scripted_subscriber(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A subscriber that answers every POST with ``answer`` (what ``Receiver`` cannot say: a
    redirect with a ``Location``, a long body); yields its base URL."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class RefusingSubscriber:
    """An ``answer`` for ``scripted_subscriber``: 400 (a dead letter at once) to the events
    named in ``refused`` by (account, sequence), 200 otherwise; keeps what it answered 200, in
    order (what an ordered subscription's tests read)."""

    def __init__(self, refused: set[tuple[str, int]]) -> None:
        self.refused = refused
        self.delivered: list[tuple[str, int]] = []

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        key = (body["account_id"], body["sequence"])
        if key in self.refused:
            return web.Response(status=400, text="refused")
        self.delivered.append(key)
        return web.Response(text="ok")

    def of(self, account: str) -> list[int]:
        return [seq for acc, seq in self.delivered if acc == account]
