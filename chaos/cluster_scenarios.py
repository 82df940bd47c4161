"""Scenarios on a three-node RabbitMQ cluster (issue 16 item 3; chaos.rabbit_cluster): the node
the relays and workers are connected to killed, the dispatch queue's quorum leader stopped, one
node partitioned from the other two, and a rolling restart of all three.

Every process lists the three nodes in DELIVERY_AMQP_URL, each through its own fault proxy
(``amqp.<client>.n<k>``); the quorum queues have three members. Each node fault holds the node
down long enough for ``DeliveryBrokerNodeUnreachable`` (``for: 2m``, times the run's alert
scale) to fire; the rolling restart brings each node back well within that, and must stay
quiet. Lag alerts are tolerated where a node is lost: on this loaded machine a failover's few
seconds of stalled publishing can add up to more than the lag rule's 45 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from chaos.alerts import AlertExpectation
from chaos.context import RunContext
from chaos.processes import Role
from chaos.rabbit_cluster import RabbitNet, accepts
from chaos.redrives import SPARE
from chaos.scenarios import Scenario
from delivery.broker.nodes import PROBE_EVERY_S
from delivery.testing.waits import wait_until

__all__ = ["CLUSTER_SCENARIOS"]

# RabbitMQ 3.10 quorum queues killed within ~1 s of their declaration may never elect a leader
# again (RunContext.uptime).
_QUEUE_SETTLE_S = 5.0
# DeliveryBrokerNodeUnreachable's `for:` at the rules' real clock.
_NODE_ALERT_FOR_S = 120.0
# Past the `for:`: one probe period of the processes, then scrape and evaluation (1 s each at
# the real clock) and a margin for a loaded machine.
_NODE_ALERT_MARGIN_S = PROBE_EVERY_S + 15.0
_FAILOVER_TIMEOUT_S = 120.0
# Alerts a lost node may bring on and why they are tolerated (module docstring).
_LAG_ALERTS = frozenset(
    {"DeliveryLagHigh", "DeliveryLatencySLOBurnFast", "DeliveryLatencySLOBurnSlow"}
)
# A node loss may make the relay's sweep copy a message a worker still held (its node died
# with the delivery un-acked, the copy the quorum queue's new leader redelivers); it can never
# lose a confirmed message, so no redrive may heal one.
_SPARE = frozenset({SPARE})


def _net(ctx: RunContext) -> RabbitNet:
    net = ctx.cluster.servers.rabbits
    if net is None:
        raise RuntimeError("a cluster scenario runs on three RabbitMQ nodes (rabbit_nodes=3)")
    return net


def _down_s(ctx: RunContext) -> float:
    """How long a lost node stays lost: until its alert had time to fire."""
    return _NODE_ALERT_FOR_S * ctx.alert_scale + _NODE_ALERT_MARGIN_S


def _links_on(ctx: RunContext, k: int, roles: Sequence[Role]) -> int:
    """Open AMQP connections of ``roles`` on node ``k`` now (through its proxies)."""
    return sum(len(ctx.cluster.proxies[f"amqp.{role}.n{k}"].links) for role in roles)


def _busiest_node(ctx: RunContext, roles: Sequence[Role]) -> int:
    """The node most connections of ``roles`` are on (the lowest on a tie)."""
    nodes = range(len(_net(ctx).nodes))
    return max(nodes, key=lambda k: (_links_on(ctx, k, roles), -k))


async def _failed_over(ctx: RunContext, lost: int, began: float) -> float:
    """Wait until every process is ready and keeps its AMQP connections on the other nodes
    (none on ``lost``, at least one per process elsewhere); seconds since ``began``."""
    roles: tuple[Role, ...] = ("relay", "worker")
    others = [k for k in range(len(_net(ctx).nodes)) if k != lost]
    procs = ctx.cluster.processes

    async def moved() -> bool:
        if _links_on(ctx, lost, roles) > 0:
            return False
        if sum(_links_on(ctx, k, roles) for k in others) < len(procs):
            return False
        return all(await asyncio.gather(*(p.ready(ctx.session) for p in procs)))

    await wait_until(moved, timeout_s=_FAILOVER_TIMEOUT_S, what="failover", interval_s=0.25)
    return round(time.time() - began, 1)


async def _hold_until(began: float, down_s: float) -> None:
    """A fault's own duration (measured from ``began``): not a wait for a result."""
    await asyncio.sleep(max(0.0, began + down_s - time.time()))


