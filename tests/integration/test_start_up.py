"""A process started while PostgreSQL cannot be reached waits for it instead of exiting."""

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

from structlog.testing import capture_logs

from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.testing.waits import wait_until
from workers.process import run_process


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_a_process_started_while_the_database_link_is_cut_waits_and_then_runs(
    settings: Settings,
):
    """The link first cuts every connection at once (as a chaos cut during a restart does),
    then forwards to the real server: the process retries, becomes ready, and drains."""
    real = urlsplit(settings.database_url)
    forwarding = False
    cut = 0

    async def link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cut
        if not forwarding:
            cut += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(real.hostname, real.port)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pipe(reader, up_writer))
            tg.create_task(_pipe(up_reader, writer))

    server = await asyncio.start_server(link, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    netloc = real.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
    cut_settings = settings.model_copy(
        update={"database_url": urlunsplit(real._replace(netloc=netloc))}
    )
    stop = asyncio.Event()
    ready: list[Health] = []
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(
                run_process(
                    cut_settings,
                    relay=True,
                    worker=True,
                    stop=stop,
                    ready=ready.append,
                    handle_signals=False,
                )
            )
            try:
                await wait_until(
                    lambda: (
                        task.done() or sum(e["event"] == "database_unreachable" for e in logs) >= 2
                    ),
                    timeout_s=30,
                    what="two start-up attempts on a cut link",
                )
                assert not task.done(), f"the process ended instead of waiting: {task}"
                forwarding = True
                await wait_until(
                    lambda: task.done() or (ready and ready[0].ready),
                    timeout_s=60,
                    what="the process to be ready once the link forwards",
                )
                assert not task.done(), f"the process ended instead of running: {task}"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
        assert cut >= 2
    finally:
        server.close()
