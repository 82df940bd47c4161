"""OpenTelemetry, the optional extra: the producer's trace continues through the outbox and the
broker into one ``webhook.deliver`` span per attempt, and the subscriber continues it; with
tracing off the stored traceparent passes through unchanged; without the extra the core still
imports, and turning tracing on fails at start-up with one line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import asyncpg
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from delivery import publish
from delivery.errors import ConfigError
from delivery.ops import logs, tracing
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.testing.env import environment_without_settings
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import running

STORED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# Makes every `import opentelemetry...` fail in a fresh interpreter, as if the extra were absent.
_WITHOUT_OTEL = "import sys; sys.modules['opentelemetry'] = None\n"


@pytest.fixture(scope="session")
def _memory_exporter() -> InMemorySpanExporter:
    """The test process's own OpenTelemetry set-up, which the platform joins when enabled."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)  # once per interpreter
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_memory_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    _memory_exporter.clear()
    yield _memory_exporter
    _memory_exporter.clear()


def attempt_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    found = [s for s in exporter.get_finished_spans() if s.name == tracing.ATTEMPT_SPAN]
    return sorted(found, key=lambda s: s.attributes["webhook.attempt"] if s.attributes else 0)


def ids(traceparent: str | None) -> tuple[int, int]:
    """(trace id, span id) of a W3C traceparent."""
    assert traceparent is not None
    version, trace_id, span_id, _flags = traceparent.split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = environment_without_settings("OTEL_")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **env},
    )


# -- without the extra (no services) -----------------------------------------------------------


def test_the_core_neither_needs_nor_imports_opentelemetry():
    code = textwrap.dedent(
        """
        import asyncio, sys
        import delivery, delivery.cli, delivery.worker.deliverer, delivery.outbox, delivery.ops.tracing
        import workers.process
        from delivery.settings import Settings
        assert delivery.ops.tracing.current_traceparent() is None
        delivery.ops.tracing.start(Settings(otel_enabled=False))
        assert delivery.ops.tracing.tracer is None
        asyncio.run(delivery.ops.tracing.stop(Settings(otel_enabled=False)))
        print(sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v))
        """
    )
    blocked = _python(_WITHOUT_OTEL + code)
    assert blocked.returncode == 0, blocked.stderr
    # Installed but unused: importing and running the core with tracing off loads none of it.
    installed = _python(code)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == "[]"


def test_enabled_without_the_extra_stops_at_start_up(monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError) as raised:
        tracing.start(Settings(otel_enabled=True))
    assert "DELIVERY_OTEL_ENABLED" in str(raised.value)
    assert "pip install 'delivery-webhooks[otel]'" in str(raised.value)
    assert tracing.tracer is None


def test_the_command_names_the_setting_and_the_extra_in_one_line():
    code = _WITHOUT_OTEL + (
        "from delivery.cli import main\nsys.exit(main(['worker', '--admin-port', '0']))\n"
    )
    result = _python(
        code,
        DELIVERY_OTEL_ENABLED="true",
        # Never reached: tracing is checked before anything connects.
        DELIVERY_DATABASE_URL="postgresql://nobody@127.0.0.1:9/none",
        DELIVERY_AMQP_URL="amqp://nobody@127.0.0.1:9/",
        DELIVERY_LOG_FORMAT="json",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("delivery worker: DELIVERY_OTEL_ENABLED")
    assert "pip install 'delivery-webhooks[otel]'" in lines[0]


# -- on the real pipeline ----------------------------------------------------------------------


@pytest.mark.integration
async def test_the_subscriber_continues_the_producers_trace_through_the_attempt_span(
    settings, spans
):
    settings = settings.model_copy(update={"otel_enabled": True})
    producer_tracer = trace.get_tracer("tests.producer")
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        sub = await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        async with running(settings):
            assert tracing.tracer is not None
            with producer_tracer.start_as_current_span("place_order") as producer_span:
                await publish(conn, trade(1, id="evt_otel"))
            await receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout_s=30, what="one")
            await wait_until(lambda: attempt_spans(spans), timeout_s=10, what="the attempt span")
        assert tracing.tracer is None  # stopped with the process
        producer = producer_span.get_span_context()
        stored = await conn.fetchval(
            "SELECT traceparent FROM delivery.outbox WHERE event_id = 'evt_otel'"
        )
    await conn.close()

    # The producer's span was stored with the event.
    assert ids(stored) == (producer.trace_id, producer.span_id)
    # One attempt span, a child of the producer's, that the subscriber's request carries.
    [attempt] = attempt_spans(spans)
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.parent is not None
    assert (attempt.parent.trace_id, attempt.parent.span_id) == (
        producer.trace_id,
        producer.span_id,
    )
    assert ids(receiver.delivered()[0].traceparent) == (producer.trace_id, attempt.context.span_id)
    assert dict(attempt.attributes or {}) == {
        "webhook.event_type": "trade.executed",
        "webhook.subscription_id": sub.id,
        "webhook.attempt": 1,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "webhook.outcome": "delivered",
    }
    assert attempt.status.status_code is StatusCode.UNSET


