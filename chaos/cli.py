"""``python -m chaos list`` and ``python -m chaos run SCENARIO|all [--events N] [--seed S]
[--out DIR] [--rate R] [--alert-scale F] [--rules FILE]``. Exit 0 when every run matched its
expectation, 1 otherwise, 2 on bad usage."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chaos.report import RunReport, write_summary
from chaos.scenarios import SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="name and describe every scenario")
    run = commands.add_parser("run", help="run one scenario, several, or all")
    run.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="a name, or 'all'")
    run.add_argument("--events", type=int, default=10_000, help="events to publish (10000)")
    run.add_argument("--seed", type=int, default=1, help="random seed (1)")
    run.add_argument("--rate", type=float, help="normal producer rate, events/s (150)")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir ({DEFAULT_OUT})")
    run.add_argument(
        "--alert-scale",
        type=float,
        default=1.0,
        help="scenarios that check alerts: scale the for: durations (and the lag threshold) of "
        "the alerts they expect to fire, and their bounds, by this; every other rule keeps its "
        "real clock (1: the rules as shipped; the short CI runs use each scenario's "
        "short_scale, 0.25 unless it says otherwise)",
    )
    run.add_argument(
        "--rules",
        type=Path,
        help="alert rules to evaluate instead of ops/prometheus/alerts.yml (e.g. one with an "
        "alert removed, to see the checker fail the run)",
    )
    return parser


def _list() -> int:
    width = max(len(name) for name in SCENARIOS)
    for name, scenario in SCENARIOS.items():
        expect = "" if scenario.expect_valid else "  [expected to FAIL the checker]"
        sys.stdout.write(f"{name:<{width}}  {scenario.summary}{expect}\n")
    return EXIT_OK


async def _run_all(names: list[str], args: argparse.Namespace) -> list[RunReport]:
    from chaos.runner import DEFAULT_RATE, run_scenario

    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    reports: list[RunReport] = []
    for name in names:
        sys.stderr.write(f"chaos: running {name} ({args.events} events, seed {args.seed})\n")
        report = await run_scenario(
            SCENARIOS[name],
            events=args.events,
            seed=args.seed,
            out_dir=out,
            rate=args.rate or DEFAULT_RATE,
            alert_scale=args.alert_scale,
            alert_rules=args.rules,
        )
        reports.append(report)
        status = "PASS" if report.passed else "FAIL: " + "; ".join(report.problems)
        sys.stderr.write(f"chaos: {name}: {status} ({report.wall_s:.0f} s)\n")
        write_summary(reports, out)
    sys.stdout.write((out / "summary.md").read_text())
    sys.stderr.write(f"chaos: records in {out}\n")
    return reports


def _bad_usage(args: argparse.Namespace) -> str | None:
    if args.events < 1:
        return "--events must be at least 1"
    if not 0.01 <= args.alert_scale <= 1:
        return "--alert-scale must be within [0.01, 1]"
    if args.rules is not None and not args.rules.is_file():
        return f"--rules {args.rules}: no such file"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return _list()
    names = list(SCENARIOS) if args.scenarios == ["all"] else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        sys.stderr.write(
            f"chaos: unknown scenario {', '.join(unknown)} (see: python -m chaos list)\n"
        )
        return EXIT_USAGE
    bad = _bad_usage(args)
    if bad:
        sys.stderr.write(f"chaos: {bad}\n")
        return EXIT_USAGE
    try:
        import uvloop

        reports = uvloop.run(_run_all(names, args))
    except KeyboardInterrupt:
        return 130
    return EXIT_OK if all(r.passed for r in reports) else EXIT_FAILED
