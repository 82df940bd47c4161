"""The FastStream peer: ``RabbitBroker`` (on aio-pika), one subscriber, run as
``faststream run bench.peers.faststream_peer:app --workers 2 --log-level warning``.

Configured as FastStream's documentation says for throughput and at-least-once work:
- aio-pika starts a task per delivered message, so the channel's ``prefetch_count`` is the
  subscriber's concurrency (``Channel(prefetch_count=...)`` on the broker's default channel, as in
  docs/en/rabbit/examples/stream.md; without it RabbitMQ pushes the whole backlog at once);
- ``AckPolicy.NACK_ON_ERROR`` (docs/en/getting-started/acknowledgement.md, "Automatic Retry on
  Failure"): ack after the handler returns, nack with requeue when it raises. The RabbitMQ
  default, ``REJECT_ON_ERROR``, would drop a failed delivery;
- ``faststream run --workers N`` to scale over processes (docs/en/getting-started/cli.md,
  "Scaling"), and the job's pool and HTTP session opened in the app's ``lifespan``
  (docs/en/getting-started/lifespan/context.md). uvloop is used when installed (cli.md, "Event
  Loop"); ``--log-level warning`` turns off the two INFO lines FastStream logs per message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from faststream import AckPolicy, Context, ContextRepo, FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from bench.peers.async_job import AsyncJob
from bench.peers.common import ENV_AMQP_URL, ENV_QUEUE, PeerConfig

WORKERS = 2  # one process per core of the machine the bench was written for


def queue(name: str) -> RabbitQueue:
    """The queue as the subscriber declares it (the orchestrator declares the same one)."""
    return RabbitQueue(name, durable=True)


def make_broker(amqp_url: str, prefetch: int) -> RabbitBroker:
    return RabbitBroker(
        amqp_url,
        default_channel=Channel(prefetch_count=prefetch),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        graceful_timeout=10.0,  # SIGTERM: stop consuming, let in-flight messages finish
    )


if ENV_QUEUE in os.environ:  # in the worker; the orchestrator only uses the helpers above
    _config = PeerConfig.from_env()
    broker = make_broker(os.environ[ENV_AMQP_URL], _config.prefetch)

    @asynccontextmanager
    async def lifespan(context: ContextRepo) -> AsyncIterator[None]:
        async with AsyncJob.open(_config, _config.concurrency) as job:
            context.set_global("job", job)
            yield

    @broker.subscriber(queue(_config.queue))
    async def deliver(msg: RabbitMessage, job: Annotated[AsyncJob, Context()]) -> None:
        # The raw message, not a decoded body: signed over the bytes as they came off the wire,
        # like every other peer.
        await job(msg.message_id or "", msg.body)

    app = FastStream(broker, lifespan=lifespan)
