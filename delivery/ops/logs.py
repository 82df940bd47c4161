"""structlog set-up: JSON lines in production, readable in a terminal. Called once per process.

structlog renders through the standard library (``ProcessorFormatter``), so the records of the
libraries underneath (aiormq's "error when creating transport", asyncio's, warnings) go through
the same processors and renderer as ours: a JSON log is all JSON, one object a line, each with
a ``logger`` field (and ``trace_id``/``span_id`` when tracing is on and a span is current).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

from delivery.ops import tracing

# Keys whose values must never reach a log line, whatever a caller binds.
_SECRET_KEYS = frozenset({"secret", "previous_secret", "password", "authorization", "body"})

# The handler this module put on the root logger, replaced when logging is configured again
# (the demo and the tests configure it more than once in one interpreter).
_installed: logging.Handler | None = None


def _redact(
    _logger: object, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "[redacted]"
    return event_dict


def _add_trace_ids(
    _logger: object, _method: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    if tracing.tracer is not None and "trace_id" not in event_dict:
        event_dict.update(tracing.current_log_ids())
    return event_dict


def level_number(level: str) -> int:
    """``info``, ``INFO`` or ``Info``: the standard library's number for it."""
    return logging.getLevelNamesMapping()[level.upper()]


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    *,
    no_color: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and the standard library's records to ``stream`` (standard error).

    ``auto`` is console on a terminal and JSON elsewhere; the console has colours only on a
    terminal and never with ``no_color`` (the NO_COLOR convention)."""
    global _installed  # noqa: PLW0603 - one root handler per process, replaced on reconfiguring
    out = stream if stream is not None else sys.stderr
    tty = out.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        _redact,
    ]
    rendering: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if fmt == "json" or (fmt == "auto" and not tty):
        rendering += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # The console renderer formats exceptions itself (format_exc_info would flatten them).
        rendering.append(structlog.dev.ConsoleRenderer(colors=tty and not no_color))
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=rendering)
    )
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level_number(level))
    _installed = handler
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
