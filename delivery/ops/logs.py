"""structlog set-up: JSON lines in production, readable in a terminal. Called once per process.

The records of the libraries underneath (aiormq's "error when creating transport", asyncio's,
warnings) go through structlog's ``ProcessorFormatter`` with the same processors and renderer
as our own lines: a JSON log is all JSON, one object a line, each with a ``logger`` field (and
``trace_id``/``span_id`` when tracing is on and a span is current).
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


class _Writer(structlog.WriteLogger):
    """structlog's writer (flushed per line, one lock per file) with a name: the ``logger``
    field of our own lines."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _Handler(logging.Handler):
    """The standard library's records, rendered by structlog and written by structlog's writer
    (under the same lock as our own lines, so two lines never mix)."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._writer.msg(self.format(record))
        except Exception:
            self.handleError(record)


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
    rendering: list[structlog.types.Processor]
    if fmt == "json" or (fmt == "auto" and not tty):
        rendering = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # The console renderer formats exceptions itself (format_exc_info would flatten them),
        # plainly: with `rich` installed (a test tool pulls it in) structlog would render each
        # traceback with it, tens of milliseconds a time, which throttles a failing loop's logs.
        rendering = [
            structlog.dev.ConsoleRenderer(
                colors=tty and not no_color, exception_formatter=structlog.dev.plain_traceback
            )
        ]
    # The libraries' records (aiormq, asyncio, warnings): the same processors and renderer.
    handler = _Handler(_Writer(out, "logging"))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level_number(level))
    _installed = handler
    logging.captureWarnings(True)
    # Our own lines go straight to the writer: the standard library's machinery would cost
    # about three times as much per line.
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=lambda *names: _Writer(out, str(names[0]) if names else "delivery"),
        cache_logger_on_first_use=True,
    )
