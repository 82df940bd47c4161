"""The process's capacity: how many deliveries it holds, overall and per subscriber.

Capacity is accounted when work is *accepted*: at most ``max_in_flight`` deliveries per process,
and per subscriber its hold cap (``subscription_hold_cap``: its ``per_subscription_max_in_flight``
request slots plus a local queue). Work beyond that is never taken from PostgreSQL, so a slow
subscriber occupies at most its own share and the rest keep flowing.

A place is a :class:`Reservation`, made only inside ``with capacity.reservations() as held:``.
Whoever starts the delivery takes it over (``held.hand_over``); every reservation still held when
the block ends is given back, however it ends (an error, a cancellation), so a reservation
cannot leak. The deliverer gives a reservation back in two steps: the subscriber's share and its
request slot when the POST returns, the process share when the outcome is committed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import TracebackType

from delivery.settings import Settings
from delivery.worker.jobs import subscription_hold_cap


class Reservation:
    """One delivery's place: a share of the process, a share of its subscriber's hold cap and,
    while its request runs, one of the subscriber's request slots. Each is given back once."""

    __slots__ = ("_capacity", "_process_share", "_request_slot", "_slots", "_subscription_share",
                 "subscription_id")

    def __init__(self, capacity: Capacity, subscription_id: str, slots: asyncio.Semaphore) -> None:
        self._capacity = capacity
        self.subscription_id = subscription_id
        self._slots = slots  # the subscriber's request slots, alive while it has a share held
        self._process_share = True
        self._subscription_share = True
        self._request_slot = False

    async def request_slot(self) -> None:
        """Wait for one of the subscriber's request slots."""
        await self._slots.acquire()
        self._request_slot = True

    def end_request(self) -> None:
        """The POST returned: give back the request slot and the subscriber's share."""
        if self._request_slot:
            self._request_slot = False
            self._slots.release()
        if self._subscription_share:
            self._subscription_share = False
            self._capacity._give_back_subscription_share(self.subscription_id)

    def release(self) -> None:
        """Give back whatever is still held: the outcome is committed, or the delivery went back."""
        self.end_request()
        if self._process_share:
            self._process_share = False
            self._capacity._give_back_process_share()


class Reservations:
    """The reservations made in one ``with`` block (a dispatch batch, a claim). Those not handed
    over by its end are given back, however it ends."""

    __slots__ = ("_capacity", "_held")

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity
        self._held: list[Reservation] = []

    def reserve(self, subscription_id: str) -> Reservation | None:
        """A place for one delivery of this subscription, or ``None`` when the process or the
        subscriber is full (or the process is draining)."""
        reservation = self._capacity._reserve(subscription_id)
        if reservation is not None:
            self._held.append(reservation)
        return reservation

    def hand_over(self, reservation: Reservation) -> Reservation:
        """The caller owns ``reservation`` from now on (and must give it back)."""
        self._held.remove(reservation)
        return reservation

    def __enter__(self) -> Reservations:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        held, self._held = self._held, []
        for reservation in held:
            reservation.release()


class Capacity:
    def __init__(self, *, max_in_flight: int, subscription_cap: int, request_slots: int) -> None:
        self.max_in_flight = max_in_flight
        self.subscription_cap = subscription_cap  # deliveries one subscriber may hold here
        self._request_slots_each = request_slots  # concurrent requests per subscriber
        self._held = 0
        self._per_subscription: Counter[str] = Counter()
        self._request_slots: dict[str, asyncio.Semaphore] = {}
        self._closed = False
        #: Set whenever a share is given back; whoever waits for room clears it.
        self.freed = asyncio.Event()
        #: Set while nothing is held.
        self.idle = asyncio.Event()
        self.idle.set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Capacity:
        return cls(
            max_in_flight=settings.max_in_flight,
            subscription_cap=subscription_hold_cap(settings),
            request_slots=settings.per_subscription_max_in_flight,
        )

    def reservations(self) -> Reservations:
        return Reservations(self)

    def close(self) -> None:
        """Draining: no reservation is granted any more."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> int:
        """Deliveries the process holds (reserved and not given back)."""
        return self._held

    def free_slots(self) -> int:
        return 0 if self._closed else max(0, self.max_in_flight - self._held)

    def free_slots_by_subscription(self) -> dict[str, int]:
        """Free slots of each subscription with work held here (others have the full cap)."""
        cap = self.subscription_cap
        return {s: max(0, cap - n) for s, n in self._per_subscription.items()}

    def saturated_subscriptions(self) -> list[str]:
        cap = self.subscription_cap
        return [s for s, n in self._per_subscription.items() if n >= cap]

    def _reserve(self, subscription_id: str) -> Reservation | None:
        if self._closed or self._held >= self.max_in_flight:
            return None
        if self._per_subscription[subscription_id] >= self.subscription_cap:
            return None
        self._held += 1
        self._per_subscription[subscription_id] += 1
        slots = self._request_slots.get(subscription_id)
        if slots is None:
            slots = self._request_slots[subscription_id] = asyncio.Semaphore(
                self._request_slots_each
            )
        self.idle.clear()
        return Reservation(self, subscription_id, slots)

    def _give_back_subscription_share(self, subscription_id: str) -> None:
        self._per_subscription[subscription_id] -= 1
        if self._per_subscription[subscription_id] <= 0:
            # Nobody holds or waits for its request slots any more.
            del self._per_subscription[subscription_id]
            self._request_slots.pop(subscription_id, None)
        self.freed.set()

    def _give_back_process_share(self) -> None:
        self._held -= 1
        if self._held == 0:
            self.idle.set()
        self.freed.set()
