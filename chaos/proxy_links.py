"""The fault proxy's connections (``chaos.proxy``): one ``Link`` per client connection, with its
own upstream connection and two ``_Pipe``s (client -> upstream, upstream -> client) that apply
the proxy's current faults as bytes flow.

Bytes are never dropped or altered inside a live connection. Flow control is end to end: a pipe
that holds too much, or whose sink cannot take more, pauses reading its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from chaos.proxy import FaultProxy

__all__ = ["ClientProtocol", "Link"]

_HIGH_WATER_BYTES = 1 << 20
_LOW_WATER_BYTES = 1 << 18
_CONNECT_TIMEOUT_S = 10.0


class _Pipe:
    """One direction of one connection: source transport -> sink transport, shaped."""

    def __init__(self, proxy: FaultProxy, link: Link, *, upstream: bool) -> None:
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


class Link:
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


class ClientProtocol(asyncio.Protocol):
    def __init__(self, proxy: FaultProxy) -> None:
        self._link = Link(proxy)

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
    def __init__(self, link: Link) -> None:
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
