"""A TCP fault proxy: what toxiproxy does, in one asyncio module.

Every client connection gets its own upstream connection; bytes flow through two ``_Pipe``s
(client -> upstream, upstream -> client) that apply the proxy's current faults:

* ``cut()``       close every open connection (FIN, unsent bytes dropped);
* ``reset()``     abort every open connection with RST (``SO_LINGER`` 0);
* ``stall()``     stop forwarding in both directions (bytes wait; the senders' buffers fill up),
                  and hold new connections without connecting them upstream; ``resume()`` ends it;
* ``set_latency(ms)``        delay every chunk by ``ms`` in each direction;
* ``set_bandwidth(bytes/s)`` a token bucket per connection and direction;
* ``refuse()`` / ``accept()`` stop or start listening (new connections get ECONNREFUSED).

Bytes are never dropped or altered inside a live connection: that breaks the protocol instead
of simulating a network fault. Flow control is end to end: a pipe that holds too much, or whose
sink cannot take more, pauses reading its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from dataclasses import dataclass
from typing import cast

__all__ = ["FaultProxy", "ProxyStats"]

HOST = "127.0.0.1"
_HIGH_WATER_BYTES = 1 << 20
_LOW_WATER_BYTES = 1 << 18
_CONNECT_TIMEOUT_S = 10.0


@dataclass
class ProxyStats:
    accepted: int = 0
    upstream_failures: int = 0
    cuts: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Pipe:
    """One direction of one connection: source transport -> sink transport, shaped."""

    def __init__(self, proxy: FaultProxy, link: _Link, *, upstream: bool) -> None:
        self._proxy = proxy
        self._link = link
        self._upstream = upstream
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self._queue: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._sink_paused = False
        self._source_paused = False

    # -- input ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        proxy = self._proxy
        if self._upstream:
            proxy.stats.bytes_up += len(data)
        else:
            proxy.stats.bytes_down += len(data)
        if not self._queue and self._can_pass_through():
            assert self.sink is not None
            self.sink.write(data)
            return
        self._queue.append((proxy.loop.time() + proxy.latency_s, data))
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER_BYTES:
            self._pause_source()
        self.pump()

    def _can_pass_through(self) -> bool:
        p = self._proxy
        return (
            self.sink is not None
            and not p.stalled
            and p.latency_s == 0
            and p.bandwidth_bps is None
            and not self._sink_paused
        )

    # -- output -----------------------------------------------------------------------------

    def pump(self) -> None:
        """Forward whatever is due now; schedule the next pump for what is not."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        proxy = self._proxy
        if self.sink is None or proxy.stalled or self._sink_paused or self._link.closed:
            return
        now = proxy.loop.time()
        while self._queue:
            due_at, data = self._queue[0]
            if due_at > now:
                self._timer = proxy.loop.call_at(due_at, self.pump)
                break
            allowed = self._allowance(now, len(data))
            if allowed == 0:
                wait_s = (min(len(data), 4096) - self._tokens) / (proxy.bandwidth_bps or 1)
                self._timer = proxy.loop.call_later(max(wait_s, 0.001), self.pump)
                break
            if allowed < len(data):
                self._queue[0] = (due_at, data[allowed:])
                data = data[:allowed]
            else:
                self._queue.popleft()
            self._buffered -= len(data)
            self.sink.write(data)
            if self._sink_paused:
                break
        if self._buffered < _LOW_WATER_BYTES:
            self._resume_source()

    def _allowance(self, now: float, wanted: int) -> int:
        rate = self._proxy.bandwidth_bps
        if rate is None:
            return wanted
        burst = max(rate / 10.0, 1024.0)
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        allowed = min(wanted, int(self._tokens))
        self._tokens -= allowed
        return allowed

    # -- flow control -----------------------------------------------------------------------

    def sink_paused(self) -> None:
        self._sink_paused = True
        self._pause_source()

    def sink_resumed(self) -> None:
        self._sink_paused = False
        self.pump()
        if self._buffered < _LOW_WATER_BYTES:
            self._resume_source()

    def _pause_source(self) -> None:
        if self.source is not None and not self._source_paused:
            self._source_paused = True
            with contextlib.suppress(RuntimeError, AttributeError):
                self.source.pause_reading()

    def _resume_source(self) -> None:
        if self.source is not None and self._source_paused and not self._sink_paused:
            self._source_paused = False
            with contextlib.suppress(RuntimeError, AttributeError):
                self.source.resume_reading()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._buffered = 0


