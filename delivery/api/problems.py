"""Every error the API answers, as ``{"error": {"code", "message", "field"}}``.

``ApiError`` is raised by handlers and by the request adapter; ``from_platform`` maps the
platform's own errors (``delivery.errors``) to statuses, so handlers just call the store.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson
from aiohttp import web

from delivery.errors import (
    BlockedTargetError,
    EventIdTakenError,
    InputError,
    NotFoundError,
    PublishConflictError,
    QuotaExceededError,
)

# ``data.price: must be ...`` -> ``data.price``: the store's messages start with the field.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\])?(?:\.\w+(?:\[\d+\])?)*): ")

# code -> the status it answers with; the codes are part of what clients program against.
STATUS = {
    "invalid_request": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "unprocessable": 422,
    "quota_exceeded": 409,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}


class ApiError(Exception):
    """An answer other than success: ``code`` (see ``STATUS``), one-line message, the field to
    blame if any, extra response headers."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = STATUS[code]
        self.message = message
        self.field = field
        self.headers = headers or {}


def field_of(message: str) -> str | None:
    """The field a store message names first (``events: ...`` -> ``events``), if any."""
    found = _FIELD_PREFIX.match(message)
    return found.group(1) if found else None


def from_platform(exc: Exception) -> ApiError | None:  # noqa: PLR0911 - one answer per kind
    """The API's answer to a platform error, or ``None`` if it is not one we expect."""
    message = str(exc)
    if isinstance(exc, NotFoundError):
        return ApiError("not_found", message)
    if isinstance(exc, BlockedTargetError):
        return ApiError("unprocessable", message, field="url")
    if isinstance(exc, EventIdTakenError):
        return ApiError("conflict", message, field="id")
    if isinstance(exc, InputError):
        return ApiError("unprocessable", message, field=field_of(message))
    if isinstance(exc, QuotaExceededError):
        if exc.retry_after_s is not None:
            wait_s = max(1, math.ceil(exc.retry_after_s))
            return ApiError("rate_limited", message, headers={"Retry-After": str(wait_s)})
        return ApiError("quota_exceeded", message)
    if isinstance(exc, PublishConflictError):
        return ApiError("conflict", message)
    return None


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status,
        body=orjson.dumps(error_body(error.code, error.message, error.field)),
        content_type="application/json",
        headers=error.headers,
    )
