"""A throwaway RabbitMQ cluster (``LocalRabbitCluster``): several ``LocalRabbitMQ`` nodes on
127.0.0.1, started together and joined to the first, as ../shared/SERVICES.md describes. The
nodes share the Erlang cookie of the rabbitmq user's home (as root, Debian's wrapper runs each
node there), which is what lets them join.

``routed=True`` gives every node its own host name and every ordered pair of nodes its own
loopback address: node i reaches node j (its epmd lookup, port 4369, and its distribution port)
at ``links()[(i, j)]``, a 127.x.y.z address where the caller puts a TCP proxy to 127.0.0.1.
Cutting the proxies of one node's pairs is a real partition of the Erlang distribution (no
iptables here); the AMQP listeners stay on 127.0.0.1, reachable by every client. Host names
resolve through an ``ERL_INETRC`` file per node, so nothing outside the cluster changes."""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from delivery.testing.processes import HOST, Progress, ProvisionError, _noop, _Server, free_port
from delivery.testing.rabbitmq import LocalRabbitMQ

__all__ = ["DistLink", "LocalRabbitCluster"]

JOIN_TIMEOUT_S: Final = 60.0
# A routed cluster's node restarted mid-run boots beside the platform's processes and its peers
# (a leader stop at load 60 took more than LocalRabbitMQ's 60 s to answer).
ROUTED_START_TIMEOUT_S: Final = 180.0
EPMD_PORT: Final = 4369
WHOLE_POLL_S: Final = 0.5


@dataclass(frozen=True)
class DistLink:
    """Where node ``src`` reaches node ``dst`` (routed clusters): ``address`` on ``ports``
    (epmd's and ``dst``'s distribution port) must forward to the same ports on 127.0.0.1."""

    src: int
    dst: int
    address: str
    ports: tuple[int, ...]