class _Link:
    """One proxied connection: the client's transport, the upstream's, and two pipes."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.up = _Pipe(proxy, self, upstream=True)
        self.down = _Pipe(proxy, self, upstream=False)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.closed = False
        self.upstream_wanted = False

    def client_connected(self, transport: asyncio.Transport) -> None:
        self.client = transport
        self.up.source = transport
        self.down.sink = transport
        self.proxy.stats.accepted += 1
        self.proxy.links.add(self)
        if not self.proxy.stalled:
            self.connect_upstream()
        else:
            self.upstream_wanted = True

    def connect_upstream(self) -> None:
        self.upstream_wanted = False
        self.proxy.start_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        proxy = self.proxy
        try:
            _transport, _protocol = await asyncio.wait_for(
                proxy.loop.create_connection(
                    lambda: _UpstreamProtocol(self), proxy.upstream_host, proxy.upstream_port
                ),
                _CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError):
            proxy.stats.upstream_failures += 1
            self.close(rst=True)

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.abort()
            return
        self.upstream = transport
        self.up.sink = transport
        self.down.source = transport
        self.up.pump()

    def close(self, *, rst: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.links.discard(self)
        self.up.close()
        self.down.close()
        for transport in (self.client, self.upstream):
            if transport is None:
                continue
            if rst:
                _set_linger_zero(transport)
            transport.abort()


def _set_linger_zero(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self._link = _Link(proxy)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._link.client_connected(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._link.up.feed(data)

    def eof_received(self) -> bool | None:
        self._link.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.close()

    def pause_writing(self) -> None:
        self._link.down.sink_paused()

    def resume_writing(self) -> None:
        self._link.down.sink_resumed()


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, link: _Link) -> None:
        self._link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._link.upstream_connected(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._link.down.feed(data)

    def eof_received(self) -> bool | None:
        self._link.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.close()

    def pause_writing(self) -> None:
        self._link.up.sink_paused()

    def resume_writing(self) -> None:
        self._link.up.sink_resumed()


class FaultProxy:
    """Listen on ``127.0.0.1:port`` and forward to ``upstream_host:upstream_port``."""

    def __init__(self, name: str, upstream_host: str, upstream_port: int, *, port: int = 0) -> None:
        self.name = name
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = port
        self.stats = ProxyStats()
        self.links: set[_Link] = set()
        self.stalled = False
        self.latency_s = 0.0
        self.bandwidth_bps: float | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "proxy not started"
        return self._loop

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.accept()

    async def close(self) -> None:
        await self.refuse()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    def start_task(self, coro: object) -> None:
        """Tasks the proxy owns (upstream connects): kept, and cancelled by ``close``."""
        task: asyncio.Task[None] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- commands ---------------------------------------------------------------------------

    async def accept(self) -> None:
        """Listen (again) on the same port: new connections are accepted."""
        if self._server is not None:
            return
        self._server = await self.loop.create_server(
            lambda: _ClientProtocol(self), HOST, self.port, reuse_address=True, backlog=512
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones are left alone."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    def cut(self) -> int:
        """Close every open connection (FIN); returns how many."""
        links = list(self.links)
        for link in links:
            link.close()
        self.stats.cuts += len(links)
        return len(links)

    def reset(self) -> int:
        """Abort every open connection with RST; returns how many."""
        links = list(self.links)
        for link in links:
            link.close(rst=True)
        self.stats.resets += len(links)
        return len(links)

    def stall(self) -> None:
        """Stop forwarding: a blackhole that keeps the connections open."""
        self.stalled = True

    def resume(self) -> None:
        """Forward again: first what was held back, in order."""
        self.stalled = False
        for link in list(self.links):
            if link.upstream_wanted:
                link.connect_upstream()
            link.up.pump()
            link.down.pump()

    def set_latency(self, ms: float) -> None:
        self.latency_s = max(0.0, ms) / 1000.0

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        self.bandwidth_bps = bytes_per_s if bytes_per_s and bytes_per_s > 0 else None
        if self.bandwidth_bps is None:
            for link in list(self.links):
                link.up.pump()
                link.down.pump()

    def heal(self) -> None:
        """Every shaping fault off (stall, latency, bandwidth); listening is separate."""
        self.latency_s = 0.0
        self.bandwidth_bps = None
        self.resume()
