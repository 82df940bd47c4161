# ruff: noqa: RUF001  (markdown: typographic signs meant)
"""How the figures were measured, and on what: the method, the machine, versions and load."""

from __future__ import annotations

from typing import Any


def method(meta: dict[str, Any]) -> list[str]:
    return [
        "## Method",
        "",
        "* **One job everywhere.** Consume from RabbitMQ; dedupe in PostgreSQL on an inbox table "
        "keyed by the event id (`INSERT … ON CONFLICT DO NOTHING`); POST the event with Standard "
        "Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`, signed by "
        "`delivery.signing`); record a row per delivery; ack. The peers do all of it in one "
        "transaction per message (inbox row, POST, delivery row, COMMIT, then ack; a failed POST "
        "rolls back and is not acked) — `bench/peers/`. Ours runs its real path: "
        "`delivery.publish_many` into the outbox → relay (publisher confirms, mandatory, quorum "
        "queue) → dispatch (inbox + delivery rows, one statement per batch, then ack) → "
        "deliverer (POST, outcome recorded with group commit), with default settings.",
        "* **Peers.** Celery: prefork, `acks_late=True`, concurrency 4, default prefetch "
        "multiplier, no result backend, psycopg 3 + requests. Dramatiq: `RabbitmqBroker`, "
        "default middleware, 4 processes × 8 threads, psycopg 3 + requests. Hand-written "
        "asyncio: aio-pika + aiohttp + asyncpg on uvloop, prefetch 100, a semaphore of 32 "
        "(one pooled connection each). FastStream: `RabbitBroker` (on aio-pika), "
        "`faststream run --workers 2`, `Channel(prefetch_count=16)` per process (aio-pika runs "
        "every prefetched message at once, so prefetch is the concurrency), "
        "`AckPolicy.NACK_ON_ERROR`. taskiq: `AioPikaBroker` (taskiq-aio-pika), `taskiq worker "
        "--workers 2 --max-async-tasks 16 --max-prefetch 16 --ack-type when_executed`, qos 100, "
        "`SimpleRetryMiddleware` for a failed delivery (taskiq acks a task that raised). The three "
        "asyncio peers run the same job class (`bench/peers/async_job.py`: asyncpg + aiohttp), "
        "32 messages in progress in all; each module's docstring cites the documentation it "
        "follows. Their queues are durable and declared as each framework declares them: classic, "
        "but taskiq-aio-pika's, which is a quorum queue by default; messages are persistent.",
        "* **Entry points.** The peers' job starts at their queue: the orchestrator publishes "
        "with each framework's own client (`send_task`, `broker.enqueue`, aio-pika, "
        "`RabbitBroker.publish`, `kiq`). Ours starts "
        "at the outbox, one hop earlier, and pays for the relay and a second RabbitMQ pass.",
        "* **Flat out.** Each system is started and warmed up (20 events through), then every "
        "one of its processes is paused (SIGSTOP), the backlog is staged at its entry point, the "
        "CPU counters are read, and the clock starts at SIGCONT. Events/s = events ÷ (last "
        "arrival − release). The run ends when every delivery has arrived *and* is recorded in "
        "PostgreSQL. *Live producer* (ours only): the same without the pause, the producer "
        "publishing in batches of 1,000 while the system runs.",
        "* **Paced.** 500 events/s, 10 s; ours: one event per producer transaction "
        "(`publish_many(conn, [event])`), latency from commit; peers: one publish per event, "
        "latency from the publish call returning. Nearest-rank percentiles over all events.",
        "* **Measured from outside**, via /proc: CPU = utime+stime (plus reaped children's) summed "
        "over the whole process tree of the system (the children of Celery, Dramatiq, "
        "`faststream run` and `taskiq worker` included); "
        "RSS = each process's VmHWM. The subscriber is the project's receiver "
        "(`delivery.testing.receiver`, aiohttp) run by `bench/receiver.py` on uvloop in its own "
        "process: "
        "answers 200, records arrival times, verifies every signature; its CPU is not counted. "
        "PostgreSQL's and RabbitMQ's CPU are not counted for anyone.",
        "* **Shared machine.** Before each session the bench waits (bounded) for the 1-minute load "
        "to drop; the load seen is in the table at the end. Systems are interleaved run by run "
        "(ours, asyncio, FastStream, taskiq, Dramatiq, Celery, then again) so a load change hits "
        "all of them.",
        "",
    ]


def machine(meta: dict[str, Any], compare: dict[str, list[dict[str, Any]]]) -> list[str]:
    m = meta.get("machine", {})
    servers = meta.get("servers", {})
    own_pg = meta.get("params", {}).get("own_postgres", False)
    out = [
        "## Machine, versions, load",
        "",
        f"* CPU: {m.get('cpu_model', '?')}, `nproc` = {m.get('nproc', '?')}; kernel "
        f"{m.get('kernel', '?')}; Python {m.get('python', '?')}",
        f"* Servers: PostgreSQL {servers.get('postgresql', '?')}, RabbitMQ "
        f"{servers.get('rabbitmq', '?')}, every system isolated by database and queue names. "
        + (
            f"PostgreSQL's settings: {servers['postgresql settings']}"
            + (" (a throwaway server started by `--own-postgres`)" if own_pg else "")
            + "."
            if "postgresql settings" in servers
            else ""
        ),
        "* Packages: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "",
        "`free -h` at start:",
        "",
        "```",
        m.get("free_h", ""),
        "```",
        "",
    ]
    loads = [
        (name, i + 1, r.get("busy"), r.get("load"), r.get("waited_s"))
        for name, runs in compare.items()
        for i, r in enumerate(runs)
    ]
    if loads:
        out.append(
            "Other engineers' work on the machine when each comparison session started (CPU busy "
            "over 2-5 s with nothing of ours running, and the 1-minute load average; the bench "
            "waited, up to a limit, for it to drop under the threshold): "
            + ", ".join(
                f"{n} #{i}: {b:.0%} busy, load {ld:.2f}" + (f" (waited {w}s)" if w else "")
                for n, i, b, ld, w in loads
                if b is not None
            )
            + "."
        )
        out.append("")
    return out


def load(value: Any) -> str:
    if not value:
        return "?"
    return ", ".join(f"{v:.2f}" for v in value)
