"""The SSRF guard at connect time: a resolver that refuses blocked addresses.

A subscription's host was checked when it was made, but a name can resolve elsewhere since
(DNS rebinding). The worker's HTTP client resolves every name through this resolver, and what
it connects to is exactly what it returned, so a blocked address is never connected to.
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.helpers import is_ip_address
from aiohttp.resolver import DefaultResolver

from delivery.targets import refuse_addresses


class GuardedResolver(AbstractResolver):
    """The default resolver, raising ``BlockedTargetError`` for a metadata name or when any
    address a name resolves to is one the guard refuses (``delivery.targets``)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        refuse_addresses(host, [])  # metadata names, before any lookup
        results = await self._inner.resolve(host, port, family)
        refuse_addresses(host, [result["host"] for result in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


def names_an_address(host: str) -> bool:
    """Whether aiohttp takes ``host`` as an address and connects without resolving it: those
    the sender checks itself. aiohttp's own rule, called rather than copied, so the two cannot
    drift apart."""
    return is_ip_address(host)
