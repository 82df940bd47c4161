"""A controllable, recording, verifying webhook receiver on 127.0.0.1.

Used by the demo, the tests, the chaos suite and the benchmarks: it answers as told (status,
failure rate, delay, hang, ``Retry-After``), records every request, and verifies Standard
Webhooks signatures for the paths it knows a secret for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from delivery.signing import SignatureError, verify


@dataclass(frozen=True)
class Behaviour:
    status: int = 200
    fail_rate: float = 0.0  # fraction of requests answered with ``fail_status``
    fail_status: int = 500
    delay_s: float = 0.0
    hang: bool = False  # never answer (until the client gives up or the receiver stops)
    retry_after: str | None = None  # sent with failures
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    path: str
    webhook_id: str
    webhook_timestamp: str
    signature_header: str
    body: bytes
    arrived_at: float
    status: int | None  # what we answered; None while hanging
    signature_ok: bool | None  # None: no secret registered for the path
    traceparent: str | None = None


@dataclass
class _PathState:
    behaviour: Behaviour = field(default_factory=Behaviour)
    rng: random.Random = field(default_factory=random.Random)


def _ids(request: web.Request) -> tuple[str, str, str]:
    headers = request.headers
    return (
        headers.get("webhook-id", ""),
        headers.get("webhook-timestamp", ""),
        headers.get("webhook-signature", ""),
    )


class Receiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._paths: dict[str, _PathState] = {}
        self._secrets: dict[str, str] = {}
        self.arrivals: list[Arrival] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    # -- set-up -----------------------------------------------------------------------------

    async def __aenter__(self) -> Receiver:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
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

    @property
    def port(self) -> int:
        return self._port

    def url(self, path: str = "/hook") -> str:
        return f"http://{self._host}:{self._port}{path}"

    def expect_secret(self, path: str, secret: str) -> None:
        self._secrets[path] = secret

    def set_behaviour(self, path: str, behaviour: Behaviour) -> None:
        state = self._paths.setdefault(path, _PathState())
        state.behaviour = behaviour
        state.rng = random.Random(behaviour.seed)

    # -- serving ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = request.path
        state = self._paths.get(path)
        behaviour = state.behaviour if state is not None else Behaviour()
        secret = self._secrets.get(path)
        signature_ok: bool | None = None
        if secret is not None:
            try:
                verify(secret, request.headers, body, now_s=int(time.time()))
                signature_ok = True
            except SignatureError:
                signature_ok = False
        arrived_at = time.time()
        if behaviour.hang:
            await self._record(Arrival(path, *_ids(request), body, arrived_at, None, signature_ok))
            await self._stopping.wait()
            raise web.HTTPServiceUnavailable
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        failed = (
            state is not None
            and behaviour.fail_rate > 0
            and (state.rng.random() < behaviour.fail_rate)
        )
        status = behaviour.fail_status if failed else behaviour.status
        extra = {}
        if behaviour.retry_after is not None and not 200 <= status < 300:
            extra["retry-after"] = behaviour.retry_after
        await self._record(
            Arrival(
                path,
                *_ids(request),
                body,
                arrived_at,
                status,
                signature_ok,
                request.headers.get("traceparent"),
            )
        )
        return web.Response(status=status, headers=extra, text="ok" if status < 300 else "no")

    async def _record(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        async with self._changed:
            self._changed.notify_all()

    # -- reading ----------------------------------------------------------------------------

    def delivered(self, path: str | None = None) -> list[Arrival]:
        """Arrivals answered 2xx (optionally on one path)."""
        return [
            a
            for a in self.arrivals
            if a.status is not None and 200 <= a.status < 300 and (path is None or a.path == path)
        ]

    def unique_ids(self, path: str | None = None) -> set[str]:
        return {a.webhook_id for a in self.delivered(path)}

    def duplicates(self, path: str | None = None) -> dict[str, int]:
        counts = Counter(a.webhook_id for a in self.delivered(path))
        return {k: v for k, v in counts.items() if v > 1}

    async def wait_for(
        self, predicate: Callable[[Receiver], bool], *, timeout_s: float, what: str
    ) -> None:
        """Return once ``predicate(self)`` holds; re-checked at every arrival."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: predicate(self))
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}") from None
