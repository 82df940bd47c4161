# ruff: noqa: RUF001, E501  (markdown: typographic signs meant, table rows read better unwrapped)
"""Render ``bench/results.json`` as ``bench/RESULTS.md``: how to run, the runs, then each
section (``headline``, ``method``, ``ours``, ``backlog``, ``profile``) that has results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report.backlog import backlog
from bench.report.headline import stages, summary, targets
from bench.report.method import load, machine, method
from bench.report.ours import e2e, failures, fanout, live, processes, relay, tuned
from bench.report.profile import profile
from bench.scaling import report as scaling

# A person's summary of the figures, shown after the targets.
NOTES = Path(__file__).resolve().parent.parent / "notes.md"

HOW_TO_RUN = """\
```bash
pip install -e '.[bench]'          # the peers: FastStream, taskiq, Celery, Dramatiq, psycopg, requests
pip install py-spy                 # only for the profile scenario (--only profile)
python -m bench run                # everything, 3 runs each; writes bench/results.json and this file
python -m bench run --quick        # a smoke of every default scenario (a few hundred events, no figures)
python -m bench run --only flat,paced --systems ours,asyncio --merge   # a subset, kept beside the rest
python -m bench run --only e2e,failures --merge   # the opt-in scenarios (failures: minutes), beside the rest
python -m bench run --help         # every option and scenario
python -m bench render             # this file again from bench/results.json
```
Services: `DELIVERY_DATABASE_URL` / `DELIVERY_AMQP_URL` when set (every system in its own
database and queue names, all removed afterwards), otherwise throwaway local servers.
`--own-postgres` starts a throwaway PostgreSQL with stock settings (fsync and autovacuum on)
whatever `DELIVERY_DATABASE_URL` says: this machine's shared server runs with autovacuum off,
under which the 1,000,000-event backlog is never vacuumed.
`tests/integration/test_bench_smoke.py` runs the same code on 200 events per system (the
FastStream, taskiq, Celery and Dramatiq peers are in the `dev` extra the test command installs;
outside CI a missing one is skipped)."""


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    out: list[str] = ["# Benchmarks: ours against the frameworks people pick instead", ""]
    out += ["How to run (from the repository root, in the project's venv):", "", HOW_TO_RUN, ""]
    for inv in results.get("invocations", [meta]):
        code = inv.get("code") or {}
        dirty = code.get("uncommitted", "").replace("\n", ", ")
        out.append(
            f"* Run: `{inv.get('command', '?')}`, {inv.get('started', '?')} – "
            f"{inv.get('finished', '?')}; load average at start {load(inv.get('load_at_start'))}, "
            f"at end {load(inv.get('load_at_end'))}; code: `{code.get('commit', '?')}`"
            + (f" with uncommitted changes to {dirty}" if dirty else "")
            + (
                f"; PostgreSQL {inv['servers']['postgresql settings']}"
                if "postgresql settings" in inv.get("servers", {})
                else ""
            )
            + "."
        )
    out.append("")
    compare = results.get("compare", {})
    out += summary(compare)
    out += stages(results)
    out += targets(results)
    if NOTES.exists():
        out += [NOTES.read_text().rstrip(), ""]
    out += method(meta)
    out += live(results)
    out += tuned(results)
    out += processes(results)
    out += fanout(results)
    out += relay(results)
    out += e2e(results)
    out += failures(results)
    out += backlog(results)
    out += profile(results)
    out += scaling(results)
    out += machine(meta, compare)
    return "\n".join(out) + "\n"
