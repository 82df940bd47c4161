"""``scaling``: ``bench.scaling`` inside ``python -m bench run``: 1 relay and N worker processes
(N in --process-counts) draining --events against a throwaway three-node RabbitMQ cluster and
one node, CPU per event per kind of process, and the machine's ceilings first. It starts its own
brokers and a durable throwaway PostgreSQL whatever the run's services are: a broker's and a
server's CPU can only be read whole from processes that are the bench's own."""

from __future__ import annotations

import sys

from bench import scaling as bench_scaling
from bench.sessions import Run


async def scaling(run: Run) -> None:
    a = run.args
    args = bench_scaling.parser().parse_args(
        [
            f"--events={a.events}",
            f"--runs={a.runs}",
            f"--workers={','.join(map(str, a.process_counts))}",
            f"--max-busy={a.max_busy}",
            f"--max-wait-s={a.max_wait_s}",
            # --quick: a smoke of the ceilings too, not figures
            f"--ceiling-messages={500 if a.quick else 5000}",
            f"--ceiling-rows={2000 if a.quick else 20_000}",
        ]
    )
    command = " ".join(["python -m bench", *sys.argv[1:]])
    run.results["scaling"] = await bench_scaling.main_async(args, command)
    run.save()
