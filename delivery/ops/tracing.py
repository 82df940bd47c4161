"""OpenTelemetry tracing: an optional extra (``pip install 'delivery-webhooks[otel]'``).

One span per webhook attempt (``webhook.deliver``, kind CLIENT), a child of the producer's
``traceparent`` stored with the event; the request then carries the attempt span's context, so
the subscriber continues the same trace. OpenTelemetry is imported only by ``start`` and only
when ``DELIVERY_OTEL_ENABLED`` is on: the core package never needs it, and with tracing off the
hot path costs one check, ``tracing.tracer is None``.

The producer side needs no setting: ``current_traceparent`` reads the current span of a process
that already uses OpenTelemetry (it never imports it), so an instrumented producer's trace
continues through the outbox.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import orjson

from delivery.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

    from delivery.settings import Settings

MISSING_EXTRA = (
    "DELIVERY_OTEL_ENABLED is true but OpenTelemetry is not installed: "
    "pip install 'delivery-webhooks[otel]' (or turn tracing off)"
)
ATTEMPT_SPAN = "webhook.deliver"
DEFAULT_SERVICE_NAME = "delivery"  # unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says
# The outcome of a successful attempt: ``Outcome.DELIVERED`` of delivery.worker.retry, as the
# plain string it is (ops imports no pipeline stage; tests/unit/test_layout.py checks they agree).
DELIVERED = "delivered"

#: This process's tracer while tracing runs; ``None`` when DELIVERY_OTEL_ENABLED is off. The
#: hot path checks only this.
tracer: Tracer | None = None


class _State:
    """What ``start`` set up, for ``start_attempt`` / ``end_attempt`` and ``stop``."""

    provider: TracerProvider | None = None
    owned = False  # True: ``start`` made the provider, so ``stop`` shuts it down
    users = 0  # processes embedded in one interpreter (demo, tests) share one provider
    extract: Any = None  # W3C traceparent -> parent context (the SDK's propagator)
    client_kind: Any = None
    error_status: Any = None


_state = _State()


def start(settings: Settings) -> None:
    """At process start: set up tracing if enabled, else nothing. Exporting is configured by
    the SDK's own variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ...).

    A process that embeds us and already configured an SDK ``TracerProvider`` (an application,
    the tests) keeps it and its exporters; otherwise spans go through a ``BatchSpanProcessor`` to
    the OTLP/HTTP exporter. Raises ``ConfigError`` (one line) when the extra is missing."""
    global tracer  # noqa: PLW0603 - a module attribute keeps the hot path's check to one lookup
    if not settings.otel_enabled:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    _state.users += 1
    if tracer is not None:
        return
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        _state.provider, _state.owned = current, False
    else:
        # Not made global: the global can be set once per interpreter, and an embedding
        # process may start and stop us more than once.
        provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _state.provider, _state.owned = provider, True
    _state.extract = TraceContextTextMapPropagator().extract
    _state.client_kind, _state.error_status = trace.SpanKind.CLIENT, trace.StatusCode.ERROR
    tracer = _state.provider.get_tracer("delivery")


async def stop(settings: Settings) -> None:
    """In the ordered shutdown, after the pools close: export what is buffered, then stop.
    Bounded by the SDK (its batch processor's 30 s and the exporter's request timeout)."""
    global tracer
    if not settings.otel_enabled or _state.users == 0:
        return
    _state.users -= 1
    if _state.users > 0:
        return
    provider, tracer, _state.provider = _state.provider, None, None
    if provider is not None:
        await asyncio.to_thread(provider.shutdown if _state.owned else provider.force_flush)


def _resource() -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def format_traceparent(context: SpanContext) -> str:
    """The W3C ``traceparent`` of a span context: ``00-<trace id>-<span id>-<flags>``."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


# -- producer side -----------------------------------------------------------------------------


def current_traceparent() -> str | None:
    """The current span's ``traceparent`` if this process uses OpenTelemetry and a span is
    current; ``None`` otherwise. Never imports OpenTelemetry: a producer that does not use it
    pays one dictionary lookup per publish."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format_traceparent(context) if context.is_valid else None


def current_log_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current span for a log line (hex, as W3C spells
    them); empty without a current span. Never imports OpenTelemetry."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def log_ids(traceparent: str | None) -> dict[str, str]:
    """``trace_id`` and ``span_id`` of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``)
    for a log line; empty when there is none or it is malformed."""
    parts = traceparent.split("-") if traceparent else []
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return {}
    return {"trace_id": parts[1], "span_id": parts[2]}


# -- worker side -------------------------------------------------------------------------------


def start_attempt(
    headers: dict[str, str],
    *,
    traceparent: str | None,
    body: bytes,
    subscription_id: str,
    attempt: int,
) -> Span:
    """Start the ``webhook.deliver`` span of one attempt, a child of the event's stored
    ``traceparent`` (a new trace without one), and put its context in the request's
    ``traceparent`` header. Call only while tracing runs (``tracer is not None``)."""
    assert tracer is not None
    parent = _state.extract({"traceparent": traceparent}) if traceparent else None
    event_type = orjson.loads(body).get("type")  # a job carries the body; parsed only when on
    span = tracer.start_span(
        ATTEMPT_SPAN,
        context=parent,
        kind=_state.client_kind,
        attributes={
            "webhook.event_type": str(event_type),
            "webhook.subscription_id": subscription_id,
            "webhook.attempt": attempt,
            "http.request.method": "POST",
        },
    )
    headers["traceparent"] = format_traceparent(span.get_span_context())
    return span


def end_attempt(span: Span, *, outcome: str, status: int | None, error: str | None) -> None:
    """End an attempt's span with what happened: the HTTP status (none: no answer) and the
    outcome (``delivered``, ``retry``, ..., or ``handed_back`` when the attempt was cut)."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    span.set_attribute("webhook.outcome", outcome)
    if outcome != DELIVERED:
        span.set_status(_state.error_status, error or (f"HTTP {status}" if status else outcome))
    span.end()
