"""The faults a scenario composes. Each records its window in ``ctx.faults`` (start = the
moment it is injected, end = the moment it is lifted) so the checker can tell whether a
duplicate is explained by one.

Blocking server operations (stop, start, kill) run in threads: the receiver, the proxies and
the producer share this event loop and must keep running while a server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import aio_pika
import asyncpg

from chaos.cluster import AlarmKind
from chaos.context import RunContext
from chaos.processes import ManagedProcess, Role
from delivery.testing.postgres import StopMode
from delivery.testing.receiver import Behaviour
from delivery.testing.waits import wait_until

__all__ = [
    "consumers_back",
    "delete_dispatch_queue",
    "kill_loop",
    "link_cut",
    "link_partition",
    "link_shape",
    "link_stall",
    "pg_failover",
    "pg_restart",
    "pg_terminate_backends",
    "producer_spike",
    "rabbit_restart",
    "resource_alarm",
    "subscriber_phases",
]

_RESTART_READY_TIMEOUT_S = 120.0


# -- processes ------------------------------------------------------------------------------


async def kill_loop(
    ctx: RunContext,
    roles: Sequence[Role],
    *,
    every_s: tuple[float, float] = (0.5, 2.0),
    down_s: tuple[float, float] = (0.1, 1.0),
    graceful: bool = False,
) -> int:
    """While events are produced: kill -9 (or SIGTERM) a random process of ``roles``, keep it
    down a little, start it again. Returns how many were killed."""
    kills = 0
    while ctx.producing:
        await ctx.pause(*every_s)
        candidates = [p for p in ctx.cluster.by_role(*roles) if p.alive]
        if not candidates or not ctx.producing:
            continue
        victim = ctx.rng.choice(candidates)
        kind = "sigterm" if graceful else "kill-9"
        async with ctx.faults.window(kind, victim.name):
            if graceful:
                await victim.terminate()
            else:
                await victim.kill()
            kills += 1
            await ctx.pause(*down_s)
            await _restart(ctx, victim)
    return kills


async def _restart(ctx: RunContext, proc: ManagedProcess) -> None:
    await proc.start()
    await proc.wait_ready(ctx.session, _RESTART_READY_TIMEOUT_S)


# -- servers --------------------------------------------------------------------------------


async def rabbit_restart(
    ctx: RunContext,
    *,
    hard: bool,
    down_s: float,
    must_recover: bool = True,
    until_firing: frozenset[str] = frozenset(),
    cap_s: float = 0.0,
) -> None:
    """Stop RabbitMQ gracefully (or kill -9 it), keep it down, start it; the window closes
    once every process reports ready again (consumers back).

    ``must_recover=False`` is for plans with other faults running at the same time (cuts and
    kills every few seconds keep some process not ready at any given moment): the wait is
    then bounded but not an error, and recovery is judged by the checker once the run settles.
    ``until_firing``: after ``down_s``, keep it down until these alerts fire (at most
    ``cap_s`` more): an outage that must outlast an alert's ``for:``.
    """
    rabbit = ctx.cluster.servers.rabbit
    async with ctx.faults.window("rabbit-kill" if hard else "rabbit-stop", "rabbitmq"):
        await asyncio.to_thread(rabbit.kill if hard else rabbit.stop)
        await asyncio.sleep(down_s)
        if until_firing:
            await ctx.until_firing(until_firing, cap_s)
        await asyncio.to_thread(rabbit.start)
    try:
        await _all_ready(ctx, "processes ready after the RabbitMQ restart")
        await consumers_back(ctx)
    except TimeoutError:
        if must_recover:
            raise


async def consumers_back(ctx: RunContext) -> None:
    """Every worker consumes the dispatch queue again: "connected" is not enough (aio-pika
    #231/#626: robust connections sometimes come back without their consumers)."""
    want = len([p for p in ctx.cluster.by_role("worker", "run") if p.alive])
    seen: list[int | None] = []

    async def back() -> bool:
        seen.append(await ctx.cluster.dispatch_consumers())
        return seen[-1] == want

    await wait_until(
        back, timeout_s=60, what=f"{want} consumers on the dispatch queue", interval_s=0.5
    )
    ctx.notes.setdefault("consumers_after_restart", []).append(seen[-1])


async def pg_restart(ctx: RunContext, *, mode: StopMode, down_s: float) -> None:
    pg = ctx.cluster.servers.pg
    async with ctx.faults.window(f"pg-restart-{mode}", "postgresql"):
        await asyncio.to_thread(pg.stop, mode)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(pg.start)
    await _all_ready(ctx, "processes ready after the PostgreSQL restart")


async def pg_failover(ctx: RunContext, *, down_s: float) -> None:
    """kill -9 the PostgreSQL primary (the whole server, as a crashed machine leaves it), leave
    the platform without a primary for ``down_s`` (a failover manager's decision time), then
    promote the synchronous standby. The window closes once the standby accepts writes; every
    process must then be ready again without a restart (its multi-host URL finds the new
    primary). Needs ``Layout(standby=True)``."""
    servers = ctx.cluster.servers
    standby = servers.standby
    if standby is None:
        raise RuntimeError("pg_failover needs a standby: Layout(standby=True)")
    # Evidence that the standby was synchronous when the primary died (else loss is allowed).
    conn = await asyncpg.connect(servers.pg.url, timeout=10)
    try:
        ctx.notes["standby_sync_state"] = await conn.fetchval(
            "SELECT string_agg(application_name || ':' || sync_state, ',') FROM pg_stat_replication"
        )
    finally:
        await conn.close()
    async with ctx.faults.window("pg-failover", "postgresql primary", f"promote after {down_s:g}s"):
        crashed = time.monotonic()
        await asyncio.to_thread(servers.pg.kill)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(standby.promote)
        ctx.notes["promoted_after_s"] = round(time.monotonic() - crashed, 2)
    await _all_ready(ctx, "processes ready after the failover")
    ctx.notes["ready_after_s"] = round(time.monotonic() - crashed, 2)


async def pg_terminate_backends(ctx: RunContext) -> int:
    """``pg_terminate_backend`` every connection of the platform (LISTEN ones included)."""
    async with ctx.faults.window("pg-terminate", "postgresql"):
        conn = await asyncpg.connect(ctx.cluster.db_url)
        try:
            count = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
    return int(count or 0)


async def resource_alarm(
    ctx: RunContext,
    kind: AlarmKind,
    *,
    min_pending: int,
    timeout_s: float,
    hold_s: float = 0.0,
) -> float:
    """Raise RabbitMQ's memory or disk alarm (publishers blocked) until the relays' own metric
    shows the outbox backing up by ``min_pending`` rows (and ``hold_s`` more), then clear it.
    Returns the highest ``delivery_outbox_pending`` seen during the alarm."""
    servers = ctx.cluster.servers
    since = time.time()
    async with ctx.faults.window(f"{kind}-alarm", "rabbitmq"):
        await servers.set_alarm(kind, True)
        try:
            await wait_until(
                lambda: ctx.sampler.max_of("delivery_outbox_pending", since) >= min_pending,
                timeout_s=timeout_s,
                what=f"delivery_outbox_pending >= {min_pending} during the memory alarm",
                interval_s=0.25,
            )
            await asyncio.sleep(hold_s)
        finally:
            await servers.set_alarm(kind, False)
    return ctx.sampler.max_of("delivery_outbox_pending", since)


async def delete_dispatch_queue(ctx: RunContext, *, min_messages: int) -> int:
    """An operator (or a bad deploy) deletes the dispatch queue while it holds messages: the
    workers are stopped (kill -9) until ``min_messages`` wait in it, the queue is deleted, the
    workers start again. Returns how many messages the queue held when it was deleted."""
    workers = ctx.cluster.by_role("worker", "run")
    async with ctx.faults.window("queue-deleted", ctx.cluster.names.dispatch_queue):
        for worker in workers:
            await worker.kill()
        depth: list[int] = [0]

        async def backlog() -> bool:
            depth[0] = await ctx.cluster.dispatch_depth() or 0
            return depth[0] >= min_messages or not ctx.producing

        await wait_until(backlog, timeout_s=120, what=f"{min_messages} messages in the queue")
        connection = await aio_pika.connect(ctx.cluster.amqp_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            result = await channel.queue_delete(ctx.cluster.names.dispatch_queue)
        for worker in workers:
            await worker.start()
        for worker in workers:
            await worker.wait_ready(ctx.session, _RESTART_READY_TIMEOUT_S)
    return int(result.message_count or 0)


async def _all_ready(ctx: RunContext, what: str) -> None:
    procs = [p for p in ctx.cluster.processes if p.alive]

    async def ready() -> bool:
        answers = await asyncio.gather(*(p.ready(ctx.session) for p in procs))
        return all(answers)

    await wait_until(ready, timeout_s=_RESTART_READY_TIMEOUT_S, what=what, interval_s=0.25)


# -- links (the fault proxies) --------------------------------------------------------------


async def link_cut(ctx: RunContext, selector: str, *, rst: bool = False) -> int:
    """Close (or RST) every open connection on the selected links; clients reconnect."""
    async with ctx.faults.window("reset" if rst else "cut", selector):
        return sum(p.reset() if rst else p.cut() for p in ctx.cluster.links(selector))


async def link_stall(ctx: RunContext, selector: str, *, duration_s: float) -> None:
    """A blackhole: connections stay open, nothing is forwarded, for ``duration_s``."""
    proxies = ctx.cluster.links(selector)
    async with ctx.faults.window("stall", selector, f"{duration_s:g}s"):
        for proxy in proxies:
            proxy.stall()
        try:
            await asyncio.sleep(duration_s)
        finally:
            for proxy in proxies:
                proxy.resume()


async def link_partition(ctx: RunContext, selector: str, *, duration_s: float) -> None:
    """Refuse new connections and cut the open ones for ``duration_s``."""
    proxies = ctx.cluster.links(selector)
    async with ctx.faults.window("partition", selector, f"{duration_s:g}s"):
        for proxy in proxies:
            await proxy.refuse()
            proxy.reset()
        try:
            await asyncio.sleep(duration_s)
        finally:
            for proxy in proxies:
                await proxy.accept()


async def link_shape(
    ctx: RunContext,
    selector: str,
    *,
    duration_s: float,
    latency_ms: float = 0.0,
    bandwidth_bps: float | None = None,
) -> None:
    proxies = ctx.cluster.links(selector)
    detail = f"latency {latency_ms:g}ms, bandwidth {bandwidth_bps or 'unlimited'} B/s"
    async with ctx.faults.window("shape", selector, detail):
        for proxy in proxies:
            proxy.set_latency(latency_ms)
            proxy.set_bandwidth(bandwidth_bps)
        try:
            await asyncio.sleep(duration_s)
        finally:
            for proxy in proxies:
                proxy.heal()


# -- subscribers and producers --------------------------------------------------------------


async def subscriber_phases(
    ctx: RunContext, paths: Sequence[str], phases: Sequence[tuple[str, Behaviour, float]]
) -> None:
    """Set each ``(name, Behaviour, seconds)`` in turn on ``paths``; back to healthy after."""
    for name, behaviour, seconds in phases:
        async with ctx.faults.window(f"subscriber-{name}", ",".join(paths)):
            for path in paths:
                ctx.receiver.set_behaviour(path, behaviour)
            await asyncio.sleep(seconds)
    for path in paths:
        ctx.receiver.set_behaviour(path, Behaviour())


async def producer_spike(ctx: RunContext, *, factor: float, duration_s: float) -> None:
    """Multiply the producers' rate for ``duration_s`` (until production ends at the latest)."""
    async with ctx.faults.window("producer-spike", "producer", f"x{factor:g}"):
        ctx.producer.set_rate(ctx.producer.base_rate * factor)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.producer.done.wait(), duration_s)
        finally:
            ctx.producer.set_rate(ctx.producer.base_rate)
