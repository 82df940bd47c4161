"""Every error the platform raises on purpose, named for what the caller does next."""

from __future__ import annotations


class DeliveryPlatformError(Exception):
    """Base class: anything the platform raises deliberately."""


class ConfigError(DeliveryPlatformError):
    """A setting is missing or malformed: fix the environment and start again."""


class InputError(DeliveryPlatformError):
    """Bad input from a producer or an operator: fix the input; nothing was written."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class NotFoundError(InputError):
    """The named object (subscription, dead letter) does not exist."""


class RetryableDeliveryError(DeliveryPlatformError):
    """The attempt failed in a way that may succeed later: schedule another attempt."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


class PermanentDeliveryError(DeliveryPlatformError):
    """The subscriber refused the event for good: dead-letter it with the reason."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class SubscriptionGoneError(PermanentDeliveryError):
    """The subscriber answered 410 Gone: disable the subscription, keep its events."""


class PublishError(DeliveryPlatformError):
    """The broker did not confirm a publish (nack, return, timeout): leave the row, retry."""
