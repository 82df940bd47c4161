"""One long-running process: relay, worker (dispatch + scheduler + deliverer), or both.

Shutdown is ordered: the first SIGTERM/SIGINT stops intake (relay claims, consumers) and marks
the process not-ready; in-flight attempts get ``DELIVERY_SHUTDOWN_TIMEOUT_S`` to finish, then
are cancelled with their leases handed back; then connections and the pool close and the
process exits 0. A second signal skips the wait (still handing work back).

Burst mode (``until_idle``) ends the same way once no work is left: ``delivery.worker.burst``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

import asyncpg
import structlog

from delivery.aio import backoff_s, wait_any
from delivery.broker.nodes import watch_nodes
from delivery.broker.relay import Relay
from delivery.errors import BrokerNodeLostError, StoppedBeforeConnected
from delivery.lifecycle import install_signals, open_pool
from delivery.ops import tracing
from delivery.ops.admin import serve_admin
from delivery.ops.health import Health
from delivery.secrets import NO_KEYS, SecretBox
from delivery.settings import Settings
from delivery.store.secret_keys import open_box
from delivery.worker.burst import stop_when_idle
from delivery.worker.deliverer import Deliverer
from delivery.worker.dispatch import Dispatcher
from delivery.worker.poison import PoisonRecorder
from delivery.worker.scheduler import Scheduler
from delivery.worker.sender import Sender

log = structlog.get_logger("workers.process")

_TEARDOWN_S = 10.0
_RESTART_BACKOFF_MAX_S = 10.0


async def supervise(
    name: str, run: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event
) -> None:
    """Run a component until ``stop``; if it fails (a broker restart during start-up, a
    channel closed under it), log and start it again with backoff instead of exiting."""
    failures = 0
    while not stop.is_set():
        try:
            await run(stop)
        except Exception as exc:
            if stop.is_set():
                return  # failing because shutdown began (e.g. the broker never came): done
            if _failing_over(exc):
                # Its broker node was lost: start again now, on the next node (connect backs
                # off by itself if none answers), and keep the error log for real failures.
                log.warning("component_failing_over", component=name, error=repr(exc)[:300])
                continue
            failures += 1
            delay = backoff_s(failures, base_s=0.5, max_s=_RESTART_BACKOFF_MAX_S)
            log.exception(
                "component_failed", component=name, error=repr(exc)[:300], restart_in_s=delay
            )
            await wait_any(stop, timeout_s=delay)
        else:
            return


def _failing_over(exc: BaseException) -> bool:
    """The component ended because its RabbitMQ node was lost (maybe inside a TaskGroup's
    ExceptionGroup)."""
    if isinstance(exc, BaseExceptionGroup):
        lost, other = exc.split(BrokerNodeLostError)
        return lost is not None and other is None  # anything else is a failure to log
    return isinstance(exc, BrokerNodeLostError)


async def _open_database(
    settings: Settings, stop: asyncio.Event, *, worker: bool
) -> tuple[asyncpg.Pool, SecretBox]:
    """The pool and, for a worker (it signs), the box that opens every stored secret: a worker
    that could not open one refuses to start (``ConfigError``, exit 2), its pool closed."""
    pool = await open_pool(settings, stop)
    if not worker:
        return pool, NO_KEYS
    try:
        async with pool.acquire() as conn:
            return pool, await open_box(conn, settings)
    except BaseException:
        await pool.close()
        raise


def _start_up(settings: Settings) -> None:
    """Tracing (enabled without the extra stops here), and a loud line when test-only switches
    are on (settings refuse them unless a test harness set them)."""
    tracing.start(settings)
    if switches := settings.test_only_switches():
        log.critical(
            "test_only_switches_active",
            switches=switches,
            meaning="this process is broken on purpose for a test; never run it in production",
        )


async def run_process(
    settings: Settings,
    *,
    relay: bool,
    worker: bool,
    stop: asyncio.Event | None = None,
    ready: Callable[[Health], None] | None = None,
    handle_signals: bool = True,
    until_idle: bool = False,
    idle_timeout_s: float = 60.0,
) -> None:
    """Run until a signal (or ``stop``, for embedding in the demo and tests).

    ``until_idle`` is burst mode (arq's burst, dramatiq's ``Worker.join``): run until no work is
    left for the parts this process runs (the rule: ``delivery.worker.burst``), then drain and
    return. A retry due within ``idle_timeout_s`` is waited for, a later one is left pending;
    if work is still left at that deadline, the process drains and raises ``TimeoutError``
    naming it.
    """
    _start_up(settings)  # first, before any I/O
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    health = Health()
    remove_signals = install_signals(stop, force, health) if handle_signals else (lambda: None)
    role = "run" if relay and worker else ("relay" if relay else "worker")
    try:
        pool, box = await _open_database(settings, stop, worker=worker)
    except BaseException as exc:
        remove_signals()
        await tracing.stop(settings)
        if isinstance(exc, StoppedBeforeConnected):  # SIGTERM before the database answered
            log.info("stopped", role=role)
            return
        raise
    burst: asyncio.Task[str | None] | None = None
    try:
        async with (
            serve_admin(health, settings.admin_port, settings.admin_host) as port,
            Sender(
                max_connections=settings.max_in_flight,
                connect_timeout_s=settings.http_connect_timeout_s,
                timeout_s=settings.http_timeout_s,
                excerpt_bytes=settings.response_excerpt_bytes,
                allow_private_targets=settings.allow_private_targets,
            ) as sender,
        ):
            log.info("started", role=role, admin_port=port or None)
            async with asyncio.TaskGroup() as tg:
                # Which listed broker nodes answer: gauges, and not-ready on a minority side.
                tasks: list[asyncio.Task[object]] = [
                    tg.create_task(
                        supervise(
                            "amqp_nodes", partial(watch_nodes, settings.amqp_url, health), stop
                        )
                    )
                ]
                if relay:
                    tasks.append(
                        tg.create_task(supervise("relay", Relay(settings, pool, health).run, stop))
                    )
                if worker:
                    deliverer = Deliverer(settings, pool, sender, box=box)
                    scheduler = Scheduler(settings, pool, deliverer, health)
                    dispatcher = Dispatcher(settings, pool, deliverer, scheduler, health)
                    poison = PoisonRecorder(settings, pool, health)
                    # The deliverer owns in-flight attempts and drains them on stop; it is not
                    # restarted (a crash there is a bug, and its tasks die with it).
                    tasks.append(tg.create_task(deliverer.run(stop, force)))
                    tasks.append(tg.create_task(supervise("scheduler", scheduler.run, stop)))
                    tasks.append(tg.create_task(supervise("dispatch", dispatcher.run, stop)))
                    tasks.append(tg.create_task(supervise("poison", poison.run, stop)))
                if until_idle:
                    burst = tg.create_task(
                        stop_when_idle(
                            settings,
                            pool,
                            health,
                            relay=relay,
                            held=dispatcher.held if worker else None,
                            timeout_s=idle_timeout_s,
                            stop=stop,
                        )
                    )
                    tasks.append(burst)
                if ready is not None:
                    ready(health)
                await stop.wait()
                health.draining = True
                # Components stop taking work at once; the deliverer has the drain deadline.
                # Past it (plus teardown time), whatever still runs is cancelled.
                _done, pending = await asyncio.wait(
                    tasks, timeout=settings.shutdown_timeout_s + _TEARDOWN_S
                )
                for task in pending:
                    log.warning("component_cancelled_at_deadline", task=task.get_name())
                    task.cancel()
    finally:
        await pool.close()
        remove_signals()
        await tracing.stop(settings)  # last: the drain's spans are exported too
        log.info("stopped", role=role)
    if burst is not None and burst.done() and not burst.cancelled() and (left := burst.result()):
        raise TimeoutError(f"{role}: work was left after {idle_timeout_s:g} s: {left}")