async def _rejoined(ctx: RunContext, key: str) -> None:
    seconds = await _net(ctx).wait_whole()
    ctx.notes.setdefault(key, []).append(round(seconds, 1))


def _on_node(ctx: RunContext, k: int) -> dict[str, int]:
    return {role: _links_on(ctx, k, (role,)) for role in ("relay", "worker")}


# -- plans ----------------------------------------------------------------------------------


async def _kill_connected(ctx: RunContext) -> None:
    """kill -9 the node the relays and workers are connected to (at start they all take the
    first listed node), hold it down, start it again."""
    net = _net(ctx)
    await ctx.uptime(_QUEUE_SETTLE_S)
    await ctx.progress(0.2)
    k = _busiest_node(ctx, ("relay", "worker"))
    ctx.notes["killed_node"] = {"node": f"n{k}", "connections_on_it": _on_node(ctx, k)}
    async with ctx.faults.window("rabbit-node-kill", f"n{k}") as win:
        await net.stop_node(k, hard=True)
        ctx.notes["failover_s"] = await _failed_over(ctx, k, win.start)
        await _hold_until(win.start, _down_s(ctx))
        await net.start_node(k)
    await _rejoined(ctx, "rejoined_s")
    await ctx.producer.done.wait()


async def _stop_leader(ctx: RunContext) -> None:
    """Stop (gracefully) the node that leads the dispatch queue, hold it down, start it."""
    net = _net(ctx)
    queue = ctx.cluster.names.dispatch_queue
    await ctx.uptime(_QUEUE_SETTLE_S)
    await ctx.progress(0.2)
    leader = await asyncio.to_thread(net.cluster.leader_of, queue)
    if leader is None:
        raise RuntimeError(f"{queue} has no leader before the fault")
    k = net.nodes.index(leader)
    ctx.notes["stopped_leader"] = {"node": f"n{k}", "connections_on_it": _on_node(ctx, k)}
    async with ctx.faults.window("rabbit-leader-stop", f"n{k}", f"leader of {queue}") as win:
        await net.stop_node(k, hard=False)
        stopped_at = time.time()

        async def new_leader() -> bool:
            now = await asyncio.to_thread(net.cluster.leader_of, queue)
            if now is None or now is leader:
                return False
            ctx.notes["new_leader"] = f"n{net.nodes.index(now)}"
            return True

        await wait_until(new_leader, timeout_s=60, what=f"a new leader of {queue}", interval_s=1)
        ctx.notes["new_leader_after_stop_s"] = round(time.time() - stopped_at, 1)
        ctx.notes["failover_s"] = await _failed_over(ctx, k, win.start)
        await _hold_until(win.start, _down_s(ctx))
        await net.start_node(k)
    await _rejoined(ctx, "rejoined_s")
    await ctx.producer.done.wait()


async def _partition_node(ctx: RunContext) -> None:
    """Cut the node the clients are connected to off from the other two (its inter-node links
    only; clients still reach it). pause_minority pauses it, its clients fail over; then heal."""
    net = _net(ctx)
    await ctx.uptime(_QUEUE_SETTLE_S)
    await ctx.progress(0.2)
    k = _busiest_node(ctx, ("relay", "worker"))
    ctx.notes["partitioned_node"] = {"node": f"n{k}", "connections_on_it": _on_node(ctx, k)}
    node = net.nodes[k]
    async with ctx.faults.window("rabbit-partition", f"n{k}", "from the other two") as win:
        ctx.notes["inter_node_connections_reset"] = await net.partition(k)

        async def paused() -> bool:
            # pause_minority stops the node's app, and with it its AMQP listener.
            return not await asyncio.to_thread(accepts, node.port)

        await wait_until(paused, timeout_s=120, what=f"n{k} paused", interval_s=0.5)
        ctx.notes["minority_paused_after_s"] = round(time.time() - win.start, 1)
        ctx.notes["failover_s"] = await _failed_over(ctx, k, win.start)
        await _hold_until(win.start, _down_s(ctx))
        await net.heal()
    await _rejoined(ctx, "rejoined_s")
    await ctx.producer.done.wait()