class LocalRabbitCluster(_Server):
    """``size`` throwaway nodes joined into one cluster; ``url`` lists them all, comma-separated
    (DELIVERY_AMQP_URL's form for a cluster)."""

    def __init__(
        self,
        *,
        size: int = 3,
        base_dir: str | Path | None = None,
        progress: Progress | None = None,
        partition_handling: str | None = None,
        routed: bool = False,
    ) -> None:
        """``partition_handling``: rabbitmq.conf's ``cluster_partition_handling`` (RabbitMQ's
        default is ``ignore``; ``pause_minority`` is what a three-node cluster should run)."""
        if size < 1:
            raise ValueError(f"a cluster has at least one node, not {size}")
        self._progress = progress or _noop
        conf = f"cluster_partition_handling = {partition_handling}\n" if partition_handling else ""
        self._links: dict[tuple[int, int], DistLink] = {}
        self._net_dir: Path | None = None
        if not routed:
            self.nodes = [
                LocalRabbitMQ(base_dir=base_dir, progress=progress, extra_conf=conf)
                for _ in range(size)
            ]
        else:
            self.nodes = self._routed_nodes(size, base_dir, progress, conf)
        self.last_start_s: float | None = None
        self.last_join_s: float | None = None

    def _routed_nodes(
        self, size: int, base_dir: str | Path | None, progress: Progress | None, conf: str
    ) -> list[LocalRabbitMQ]:
        tag = secrets.token_hex(3)
        hosts = [f"dlv{tag}n{i}" for i in range(size)]
        dist_ports = [free_port() for _ in range(size)]
        # One second octet per cluster: two clusters on the machine at once (a chaos run and
        # the test suite) must not want the same proxy addresses.
        octet = random.randrange(16, 250)
        self._net_dir = Path(tempfile.mkdtemp(prefix="dlv-rmqnet-", dir=base_dir))
        self._net_dir.chmod(0o755)  # the nodes run as the rabbitmq user and read their file
        nodes = []
        for i in range(size):
            lines = [f'{{host, {{127,0,0,1}}, ["{hosts[i]}"]}}.']
            for j in range(size):
                if j != i:
                    link = DistLink(
                        i, j, f"127.{octet}.{i + 1}.{j + 1}", (EPMD_PORT, dist_ports[j])
                    )
                    self._links[(i, j)] = link
                    erl_ip = link.address.replace(".", ",")
                    lines.append(f'{{host, {{{erl_ip}}}, ["{hosts[j]}"]}}.')
            lines.append("{lookup, [file, native]}.")
            inetrc = self._net_dir / f"inetrc-{i}"
            inetrc.write_text("\n".join(lines) + "\n")
            inetrc.chmod(0o644)
            env = {
                "ERL_INETRC": str(inetrc),
                # The distribution listener on 127.0.0.1 only: the proxies listen on the same
                # port number on their own addresses.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    f"-kernel inet_dist_use_interface {{{HOST.replace('.', ',')}}}"
                ),
            }
            nodes.append(
                LocalRabbitMQ(
                    node_name=f"dlv{tag}n{i}@{hosts[i]}",
                    dist_port=dist_ports[i],
                    base_dir=base_dir,
                    start_timeout_s=ROUTED_START_TIMEOUT_S,
                    progress=progress,
                    extra_conf=conf,
                    extra_env=env,
                )
            )
        return nodes

    def links(self) -> dict[tuple[int, int], DistLink]:
        """Routed clusters: (src, dst) -> where src reaches dst (empty otherwise)."""
        return dict(self._links)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        """Start every node at once, then join the others to the first (stop_app,
        join_cluster, start_app) and wait until the first lists them all as running."""
        began = time.monotonic()
        self.start_nodes()
        self.join()
        self.last_start_s = time.monotonic() - began
        self._progress(
            f"RabbitMQ cluster of {len(self.nodes)} ready in {self.last_start_s:.1f} s"
            f" (joined in {self.last_join_s:.1f} s)"
        )

    def start_nodes(self) -> None:
        """Start every node at once, not yet joined. A routed cluster's proxies must not
        listen on a node's distribution port while it boots: RabbitMQ's prelaunch refuses to
        start when that port number is taken on any address."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for future in [pool.submit(node.start) for node in self.nodes]:
                future.result()

    def join(self) -> None:
        """Join every node to the first; wait until the first lists them all as running."""
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

    def running_nodes(self, asked: LocalRabbitMQ | None = None) -> set[str]:
        """The nodes ``asked`` (default: the first running node) sees running."""
        node = asked or next((n for n in self.nodes if n.is_running()), None)
        if node is None:
            return set()
        status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    def quorum_queues(self, vhost: str = "/") -> dict[str, dict[str, object]]:
        """Every quorum queue of ``vhost``: its leader and its members, all and online, as a
        running node of the majority sees them."""
        node = self._answering()
        items = ("name", "type", "leader", "members", "online")
        rows = json.loads(node.ctl("list_queues", "-p", vhost, *items, "--formatter", "json"))
        return {r["name"]: r for r in rows if r.get("type") == "quorum"}

    def leader_of(self, queue: str, vhost: str = "/") -> LocalRabbitMQ | None:
        """The node that leads quorum queue ``queue`` now (None: no leader, or no such queue)."""
        row = self.quorum_queues(vhost).get(queue)
        leader = row.get("leader") if row else None
        return next((n for n in self.nodes if n.node == leader), None)

    def whole(self, vhost: str = "/") -> str | None:
        """None when every node runs, every node sees all of them running and every quorum
        queue of ``vhost`` has all its members online; else what is missing."""
        want = {node.node for node in self.nodes}
        for node in self.nodes:
            if not node.is_running():
                return f"{node.node} is not running"
            try:
                seen = self.running_nodes(node)
            except ProvisionError as exc:
                return f"{node.node} does not answer: {exc}"[:300]
            if seen != want:
                return f"{node.node} sees {sorted(seen)} running"
        for name, row in self.quorum_queues(vhost).items():
            online = row.get("online") or []
            members = row.get("members") or []
            if not isinstance(online, list) or not isinstance(members, list):
                return f"queue {name}: members {members}, online {online}"
            if set(online) != want or set(members) != want:
                return f"queue {name}: members {sorted(members)}, online {sorted(online)}"
        return None

    def wait_whole(self, *, timeout_s: float, vhost: str = "/") -> float:
        """Wait until ``whole()``; how long it took, or ProvisionError with what was missing."""
        began = time.monotonic()
        while (missing := self._whole_or_why(vhost)) is not None:
            if time.monotonic() - began > timeout_s:
                raise ProvisionError(f"cluster not whole after {timeout_s:g} s: {missing}")
            time.sleep(WHOLE_POLL_S)
        return time.monotonic() - began

    def _whole_or_why(self, vhost: str) -> str | None:
        try:
            return self.whole(vhost)
        except (ProvisionError, ValueError) as exc:  # a node mid-boot answers garbage or fails
            return str(exc)[:300]

    def _answering(self) -> LocalRabbitMQ:
        """A running node whose CLI answers (a paused minority node's does not list queues)."""
        errors = []
        for node in self.nodes:
            if not node.is_running():
                continue
            try:
                node.ctl("list_queues", "-q", "name", "--no-table-headers", timeout_s=15)
            except ProvisionError as exc:
                errors.append(str(exc)[:120])
                continue
            return node
        raise ProvisionError(f"no node of the cluster answers: {errors}")

    def close(self) -> None:
        """Stop (or kill) and remove every node; never raises."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for future in [pool.submit(node.close) for node in self.nodes]:
                with contextlib.suppress(Exception):
                    future.result()
        if self._net_dir is not None:
            shutil.rmtree(self._net_dir, ignore_errors=True)
