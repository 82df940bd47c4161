"""A TCP fault proxy: what toxiproxy does, in asyncio.

Every client connection gets its own upstream connection; bytes flow through two pipes
(client -> upstream, upstream -> client; ``chaos.proxy_links``) that apply the proxy's current
faults:

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
from dataclasses import dataclass

from chaos.proxy_links import ClientProtocol, Link

__all__ = ["FaultProxy", "ProxyStats"]

HOST = "127.0.0.1"


@dataclass
class ProxyStats:
    accepted: int = 0
    upstream_failures: int = 0
    cuts: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class FaultProxy:
    """Listen on ``host:port`` (default 127.0.0.1) and forward to
    ``upstream_host:upstream_port``."""

    def __init__(
        self, name: str, upstream_host: str, upstream_port: int, *, port: int = 0, host: str = HOST
    ) -> None:
        self.name = name
        # Another loopback address (127.x.y.z) lets several proxies share one port number: the
        # RabbitMQ cluster's distribution links (chaos.cluster_net) need exactly that.
        self.host = host
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = port
        self.stats = ProxyStats()
        self.links: set[Link] = set()
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
            lambda: ClientProtocol(self), self.host, self.port, reuse_address=True, backlog=512
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