async def _minority_client(ctx: RunContext) -> None:
    """The workers reach one node of three (their links to the other two refused and reset),
    while the cluster itself stays whole: a process on the minority side of a partition as it
    sees it. It keeps working through the node it reaches; on-call must hear of it."""
    net = _net(ctx)
    await ctx.uptime(_QUEUE_SETTLE_S)
    await ctx.progress(0.2)
    keep = 0
    cut = [k for k in range(len(net.nodes)) if k != keep]
    proxies = [ctx.cluster.proxies[f"amqp.worker.n{k}"] for k in cut]
    ctx.notes["workers_reach_only"] = f"n{keep}"
    async with ctx.faults.window("client-partition", "amqp.worker", f"n{keep} only") as win:
        for proxy in proxies:
            await proxy.refuse()
            proxy.reset()
        try:
            await _hold_until(win.start, _down_s(ctx))
        finally:
            for proxy in proxies:
                await proxy.accept()
    await ctx.producer.done.wait()


async def _rolling_restart(ctx: RunContext) -> None:
    """Stop and start each node in turn; the next only once the cluster is whole again (every
    node running and seen by all, every quorum queue with its three members online)."""
    net = _net(ctx)
    await ctx.uptime(_QUEUE_SETTLE_S)
    await ctx.progress(0.1)
    for k in range(len(net.nodes)):
        async with ctx.faults.window("rabbit-node-restart", f"n{k}"):
            await net.stop_node(k, hard=False)
            await net.start_node(k)
        await _rejoined(ctx, "rejoined_s")
    await ctx.producer.done.wait()


_NODE_LOST = AlertExpectation(fire={"DeliveryBrokerNodeUnreachable": 240.0}, tolerate=_LAG_ALERTS)

CLUSTER_SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "cluster-kill-node",
            "3 RabbitMQ nodes: kill -9 the node the relays and workers are connected to",
            _kill_connected,
            rabbit_nodes=3,
            # By hand (chaos/RESULTS.md): the suite runs cluster-leader-stop alone, its
            # budget being 15 minutes; each of these holds or boots a node for minutes.
            in_suite=False,
            min_production_s=8,
            redrives=_SPARE,
            alerts=_NODE_LOST,
        ),
        Scenario(
            "cluster-leader-stop",
            "3 RabbitMQ nodes: stop the node that leads the dispatch quorum queue",
            _stop_leader,
            rabbit_nodes=3,
            min_production_s=8,
            redrives=_SPARE,
            alerts=_NODE_LOST,
        ),
        Scenario(
            "cluster-partition",
            "3 RabbitMQ nodes: cut one node's inter-node links (pause_minority pauses it)",
            _partition_node,
            rabbit_nodes=3,
            # By hand (chaos/RESULTS.md): the suite runs cluster-leader-stop alone, its
            # budget being 15 minutes; each of these holds or boots a node for minutes.
            in_suite=False,
            min_production_s=8,
            redrives=_SPARE,
            alerts=_NODE_LOST,
        ),
        Scenario(
            "cluster-minority-client",
            "3 RabbitMQ nodes: the workers reach only one of them (a partition on their side)",
            _minority_client,
            rabbit_nodes=3,
            # By hand (chaos/RESULTS.md): the suite runs cluster-leader-stop alone.
            in_suite=False,
            min_production_s=8,
            redrives=_SPARE,
            alerts=AlertExpectation(
                fire={
                    "DeliveryBrokerMinoritySide": 60.0 + _NODE_ALERT_MARGIN_S,
                    "DeliveryBrokerNodeUnreachable": 240.0,
                },
                tolerate=_LAG_ALERTS,
            ),
        ),
        Scenario(
            "cluster-rolling-restart",
            "3 RabbitMQ nodes: restart each in turn, waiting for it to rejoin",
            _rolling_restart,
            rabbit_nodes=3,
            # By hand (chaos/RESULTS.md): the suite runs cluster-leader-stop alone, its
            # budget being 15 minutes; each of these holds or boots a node for minutes.
            in_suite=False,
            min_production_s=8,
            redrives=_SPARE,
            # Each node is back within the node alert's 2 minutes: nothing may fire.
            alerts=AlertExpectation(tolerate=_LAG_ALERTS),
        ),
    )
}
