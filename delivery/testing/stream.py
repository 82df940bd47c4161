"""A live-stream client for tests: subscribe over a real WebSocket, keep every event frame,
and rebuild balances from a snapshot plus the stream.

    async with api.client(key) as http, stream_client(http, accounts=["acc_1"]) as sc:
        await sc.wait_for(lambda s: s.last("acc_1") >= 10, timeout_s=10, what="10 events")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from delivery.testing.waits import wait_until


@dataclass
class StreamClient:
    ws: aiohttp.ClientWebSocketResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: int = 0
    close_code: int | None = None
    close_reason: str = ""
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task[None] | None = None  # owned by ``stream_client``

    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self.read())

    def sequences(self, account_id: str) -> list[int]:
        return [e["sequence"] for e in self.events if e["account_id"] == account_id]

    def last(self, account_id: str) -> int:
        seqs = self.sequences(account_id)
        return seqs[-1] if seqs else 0

    async def read(self) -> None:
        """Read frames until the server closes (records the close code)."""
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                obj = orjson.loads(msg.data)
                if obj.get("op") == "heartbeat":
                    self.heartbeats += 1
                else:
                    self.events.append(obj)
        self.close_code = self.ws.close_code
        ex = self.ws.exception()
        self.close_reason = str(ex) if ex else ""
        self.closed.set()

    async def wait_for(
        self, condition: Callable[[StreamClient], object], *, timeout_s: float, what: str
    ) -> None:
        await wait_until(lambda: condition(self), timeout_s=timeout_s, what=what)


@contextlib.asynccontextmanager
async def stream_client(
    http: aiohttp.ClientSession,
    *,
    accounts: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
    after: Mapping[str, int] | None = None,
    read: bool = True,
) -> AsyncIterator[StreamClient]:
    """A subscribed client on ``http``'s API; reading in the background unless ``read`` is
    false (a client that reads nothing, until ``start_reading``)."""
    message: dict[str, Any] = {"op": "subscribe"}
    if accounts is not None:
        message["accounts"] = list(accounts)
    if types is not None:
        message["types"] = list(types)
    if after is not None:
        message["after"] = dict(after)
    async with http.ws_connect("/v1/stream", autoclose=True, heartbeat=None) as ws:
        await ws.send_str(orjson.dumps(message).decode())
        client = StreamClient(ws)
        if read:
            client.start_reading()
        try:
            yield client
        finally:
            await ws.close()
            if client._reader is not None:
                await client._reader


def rebuild_balances(
    snapshot: Mapping[str, Any], events: Sequence[Mapping[str, Any]]
) -> dict[str, Decimal]:
    """A ``/balances`` answer with the stream's events after it applied, as a subscriber does."""
    balances = {asset: Decimal(v) for asset, v in snapshot["balances"].items()}
    for event in events:
        if (
            event["account_id"] != snapshot["account_id"]
            or event["sequence"] <= snapshot["sequence"]
        ):
            continue
        if event["type"] == "account.balance_changed":
            balances[event["data"]["asset"]] = Decimal(event["data"]["balance"])
    return balances
