"""A three-node RabbitMQ cluster for chaos runs (issue 16), and the faults only a cluster has.

The nodes are a routed ``LocalRabbitCluster`` (``delivery.testing.rabbitmq_cluster``): node i
reaches node j at its own loopback address, where a ``FaultProxy`` per port (epmd's 4369 and
j's Erlang distribution port) forwards to 127.0.0.1. So every byte between two nodes passes
through a proxy of ours, and a partition is real: node k's proxies, in and out, refuse new
connections and reset the open ones, while every AMQP client still reaches every node (the
clients' links to a node are the run's ``amqp.<client>.n<k>`` proxies, chaos.cluster). There is
no iptables on this machine; network namespaces would also have cut the clients' links, which
is a different fault.

The nodes run ``cluster_partition_handling = pause_minority`` (PITFALLS.md, runbook
broker-partition.md): the cut-off node pauses itself, which closes its clients' connections,
and they fail over to the majority.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

from chaos.proxy import FaultProxy
from delivery.testing.processes import HOST
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.rabbitmq_cluster import LocalRabbitCluster
from delivery.testing.waits import wait_until

__all__ = ["NODES", "RabbitNet", "accepts"]

NODES = 3
# Rejoining takes a node's boot (20-50 s at load 50) plus its quorum members catching up.
WHOLE_TIMEOUT_S = 240.0
_BOOT_TIMEOUT_S = 240.0


def accepts(port: int, host: str = HOST) -> bool:
    """Something listens on ``host:port`` (a TCP connect succeeds within 2 s)."""
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex((host, port)) == 0


class RabbitNet:
    """The cluster, its inter-node proxies, and what a plan does to them."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self.cluster = LocalRabbitCluster(
            size=NODES, base_dir=base_dir, partition_handling="pause_minority", routed=True
        )
        self.epmd: dict[tuple[int, int], FaultProxy] = {}
        self.dist: dict[tuple[int, int], FaultProxy] = {}
        for (i, j), link in self.cluster.links().items():
            epmd_port, dist_port = link.ports
            self.epmd[(i, j)] = FaultProxy(
                f"epmd.n{i}-n{j}", HOST, epmd_port, port=epmd_port, host=link.address
            )
            self.dist[(i, j)] = FaultProxy(
                f"dist.n{i}-n{j}", HOST, dist_port, port=dist_port, host=link.address
            )
        self.cut_off: set[int] = set()

    @property
    def nodes(self) -> list[LocalRabbitMQ]:
        return self.cluster.nodes

    @property
    def proxies(self) -> list[FaultProxy]:
        return [*self.epmd.values(), *self.dist.values()]

    async def start(self) -> None:
        for proxy in self.epmd.values():
            await proxy.start()
        # A node's distribution proxies listen only once it runs (RabbitMQ's prelaunch refuses
        # to boot when its distribution port number is taken on any address).
        await asyncio.to_thread(self.cluster.start_nodes)
        for proxy in self.dist.values():
            await proxy.start()
        await asyncio.to_thread(self.cluster.join)

    async def close(self) -> None:
        await asyncio.to_thread(self.cluster.close)
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.close()

    # -- nodes --------------------------------------------------------------------------------

    async def stop_node(self, k: int, *, hard: bool) -> None:
        """kill -9 node ``k`` (``hard``) or stop it gracefully."""
        node = self.nodes[k]
        await asyncio.to_thread(node.kill if hard else node.stop)

    async def start_node(self, k: int) -> None:
        """Start node ``k`` again (same name, ports and data): its distribution proxies stop
        listening until its own listener is up (past the prelaunch check), then listen again,
        so that its peers can reach it while it boots."""
        node = self.nodes[k]
        inbound = [p for (_i, j), p in self.dist.items() if j == k]
        for proxy in inbound:
            await proxy.refuse()
        try:
            async with asyncio.TaskGroup() as tg:
                booting = tg.create_task(asyncio.to_thread(node.start))

                async def listening() -> bool:
                    return booting.done() or await asyncio.to_thread(accepts, node.dist_port)

                await wait_until(
                    listening, timeout_s=_BOOT_TIMEOUT_S, what="its listener", interval_s=0.2
                )
                if k not in self.cut_off:
                    for proxy in inbound:
                        await proxy.accept()
        finally:
            if k not in self.cut_off:
                for proxy in inbound:
                    await proxy.accept()

    # -- the network between nodes ---------------------------------------------------------------

    def _pairs_of(self, k: int) -> list[FaultProxy]:
        return [p for table in (self.epmd, self.dist) for (i, j), p in table.items() if k in (i, j)]

    async def partition(self, k: int) -> int:
        """Cut node ``k`` off from the others (both directions): new connections refused, open
        ones reset. Returns how many open connections were reset."""
        self.cut_off.add(k)
        reset = 0
        for proxy in self._pairs_of(k):
            await proxy.refuse()
            reset += proxy.reset()
        return reset

    async def heal(self) -> None:
        """Every inter-node link listening again, every node running (a stopped one started)."""
        self.cut_off.clear()
        for proxy in self.proxies:
            proxy.heal()
        for k, node in enumerate(self.nodes):
            if not node.is_running():
                await self.start_node(k)
        for proxy in self.proxies:
            await proxy.accept()

    async def wait_whole(self, timeout_s: float = WHOLE_TIMEOUT_S) -> float:
        """Until every node runs and sees the others, and every quorum queue has its three
        members online; how long that took."""
        return await asyncio.to_thread(self.cluster.wait_whole, timeout_s=timeout_s)

    def reachable_url(self) -> str:
        """The AMQP URL of a node that runs and is not cut off (the runner's own probes)."""
        for k, node in enumerate(self.nodes):
            if k not in self.cut_off and node.is_running():
                return node.url
        return self.nodes[0].url
