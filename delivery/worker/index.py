"""The subscriptions an event matches, from memory: by tenant, then by account (the account's
own subscriptions plus the tenant's account-less ones), then by type pattern.

Pure: no I/O. ``delivery.worker.feed`` keeps it fresh. A group remembers, per event type, which
of its subscriptions match, so a batch costs a dictionary look-up per event, however many
subscriptions other accounts have. A change that keeps a subscription's tenant, account and
patterns (its state, circuit, secret) only swaps the object the group's ids point to.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from delivery.store.states import SubscriptionState
from delivery.store.subscriptions import Subscription

_Key = tuple[str, str | None]  # (tenant, account or None for the tenant's account-less ones)


class _Group:
    __slots__ = ("by_type", "ids")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.by_type: dict[str, tuple[str, ...]] = {}  # event type -> matching ids, in id order


def _key(sub: Subscription) -> _Key:
    return (sub.tenant_id, sub.account_id)


class SubscriptionIndex:
    """Every subscription but removed ones (disabled and paused ones too: dispatch keeps their
    events as dead letters and paused deliveries)."""

    def __init__(self, subscriptions: Iterable[Subscription] = ()) -> None:
        self._by_id: dict[str, Subscription] = {}
        self._groups: dict[_Key, _Group] = {}
        for sub in subscriptions:
            self.put(sub)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, subscription_id: str) -> bool:
        return subscription_id in self._by_id

    def get(self, subscription_id: str) -> Subscription | None:
        return self._by_id.get(subscription_id)

    def put(self, sub: Subscription) -> None:
        """Add or replace ``sub`` (a removed one is dropped)."""
        if sub.state == SubscriptionState.REMOVED:
            self.discard(sub.id)
            return
        old = self._by_id.get(sub.id)
        self._by_id[sub.id] = sub
        if old is not None and _key(old) == _key(sub) and old.event_patterns == sub.event_patterns:
            return  # same matches: the group's ids now lead to the new object
        if old is not None:
            self._leave(old)
        group = self._groups.setdefault(_key(sub), _Group())
        group.ids.add(sub.id)
        group.by_type.clear()

    def discard(self, subscription_id: str) -> None:
        old = self._by_id.pop(subscription_id, None)
        if old is not None:
            self._leave(old)

    def _leave(self, old: Subscription) -> None:
        group = self._groups[_key(old)]
        group.ids.discard(old.id)
        group.by_type.clear()
        if not group.ids:
            del self._groups[_key(old)]

    def match(self, tenant_id: str, event_type: str, account_id: str) -> list[Subscription]:
        """The tenant's subscriptions whose account (if any) and patterns match the event,
        exactly as ``Subscription.matches`` would pick them, account-bound ones first."""
        out: list[Subscription] = []
        for key in ((tenant_id, account_id), (tenant_id, None)):
            group = self._groups.get(key)
            if group is None:
                continue
            ids = group.by_type.get(event_type)
            if ids is None:
                ids = group.by_type[event_type] = tuple(
                    sorted(
                        i
                        for i in group.ids
                        if any(
                            fnmatch.fnmatchcase(event_type, p)
                            for p in self._by_id[i].event_patterns
                        )
                    )
                )
            out.extend(self._by_id[i] for i in ids)
        return out
