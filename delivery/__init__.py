"""Reliable webhook delivery: transactional outbox -> RabbitMQ -> signed Standard Webhooks.

The producer API::

    async with conn.transaction():
        await create_order(conn, ...)
        await delivery.publish(conn, {"type": "trade.executed", "account_id": "acc_1", ...})
"""

from delivery.errors import (
    ConfigError,
    DeliveryPlatformError,
    EventIdTakenError,
    InputError,
    NotFoundError,
    PublishConflictError,
    SignatureError,
)
from delivery.events import EVENT_TYPES, NewEvent, parse_event
from delivery.outbox import PublishResult, publish, publish_many

__all__ = [
    "EVENT_TYPES",
    "ConfigError",
    "DeliveryPlatformError",
    "EventIdTakenError",
    "InputError",
    "NewEvent",
    "NotFoundError",
    "PublishConflictError",
    "PublishResult",
    "SignatureError",
    "parse_event",
    "publish",
    "publish_many",
]
