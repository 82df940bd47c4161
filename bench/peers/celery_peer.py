"""The Celery peer: prefork, ``acks_late=True``, concurrency 4, RabbitMQ broker, no result
backend. Run as ``celery -A bench.peers.celery_peer worker -P prefork -c 4 -Q <queue>``."""

from __future__ import annotations

import os

from celery import Celery

from bench.peers.common import ENV_AMQP_URL, ENV_QUEUE, PeerConfig

TASK_NAME = "bench.deliver"


def make_app(amqp_url: str, queue: str) -> Celery:
    app = Celery("bench_peer", broker=amqp_url)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = make_app(os.environ.get(ENV_AMQP_URL, "amqp://"), os.environ.get(ENV_QUEUE, "bench"))

if ENV_QUEUE in os.environ:  # in the worker; the orchestrator only publishes by task name
    from bench.peers.sync_job import SyncJob

    _job = SyncJob(PeerConfig.from_env())

    @app.task(name=TASK_NAME, acks_late=True)
    def deliver(event_id: str, body: str) -> None:
        _job(event_id, body)
