"""Every error the platform raises on purpose, named for what the caller does next.

Hierarchy::

    DeliveryPlatformError
    ├── ConfigError ................ fix the environment and start again (CLI exit 2)
    │   └── MigrationChangedError .. restore the applied migration file; nothing was applied
    ├── InputError ................. fix the input; nothing was written (CLI exit 2)
    │   ├── NotFoundError .......... name an object that exists
    │   ├── BlockedTargetError ..... point the subscription at a public address
    │   └── EventIdTakenError ...... choose another event id (another tenant holds this one)
    ├── QuotaExceededError ......... wait ``retry_after_s`` (rate) or free or raise the quota
    ├── PublishConflictError ....... publish the same events again (CLI exit 1)
    ├── PoisonMessageError ......... dead-letter the message; it can never be processed
    ├── SignatureError ............. reject the webhook (a receiver's answer, 401)
    ├── QueueMissingError .......... start the consumer again; it declares its queue anew
    ├── BrokerNodeLostError ........ start the component again: it connects to another node
    ├── StreamRefusedError ......... fix the stream client's key, scope or accounts
    └── StoppedBeforeConnected ..... nothing: shutdown began before the broker or database answered

Raised where: ``ConfigError`` by settings, migrations, tracing and the admin server
(``MigrationChangedError`` by ``delivery.store.migrations``);
``InputError`` by event, subscription and dead-letter validation and the CLI;
``BlockedTargetError`` by the SSRF guard (``delivery.targets``), when a subscription is made
and again when the worker connects (``delivery.worker.resolver``);
``PublishConflictError`` by ``delivery.outbox``; ``PoisonMessageError`` by the wire decoder
(``delivery.broker.wire``, through ``delivery.events.routing_facts``);
``SignatureError`` by ``delivery.signing.verify``; ``QueueMissingError`` by the queue-depth
watcher (``delivery.broker.depths``) that dispatch runs;
``BrokerNodeLostError`` by ``delivery.broker.connection.watch_node``, which each broker
component runs; ``StreamRefusedError`` by the reference stream client (``delivery.stream``);
``StoppedBeforeConnected`` by ``delivery.broker.connection.connect`` and
the process's first database connect (``workers.process``).

Two kinds of error live elsewhere, on purpose. The dev tooling's ``ProvisionError`` (a
throwaway server could not be found or started) is in ``delivery.testing.processes``: the
tooling is a room of its own that production never imports (as asyncpg keeps its
``cluster.py`` errors with the cluster helpers), so its errors live with it. And the pure
parsers (``delivery.durations``) raise ``ValueError`` as ``int()`` does, because pydantic turns
only that into a validation error; their callers say which setting or option it was, as a
``ConfigError`` or an ``InputError``.
"""

from __future__ import annotations


class DeliveryPlatformError(Exception):
    """Base class: anything the platform raises deliberately."""


class ConfigError(DeliveryPlatformError):
    """A setting is missing or malformed: fix the environment and start again."""


class MigrationChangedError(ConfigError):
    """A migration file changed after it was applied: restore it (put the change in a new
    migration) and migrate again; nothing was applied."""


class InputError(DeliveryPlatformError):
    """Bad input from a producer or an operator: fix the input; nothing was written."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class NotFoundError(InputError):
    """The named object (subscription, dead letter) does not exist."""


class BlockedTargetError(InputError):
    """A subscription URL's host is, or resolves to, an address inside our own network
    (loopback, private, link-local, metadata...): point it at a public address, or allow
    private targets where that is meant (``DELIVERY_ALLOW_PRIVATE_TARGETS``)."""


class EventIdTakenError(InputError):
    """An event id given by the producer is already used by another tenant. Event ids are the
    idempotency key across the whole platform (the webhook-id subscribers dedupe on), so choose
    another one; nothing was written."""


class QuotaExceededError(DeliveryPlatformError):
    """Over one of the tenant's quotas; nothing was written. ``retry_after_s`` is set for the
    ingest rate (wait that long); otherwise free something (remove a subscription) or have an
    operator raise the quota."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PublishConflictError(DeliveryPlatformError):
    """Concurrent producers kept publishing the same event ids: nothing was written by this
    call; publish the same events again (the ids that made it in are then duplicates)."""


class PoisonMessageError(DeliveryPlatformError):
    """A broker message is not one of ours (not our envelope, a pack whose headers do not match
    its lines): no retry can help, so dead-letter it and keep the reason."""


class SignatureError(DeliveryPlatformError):
    """A webhook failed verification: a receiver rejects it (ours, the demo's, the tests')."""


class QueueMissingError(DeliveryPlatformError):
    """A queue we consume from was deleted while we ran: start the consumer again, which
    declares the topology anew (the supervisor does)."""


class BrokerNodeLostError(DeliveryPlatformError):
    """The RabbitMQ node a component was connected to stayed unreachable while other nodes of
    its cluster are listed: start the component again (its supervisor does), and it connects to
    the next node that answers."""


class StreamRefusedError(DeliveryPlatformError):
    """The API refused the live stream for good (401, 403, or 4400 for the subscribe message):
    fix the key, its scope or the accounts; reconnecting would be refused the same way."""


class StoppedBeforeConnected(DeliveryPlatformError):
    """Shutdown began before the first broker or database connection succeeded: there is
    nothing to close or hand back; the component (or the process) just ends."""
