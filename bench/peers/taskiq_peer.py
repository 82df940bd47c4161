"""The taskiq peer: ``AioPikaBroker`` (taskiq-aio-pika), one async task, run as
``taskiq worker bench.peers.taskiq_peer:broker --workers 2 --max-async-tasks 16
--max-prefetch 16 --ack-type when_executed --log-level WARNING``.

Configured as taskiq's documentation says for throughput and at-least-once work
(docs/guide/cli.md in taskiq, the README of taskiq-aio-pika):
- ``--workers 2`` worker processes (the default; one per core here), ``--max-async-tasks 16``
  each (32 in flight in all, as every other peer) and ``--max-prefetch 16`` ("useful for
  systems with high message rates"), over a channel ``qos`` of 100 (the broker's "number of
  messages that worker can prefetch", default 10);
- ``--ack-type when_executed``: ack right after the task ran (the default, ``when_saved``, waits
  for a result backend this job has none of). taskiq acks a task that raised too, so
  ``SimpleRetryMiddleware`` sends a failed delivery again (same task id) before that ack;
- the job's pool and HTTP session opened on ``WORKER_STARTUP`` and kept in the broker's state
  (docs/guide/state-and-deps.md); ``--log-level WARNING`` turns off the INFO line per task.
The queue is taskiq-aio-pika's default kind, a quorum queue (the other peers' are classic).
"""

from __future__ import annotations

import os
from typing import Annotated

from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends, TaskiqEvents, TaskiqState
from taskiq_aio_pika import AioPikaBroker, Exchange, Queue

from bench.peers.async_job import AsyncJob
from bench.peers.common import ENV_AMQP_URL, ENV_QUEUE, PeerConfig

TASK_NAME = "bench.deliver"
WORKERS = 2
MAX_ASYNC_TASKS = 16
MAX_PREFETCH = 16
QOS = 100
# A failed delivery is retried until it succeeds, like the broker-redelivered peers (the bench's
# subscriber always answers 200; this is the failure path's shape, not a measured one).
RETRIES = 1_000_000


def names(prefix: str) -> dict[str, str]:
    """Exchange, queue and dead-letter queue of one bench session (never the shared defaults
    ``taskiq`` / ``taskiq.dead_letter``, which other sessions on the broker would share)."""
    return {"exchange": prefix, "queue": f"{prefix}.queue", "dead_letter": f"{prefix}.dead_letter"}


def make_broker(amqp_url: str, prefix: str) -> AioPikaBroker:
    n = names(prefix)
    return AioPikaBroker(
        amqp_url,
        qos=QOS,
        exchange=Exchange(name=n["exchange"]),
        task_queues=[Queue(name=n["queue"])],
        dead_letter_queue=Queue(name=n["dead_letter"]),
    ).with_middlewares(SimpleRetryMiddleware(default_retry_count=RETRIES, default_retry_label=True))


if ENV_QUEUE in os.environ:  # in the worker; the orchestrator uses make_broker and TASK_NAME
    _config = PeerConfig.from_env()
    # The orchestrator names the queue "<prefix>.queue"; the rest follows from the prefix.
    broker = make_broker(os.environ[ENV_AMQP_URL], _config.queue.removesuffix(".queue"))

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def _open(state: TaskiqState) -> None:
        state.job_cm = AsyncJob.open(_config, MAX_ASYNC_TASKS)
        state.job = await state.job_cm.__aenter__()

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    async def _close(state: TaskiqState) -> None:
        await state.job_cm.__aexit__(None, None, None)

    @broker.task(task_name=TASK_NAME)
    async def deliver(
        event_id: str, body: str, context: Annotated[Context, TaskiqDepends()]
    ) -> None:
        job: AsyncJob = context.state.job
        await job(event_id, body.encode())
