"""The Dramatiq peer: RabbitmqBroker, default middleware, run as
``dramatiq bench.peers.dramatiq_peer --processes 4 --threads 8 --queues <queue>``."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.peers.common import ENV_AMQP_URL, ENV_QUEUE, PeerConfig

ACTOR_NAME = "deliver"

broker = RabbitmqBroker(url=os.environ.get(ENV_AMQP_URL, "amqp://"))
dramatiq.set_broker(broker)

if ENV_QUEUE in os.environ:
    from bench.peers.sync_job import SyncJob

    _job = SyncJob(PeerConfig.from_env())

    @dramatiq.actor(actor_name=ACTOR_NAME, queue_name=os.environ[ENV_QUEUE])
    def deliver(event_id: str, body: str) -> None:
        _job(event_id, body)