@pytest.mark.integration
async def test_every_attempt_is_its_own_span_under_the_producers(settings, spans):
    settings = settings.model_copy(update={"otel_enabled": True})
    producer_tracer = trace.get_tracer("tests.producer")
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        receiver.set_behaviour("/h", Behaviour(status=503))
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        async with running(settings):
            with producer_tracer.start_as_current_span("place_order") as producer_span:
                await publish(conn, trade(1, id="evt_retried"))
            await receiver.wait_for(lambda r: len(r.arrivals) >= 1, timeout_s=30, what="a 503")
            receiver.set_behaviour("/h", Behaviour())
            await receiver.wait_for(lambda r: len(r.delivered()) == 1, timeout_s=30, what="a 2xx")
            await wait_until(
                lambda: len(attempt_spans(spans)) == len(receiver.arrivals),
                timeout_s=10,
                what="a span per attempt",
            )
    await conn.close()

    producer = producer_span.get_span_context()
    attempts = attempt_spans(spans)
    arrivals = receiver.arrivals
    assert len(attempts) >= 2
    for number, (span, arrival) in enumerate(zip(attempts, arrivals, strict=True), start=1):
        assert span.parent is not None
        assert span.parent.span_id == producer.span_id
        assert ids(arrival.traceparent) == (producer.trace_id, span.context.span_id)
        assert span.attributes is not None
        assert span.attributes["webhook.attempt"] == number
        assert span.attributes["http.response.status_code"] == arrival.status
    assert [s.attributes["webhook.outcome"] for s in attempts if s.attributes] == [
        *["retry"] * (len(attempts) - 1),
        "delivered",
    ]
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert len({s.context.span_id for s in attempts}) == len(attempts)


@pytest.mark.integration
async def test_with_tracing_off_the_stored_traceparent_passes_through_unchanged(settings, spans):
    assert not settings.otel_enabled
    producer_tracer = trace.get_tracer("tests.producer")
    conn = await asyncpg.connect(settings.database_url)
    async with Receiver() as receiver:
        await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
        async with running(settings):
            assert tracing.tracer is None
            await publish(conn, trade(1, id="evt_given", traceparent=STORED))
            with producer_tracer.start_as_current_span("place_order") as producer_span:
                await publish(conn, trade(2, id="evt_from_span"))
                # An event's own traceparent wins over the current span.
                await publish(conn, trade(3, id="evt_given_in_span", traceparent=STORED))
            await receiver.wait_for(lambda r: len(r.delivered()) == 3, timeout_s=30, what="3")
        stored = dict(await conn.fetch("SELECT event_id, traceparent FROM delivery.outbox"))
    await conn.close()

    producer = producer_span.get_span_context()
    assert ids(stored["evt_from_span"]) == (producer.trace_id, producer.span_id)
    assert stored["evt_given"] == stored["evt_given_in_span"] == STORED
    received = {a.webhook_id: a.traceparent for a in receiver.delivered()}
    assert received == stored
    assert attempt_spans(spans) == []


def test_a_log_line_inside_a_current_span_carries_its_ids(spans, monkeypatch):
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        logs.configure_logging("json", "info", stream=stream)
        log = structlog.get_logger("tests.tracing")
        with trace.get_tracer("tests").start_as_current_span("work") as span:
            log.info("off")  # tracing off: no ids, even inside a span
            monkeypatch.setattr(tracing, "tracer", trace.get_tracer("delivery"))
            log.info("inside")
            logging.getLogger("some.library").warning("theirs")
        log.info("outside")
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        logs._installed = None

    lines = {r["event"]: r for r in map(json.loads, stream.getvalue().splitlines())}
    context = span.get_span_context()
    ids = {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
    for event in ("inside", "theirs"):
        assert {k: lines[event].get(k) for k in ids} == ids, lines[event]
    assert "trace_id" not in lines["off"] and "trace_id" not in lines["outside"]
    assert lines["theirs"]["logger"] == "some.library"
