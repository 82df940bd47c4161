"""A throwaway RabbitMQ cluster (``LocalRabbitCluster``): several ``LocalRabbitMQ`` nodes on
127.0.0.1, started together and joined to the first, as ../shared/SERVICES.md describes. The
nodes share the Erlang cookie of the rabbitmq user's home (as root, Debian's wrapper runs each
node there), which is what lets them join."""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from delivery.testing.processes import Progress, ProvisionError, _noop, _Server
from delivery.testing.rabbitmq import LocalRabbitMQ

__all__ = ["LocalRabbitCluster"]

JOIN_TIMEOUT_S: Final = 60.0


class LocalRabbitCluster(_Server):
    """``size`` throwaway nodes joined into one cluster; ``url`` lists them all, comma-separated
    (DELIVERY_AMQP_URL's form for a cluster)."""

    def __init__(
        self, *, size: int = 3, base_dir: str | Path | None = None, progress: Progress | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster has at least one node, not {size}")
        self._progress = progress or _noop
        self.nodes = [LocalRabbitMQ(base_dir=base_dir, progress=progress) for _ in range(size)]
        self.last_start_s: float | None = None
        self.last_join_s: float | None = None

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Start every node at once, then join the others to the first (stop_app,
        join_cluster, start_app) and wait until the first lists them all as running."""
        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for future in [pool.submit(node.start) for node in self.nodes]:
                future.result()
        first = self.nodes[0]

        def join(node: LocalRabbitMQ) -> None:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node, timeout_s=JOIN_TIMEOUT_S)
            node.ctl("start_app", timeout_s=JOIN_TIMEOUT_S)

        # Together: each CLI call boots an Erlang VM (seconds on a busy machine), and nodes
        # joining the same first node at once is what a cluster's own peer discovery does.
        joined = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for future in [pool.submit(join, node) for node in self.nodes[1:]]:
                future.result()
        self.last_join_s = time.monotonic() - joined
        want = {node.node for node in self.nodes}
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while (running := self.running_nodes(first)) != want:
            if time.monotonic() > deadline:
                raise ProvisionError(f"cluster of {sorted(want)} formed only {sorted(running)}")
            time.sleep(0.2)
        self.last_start_s = time.monotonic() - began
        self._progress(
            f"RabbitMQ cluster of {len(want)} ready in {self.last_start_s:.1f} s"
            f" (joined in {self.last_join_s:.1f} s)"
        )

    def running_nodes(self, asked: LocalRabbitMQ | None = None) -> set[str]:
        """The nodes ``asked`` (default: the first running node) sees running."""
        node = asked or next((n for n in self.nodes if n.is_running()), None)
        if node is None:
            return set()
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def close(self) -> None:
        """Stop (or kill) and remove every node; never raises."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for future in [pool.submit(node.close) for node in self.nodes]:
                with contextlib.suppress(Exception):
                    future.result()
