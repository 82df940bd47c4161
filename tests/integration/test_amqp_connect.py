"""A RabbitMQ connect never hangs on a broker that accepts the socket and stays silent."""

import asyncio
import contextlib

from structlog.testing import capture_logs

from delivery.broker import connection as amqp
from delivery.errors import StoppedBeforeConnected
from delivery.testing.waits import wait_until


async def test_a_broker_that_accepts_and_never_answers_does_not_hang_the_connect(monkeypatch):
    """A socket accepted and then silent (a half-dead broker, a blackholed link): each attempt
    gives up after the set-up timeout and the next one starts, until shutdown."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(amqp, "SETUP_TIMEOUT_S", 0.3)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(
            amqp.connect(f"amqp://guest:guest@127.0.0.1:{port}/", name="t", stop=stop)
        )
        try:
            await wait_until(
                lambda: sum(e["event"] == "amqp_connect_retry" for e in logs) >= 2,
                timeout_s=20,
                what="two timed-out connection attempts",
            )
        finally:
            stop.set()
            for writer in held:
                writer.close()
            server.close()
            with contextlib.suppress(StoppedBeforeConnected, TimeoutError):
                await asyncio.wait_for(task, 10)
    retries = [e for e in logs if e["event"] == "amqp_connect_retry"]
    assert "TimeoutError" in retries[0]["error"]
