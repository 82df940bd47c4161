"""``GET /v1/stream``: one WebSocket client of the live stream.

The seam between stored and live events: the client is registered with the shared feed
(``feed``) *before* its history is read, so every event committed after registration reaches
its buffer; the history is read up to the account's last sequence at that time; then the
buffer is drained, dropping per account what the history already sent (sequence <= the last
one sent). Per account, commits happen in sequence order (the sequence counter's row lock
serialises them), so history then buffer is 1..N without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import WSMsgType, web

from delivery.api.feed import FEED, Client
from delivery.api.problems import ApiError
from delivery.api.routing import Call, Reply
from delivery.api.stream_protocol import (
    CLOSE_BAD_SUBSCRIBE,
    CLOSE_BEHIND,
    CLOSE_GOING_AWAY,
    CLOSE_SERVER_ERROR,
    CLOSE_TRY_LATER,
    HEARTBEAT_FRAME,
    Subscription,
    parse_subscribe,
)
from delivery.errors import InputError
from delivery.events import envelope_from_row, render_body
from delivery.ops import metrics
from delivery.store import stream_reads

log = structlog.get_logger("delivery.api.stream")

SUBSCRIBE_TIMEOUT_S = 10.0
_HISTORY_PAGE = 500
_CLOSE_TIMEOUT_S = 2.0
# A client that reads nothing cannot take our close frame; its socket is dropped after this.
_ABORT_AFTER_S = 10.0
_MAX_MESSAGE_BYTES = 256 * 1024
# The freshness histogram is observed once per batch of at most this many live frames written
# without waiting, with the batch's oldest frame (its worst lag), rather than once per frame
# per client: an observation takes microseconds under a lock (6 us measured on a loaded
# machine), and every client of a busy tenant would pay it for every event. Capped so a client
# whose buffer never empties is still observed.
_LAG_BATCH_FRAMES = 64


async def stream(call: Call) -> Reply:
    feed = call.request.app[FEED]
    settings = call.settings
    tenant_id = call.caller.tenant_id
    ws = web.WebSocketResponse(max_msg_size=_MAX_MESSAGE_BYTES, autoping=True)
    if not ws.can_prepare(call.request).ok:
        raise ApiError("invalid_request", "this route is a WebSocket: send Upgrade: websocket")
    await ws.prepare(call.request)
    try:
        subscription = await _subscription(ws)
    except InputError as exc:
        await _close(call.request, ws, CLOSE_BAD_SUBSCRIBE, str(exc))
        return Reply(101, stream=ws)
    client = Client(tenant_id, subscription, settings.stream_buffer_events)
    if not feed.admit(client):
        metrics.STREAM_CLIENTS_REFUSED.inc()
        limit = settings.stream_max_clients_per_tenant
        log.warning("stream_client_refused", tenant_id=tenant_id, limit=limit)
        await _close(
            call.request, ws, CLOSE_TRY_LATER, f"this tenant has {limit} stream clients open"
        )
        return Reply(101, stream=ws)
    try:
        code, reason = await _serve(call, ws, client, feed.closing)
    finally:
        feed.leave(client)
    if code == CLOSE_BEHIND:
        metrics.STREAM_CLIENTS_BEHIND.inc()
        log.warning("stream_client_behind", tenant_id=tenant_id, buffer=client.limit)
    if code is not None:
        await _close(call.request, ws, code, reason)
    return Reply(101, stream=ws)


async def _subscription(ws: web.WebSocketResponse) -> Subscription:
    try:
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
            first = await ws.receive()
    except TimeoutError:
        raise InputError(f"no subscribe message within {SUBSCRIBE_TIMEOUT_S:g} s") from None
    if first.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        raise InputError('send {"op": "subscribe", ...} first')
    return parse_subscribe(first.data)


async def _serve(
    call: Call, ws: web.WebSocketResponse, client: Client, closing: asyncio.Event
) -> tuple[int | None, str]:
    """Send until the client leaves (None), falls behind or the process stops."""
    sender = asyncio.create_task(_send(call, ws, client))
    receiver = asyncio.create_task(_drain_incoming(ws))
    stopping = asyncio.create_task(closing.wait())
    # The sender may be stuck writing to a client that reads nothing: falling behind ends it.
    behind = asyncio.create_task(client.fell_behind.wait())
    tasks = (sender, receiver, stopping, behind)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Each ends promptly once cancelled; their outcome is read below.
        await asyncio.gather(*tasks, return_exceptions=True)
    if client.behind:
        return CLOSE_BEHIND, "fell behind: reconnect and resume with after"
    if closing.is_set():
        return CLOSE_GOING_AWAY, "the server is stopping: resume with after"
    if sender.done() and not sender.cancelled() and sender.exception() is not None:
        exc = sender.exception()
        if not isinstance(exc, ConnectionError):  # e.g. the database went away mid-history
            log.error("stream_send_failed", error=repr(exc)[:300])
            return CLOSE_SERVER_ERROR, "server error: reconnect and resume with after"
    return None, ""


async def _drain_incoming(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends after subscribing, until it closes."""
    async for _msg in ws:
        pass


async def _send(call: Call, ws: web.WebSocketResponse, client: Client) -> None:
    sent: dict[str, int] = {}  # account -> last sequence sent (or read) from history
    await _send_history(call, ws, client, sent)
    heartbeat_s = call.settings.stream_heartbeat_s
    while True:
        if not client.frames:
            client.ready.clear()
            try:
                async with asyncio.timeout(heartbeat_s):
                    await client.ready.wait()
            except TimeoutError:
                await ws.send_str(HEARTBEAT_FRAME)
            continue
        oldest_s: float | None = None
        batch = 0
        # The buffer is checked each time: falling behind clears it during a write.
        while client.frames and batch < _LAG_BATCH_FRAMES:
            batch += 1
            frame = client.frames.popleft()
            if frame.sequence <= sent.get(frame.account_id, 0):
                continue  # the history already sent it
            await ws.send_str(frame.text)
            if oldest_s is None or frame.created_at_s < oldest_s:
                oldest_s = frame.created_at_s
        if oldest_s is not None:
            metrics.STREAM_FRAME_LAG.observe(max(0.0, time.time() - oldest_s))


async def _send_history(
    call: Call, ws: web.WebSocketResponse, client: Client, sent: dict[str, int]
) -> None:
    """Every stored event after ``after``, per account, up to its last sequence as of now
    (the client is already registered, so later ones are in its buffer)."""
    subscription: Subscription = client.subscription
    tenant_id = client.tenant_id
    for account_id, after in subscription.after.items():
        through = await stream_reads.last_sequence(call.pool, tenant_id, account_id)
        position = after
        while position < through:
            rows = await stream_reads.history(
                call.pool,
                tenant_id,
                account_id,
                after=position,
                through=through,
                limit=_HISTORY_PAGE,
            )
            if not rows:
                break
            for row in rows:
                if subscription.wants(row["account_id"], row["type"]):
                    await ws.send_str(render_body(envelope_from_row(row)).decode())
                position = row["sequence"]
        sent[account_id] = max(position, through)


async def _close(request: web.Request, ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close with ``code``; a client not reading cannot take the close frame, so its socket is
    dropped after a while rather than held forever."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await ws.close(code=code, message=reason.encode()[:120])
            return
    except (TimeoutError, ConnectionError):
        pass
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what is queued (our close frame included), then closes
        asyncio.get_running_loop().call_later(_ABORT_AFTER_S, transport.abort)
