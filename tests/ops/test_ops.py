"""Operations artefacts are tested like code: the alert rules with promtool (and their unit
tests), every alert's runbook exists, every `delivery ...` command a runbook tells on-call to
type parses with the real CLI, every PromQL expression of the dashboard and the rules runs on a
real Prometheus scraping a running pipeline, and `/readyz` follows RabbitMQ going away and
coming back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from delivery import publish_many
from delivery.cli.parser import build_parser
from delivery.settings import Settings
from delivery.store import subscriptions
from delivery.testing.env import IN_CI
from delivery.testing.factories import trade
from delivery.testing.processes import ProvisionError, free_port
from delivery.testing.rabbitmq import LocalRabbitMQ
from delivery.testing.waits import wait_until
from tests.support import running

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboard.json"
RUNBOOKS = ROOT / "runbooks"

LOCALHOST = "127.0.0.1"
SCRAPE_INTERVAL_S = 1
PROMETHEUS_START_TIMEOUT_S = 30.0

# Metrics of the contract that a running pipeline exports once it delivered a few events.
# delivery_dead_letters_total is not among them: a labelled counter appears only once used, and
# nothing here is dead-lettered.
CONTRACT_METRICS = (
    "delivery_outbox_pending",
    "delivery_outbox_oldest_age_seconds",
    "delivery_events_published_total",
    "delivery_attempts_total",
    "delivery_attempt_duration_seconds_bucket",
    "delivery_end_to_end_seconds_bucket",
    "delivery_in_flight",
    "delivery_subscriptions",
)

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$job": ".*",
    "$instance": ".*",
}


def _binary(name: str) -> str:
    """The path of a Prometheus tool; skip locally, fail under CI=true when it is missing."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/bin/{name}", os.X_OK):
        found = f"/usr/bin/{name}"
    if found is None:
        message = f"{name} not found on PATH or in /usr/bin (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


# -- 1. promtool ---------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    result = _run([_binary("promtool"), "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule is an alert: the count promtool found is the count of `- alert:` entries.
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    assert int(found.group(1)) == len(_alert_blocks())


def test_alert_rules_unit_tests_pass():
    result = _run([_binary("promtool"), "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    text = ALERTS_TEST.read_text()
    for name, _block in _alert_blocks():
        # A test entry is "alertname: X" followed by its exp_alerts (empty = not firing).
        entries = re.findall(
            rf"alertname: {re.escape(name)}\n\s+exp_alerts:( \[\])?", text, flags=re.MULTILINE
        )
        assert any(e == " []" for e in entries), f"{name}: no test shows it not firing"
        assert any(e == "" for e in entries), f"{name}: no test shows it firing"


# -- 2. runbooks of alerts -----------------------------------------------------------------


def _alert_blocks() -> list[tuple[str, str]]:
    """(alert name, its rule text) for each `- alert:` entry of alerts.yml."""
    text = ALERTS.read_text()
    starts = list(re.finditer(r"^\s*- alert: *(\S+)\s*$", text, flags=re.MULTILINE))
    assert starts, f"{ALERTS}: no alerts found"
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return [(m.group(1), text[m.start() : end]) for m, end in zip(starts, ends, strict=True)]


def test_every_alert_has_severity_summary_description_and_an_existing_runbook():
    base = _runbook_base_url()
    for name, block in _alert_blocks():
        for key in ("severity", "summary", "description", "runbook_url"):
            assert re.search(rf"^\s+{key}:", block, flags=re.MULTILINE), f"{name}: no {key}"
        assert re.search(r"^\s+severity: (critical|warning|info)\s*$", block, re.MULTILINE), (
            f"{name}: severity must be critical, warning or info"
        )
        urls = re.findall(r"^\s+runbook_url: *\"?([^\s\"]+)\"?\s*$", block, flags=re.MULTILINE)
        assert len(urls) == 1, f"{name}: expected one runbook_url, found {urls}"
        assert urls[0].startswith(base), f"{name}: runbook_url {urls[0]} is not under {base}"
        path = RUNBOOKS / urls[0].removeprefix(base)
        assert path.parent == RUNBOOKS and path.is_file(), (
            f"{name}: runbook_url {urls[0]} is not a file in runbooks/"
        )


def _runbook_base_url() -> str:
    """The one base of every runbook_url, as alerts.yml's header documents it."""
    (base,) = re.findall(r"^# runbook base URL: (\S+)$", ALERTS.read_text(), flags=re.MULTILINE)
    return base


def test_the_runbook_base_url_is_absolute_and_where_the_admin_server_serves_runbooks():
    # The admin server serving each runbook at /runbooks/NAME.md: tests/integration/test_admin.
    parts = urlsplit(_runbook_base_url())
    assert parts.scheme in ("http", "https") and parts.netloc
    assert parts.path == "/runbooks/"


def test_runbook_index_lists_every_runbook():
    index = (RUNBOOKS / "README.md").read_text()
    for path in sorted(RUNBOOKS.glob("*.md")):
        if path.name != "README.md":
            assert f"({path.name})" in index, f"runbooks/README.md does not link {path.name}"


# -- 3. CLI commands quoted in runbooks ----------------------------------------------------

_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
_MENTIONS_COMMAND = re.compile(r"(?:^|[\s;|&(`$])delivery\s+[a-z-]")
_SHELL_OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&", ";;"}
# Placeholders a runbook may use; any value parses, these only make the argv look real.
_PLACEHOLDERS = {
    "ID": "sub_0123456789abcdef",
    "SUBSCRIPTION_ID": "sub_0123456789abcdef",
    "DEAD_LETTER_ID": "42",
    "URL": "https://example.com/hook",
    "FILE": "events.jsonl",
}


def _code_snippets(text: str) -> Iterator[tuple[int, str]]:
    """(line number, code) for every line of fenced blocks and every inline `code` span (which
    may wrap onto the next line)."""
    in_fence = False
    prose: list[str] = []  # the text outside fences, one entry per line to keep line numbers
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            prose.append("")
        elif in_fence:
            prose.append("")
            yield number, line
        else:
            prose.append(line)
    joined = "\n".join(prose)
    for span in re.finditer(r"`([^`]+)`", joined):
        yield joined.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())


def _delivery_commands(code: str) -> Iterator[list[str]]:
    """argv (after `delivery`) of each `delivery ...` command in one shell line."""
    code = code.strip().removeprefix("$ ")
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token not in _SHELL_OPERATORS:
            segment.append(token)
            continue
        words = [w for w in segment if not _ENV_ASSIGNMENT.match(w)]
        if words and words[0] == "delivery":
            yield [_PLACEHOLDERS.get(w.strip("<>").upper(), w) for w in words[1:]]
        segment = []


def _runbook_commands() -> list[tuple[str, int, str, list[str]]]:
    found = []
    for path in sorted(RUNBOOKS.glob("*.md")):
        for number, code in _code_snippets(path.read_text()):
            if not _MENTIONS_COMMAND.search(code):
                continue
            try:
                commands = list(_delivery_commands(code))
            except ValueError as exc:
                pytest.fail(f"runbooks/{path.name}:{number}: cannot split {code!r}: {exc}")
            for argv in commands:
                found.append((path.name, number, code.strip(), argv))
    return found


def test_runbooks_quote_delivery_commands():
    # A guard against the extraction silently finding nothing.
    commands = _runbook_commands()
    assert len(commands) >= 20, commands
    used = {tuple(argv[:2]) for _f, _n, _c, argv in commands}
    for expected in (("status", "--json"), ("dlq", "list"), ("dlq", "replay")):
        assert expected in used, f"no runbook uses `delivery {' '.join(expected)}`"


def test_every_delivery_command_in_a_runbook_parses_with_the_real_cli(capsys):
    parser = build_parser()
    bad = []
    for name, number, code, argv in _runbook_commands():
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            error = capsys.readouterr().err.strip()
            bad.append(f"runbooks/{name}:{number}: `{code}` -> exit {exc.code}: {error}")
    assert not bad, "runbook commands the CLI rejects:\n" + "\n".join(bad)


_SQL_PLACEHOLDERS = {
    "'ID'": "'sub_0123456789abcdef'",
    "'EVENT_ID'": "'evt_0123'",
    "DEAD_LETTER_ID": "42",
}


def _runbook_sql() -> list[tuple[str, int, str]]:
    """(runbook, line, statement) for each statement of ```sql blocks and `psql -c "..."`."""
    found = []
    for path in sorted(RUNBOOKS.glob("*.md")):
        fence: str | None = None
        statement: list[str] = []
        start = 0
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = stripped[3:].strip() if fence is None else None
                continue
            if fence == "sql":
                code = line.split("--", 1)[0].strip()
                if code:
                    start = start or number
                    statement.append(code)
                if code.endswith(";"):
                    found.append((path.name, start, " ".join(statement)))
                    statement, start = [], 0
            elif fence is not None and stripped.startswith("psql "):
                words = shlex.split(stripped, comments=True)
                if "-c" in words:
                    found.append((path.name, number, words[words.index("-c") + 1]))
        assert not statement, f"runbooks/{path.name}:{start}: SQL without a closing ';'"
    return found


@pytest.mark.integration
async def test_every_sql_statement_in_a_runbook_runs_on_the_migrated_schema(db_url: str):
    statements = _runbook_sql()
    assert len(statements) >= 15, statements
    conn = await asyncpg.connect(db_url)
    bad = []
    try:
        for name, number, quoted in statements:
            sql = quoted
            for placeholder, value in _SQL_PLACEHOLDERS.items():
                sql = sql.replace(placeholder, value)
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                bad.append(f"runbooks/{name}:{number}: {exc.__class__.__name__}: {exc}\n    {sql}")
            finally:
                await tx.rollback()
    finally:
        await conn.close()
    assert not bad, "runbook SQL that fails on the real schema:\n" + "\n".join(bad)


# -- 4. every PromQL expression on a real Prometheus scraping a running pipeline -----------


def _dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
                if target.get("expr"):
                    found.append((f"dashboard panel {panel.get('title')!r}", target["expr"]))
            walk(panel.get("panels", []) or [])  # type: ignore[arg-type]

    walk(dashboard["panels"])
    assert found, "the dashboard has no PromQL targets"
    return found


def _substitute(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_is_a_provisionable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in (
        "published",
        "attempt",
        "latency",
        "outbox",
        "retr",
        "dead",
        "subscriptions",
        "circuits",
        "in flight",
        "ready",
        "up",
    ):
        assert word in titles, f"no dashboard panel about {word!r}"
    exprs = " ".join(e for _w, e in _dashboard_expressions())
    for metric in (*CONTRACT_METRICS, "delivery_dead_letters_total", "delivery_component_ready"):
        assert metric.removesuffix("_bucket") in exprs, f"the dashboard never shows {metric}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_slo_row_shows_the_slis_the_lag_and_the_burn_rates_the_alerts_use():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    (row,) = [p for p in panels if p["type"] == "row" and p["title"].startswith("SLO")]
    below = [p for p in panels if p["gridPos"]["y"] == row["gridPos"]["y"] + 1]
    exprs = " ".join(t["expr"] for p in below for t in p.get("targets", []))
    assert "[30d]" in exprs and "delivery_lag_seconds" in exprs
    # The burn-rate thresholds drawn are the ones the two latency alerts fire at.
    (burn,) = [p for p in below if "burn rate" in p["title"].lower()]
    drawn = {s["value"] for s in burn["fieldConfig"]["defaults"]["thresholds"]["steps"]}
    rules = dict(_alert_blocks())
    for name, factor in (("DeliveryLatencySLOBurnFast", 14.4), ("DeliveryLatencySLOBurnSlow", 6)):
        assert f"({factor} * 0.01)" in rules[name] and factor in drawn, name
    # The lag panel's threshold line is the lag alert's.
    (lag,) = [p for p in below if "lag" in p["title"].lower()]
    (threshold,) = re.findall(r"max\(delivery_lag_seconds\) > (\d+)", rules["DeliveryLagHigh"])
    steps = lag["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert int(threshold) in {s["value"] for s in steps}


@contextlib.asynccontextmanager
async def hook_receiver() -> AsyncIterator[tuple[str, list[str]]]:
    """A subscriber that answers 200 to every POST and records the webhook-ids."""
    seen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers.get("webhook-id", ""))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOCALHOST, port).start()
    try:
        yield f"http://{LOCALHOST}:{port}/hook", seen
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def prometheus_server(tmp_path: Path, scrape_port: int) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 only, scraping 127.0.0.1:scrape_port every second and
    evaluating alerts.yml; killed on exit, failures included. Yields its base URL."""
    binary = _binary("prometheus")
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {
                    "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                    "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
                },
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "delivery",
                        "static_configs": [{"targets": [f"{LOCALHOST}:{scrape_port}"]}],
                    }
                ],
            }
        )
    )
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={LOCALHOST}:{web_port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://{LOCALHOST}:{web_port}"
    except BaseException:
        print(f"--- prometheus log ({log_path}) ---\n{log_path.read_text(errors='replace')}")
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


async def _api(http: aiohttp.ClientSession, base: str, path: str, **params: str) -> dict:
    async with http.get(f"{base}{path}", params=params) as response:
        body = await response.json(content_type=None)
    return body  # type: ignore[no-any-return]


async def _query(http: aiohttp.ClientSession, base: str, expr: str) -> dict:
    return await _api(http, base, "/api/v1/query", query=expr)


async def _scalar(http: aiohttp.ClientSession, base: str, expr: str) -> float | None:
    body = await _query(http, base, expr)
    result = body.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


@pytest.mark.integration
async def test_every_promql_expression_runs_on_prometheus_scraping_a_running_pipeline(
    settings: Settings, tmp_path: Path
):
    _binary("prometheus")
    admin_port = free_port()
    settings = settings.model_copy(update={"admin_port": admin_port})
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with (
            hook_receiver() as (url, seen),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        ):
            await subscriptions.add(conn, url=url, patterns="trade.*")
            async with running(settings):
                with prometheus_server(tmp_path, admin_port) as prom:
                    # Given Prometheus scraping the running pipeline
                    async def target_up() -> bool:
                        with contextlib.suppress(aiohttp.ClientError, ValueError):
                            return await _scalar(http, prom, 'up{job="delivery"}') == 1
                        return False

                    await wait_until(
                        target_up,
                        timeout_s=PROMETHEUS_START_TIMEOUT_S,
                        what="target up",
                        interval_s=0.2,
                    )
                    before = await _scalar(http, prom, "delivery_events_published_total")
                    assert before is not None, "delivery_events_published_total not scraped"

                    # When events are published and delivered
                    async with conn.transaction():
                        await publish_many(conn, [trade(i, account=f"acc_ops_{i % 3}") for i in range(5)])
                    await wait_until(lambda: len(set(seen)) >= 5, timeout_s=30, what="5 webhooks")

                    # Then the counters Prometheus scrapes moved
                    async def published_counted() -> bool:
                        now = await _scalar(http, prom, "delivery_events_published_total")
                        return now is not None and now >= before + 5

                    await wait_until(
                        published_counted,
                        timeout_s=15,
                        what="published_total +5 in Prometheus",
                        interval_s=0.2,
                    )

                    async def contract_scraped() -> list[str]:
                        missing = []
                        for metric in CONTRACT_METRICS:
                            body = await _query(http, prom, f'count({metric}{{job="delivery"}})')
                            if not body["data"]["result"]:
                                missing.append(metric)
                        return missing

                    async def all_scraped() -> bool:
                        return not await contract_scraped()

                    with contextlib.suppress(TimeoutError):
                        await wait_until(
                            all_scraped, timeout_s=10, what="contract metrics", interval_s=0.5
                        )
                    assert not await contract_scraped(), "contract metrics missing"
                    delivered = await _scalar(
                        http, prom, 'sum(delivery_attempts_total{outcome="delivered"})'
                    )
                    assert delivered is not None and delivered >= 5

                    # And every expression of the dashboard and the rules is valid PromQL
                    failures = []
                    for where, expr in _dashboard_expressions():
                        body = await _query(http, prom, _substitute(expr))
                        if body.get("status") != "success":
                            failures.append(f"{where}: {expr}\n    -> {body.get('error')}")
                    assert not failures, "invalid PromQL:\n" + "\n".join(failures)

                    # ... and Prometheus loaded and evaluated every alert rule without error.
                    async def rules_evaluated() -> list[dict]:
                        body = await _api(http, prom, "/api/v1/rules")
                        groups = body["data"]["groups"]
                        return [r for g in groups for r in g["rules"]]

                    async def all_evaluated() -> bool:
                        rules = await rules_evaluated()
                        return bool(rules) and all(r["health"] != "unknown" for r in rules)

                    await wait_until(all_evaluated, timeout_s=15, what="rules evaluated")
                    rules = await rules_evaluated()
                    assert len(rules) == len(_alert_blocks())
                    for rule in rules:
                        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
                        body = await _query(http, prom, rule["query"])
                        assert body["status"] == "success", (rule["name"], body.get("error"))
                        # The rule's runbook_url, with the base pointed at this pipeline's
                        # admin server, answers with the shipped page.
                        runbook = rule["annotations"]["runbook_url"]
                        name = runbook.removeprefix(_runbook_base_url())
                        local = f"http://{LOCALHOST}:{admin_port}/runbooks/{name}"
                        async with http.get(local) as page:
                            assert page.status == 200, f"{rule['name']}: {runbook}"
                            assert await page.text() == (RUNBOOKS / name).read_text()
    finally:
        await conn.close()


# -- 5. /readyz follows RabbitMQ -----------------------------------------------------------


async def _readyz(http: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    try:
        async with http.get(f"http://{LOCALHOST}:{port}/readyz") as response:
            return response.status, await response.text()
    except aiohttp.ClientError as exc:
        return -1, repr(exc)


async def _wait_for_status(
    http: aiohttp.ClientSession, port: int, status: int, *, timeout_s: float, when: str
) -> None:
    last: list[tuple[int, str]] = []

    async def reached() -> bool:
        last[:] = [await _readyz(http, port)]
        return last[0][0] == status

    try:
        await wait_until(reached, timeout_s=timeout_s, what=f"/readyz {status}", interval_s=0.2)
    except TimeoutError:
        code, body = last[0] if last else (None, "")
        pytest.fail(
            f"{when}: /readyz did not answer {status} within {timeout_s:g} s; "
            f"last answer {code}: {body}"
        )


@pytest.mark.integration
async def test_readyz_turns_503_while_rabbitmq_is_down_and_200_when_it_is_back(
    settings: Settings,
):
    rabbit = LocalRabbitMQ()
    try:
        try:
            await asyncio.to_thread(rabbit.start)
        except ProvisionError as exc:
            if IN_CI:
                pytest.fail(f"cannot start a throwaway RabbitMQ: {exc}")
            pytest.skip(f"cannot start a throwaway RabbitMQ: {exc}")
        admin_port = free_port()
        settings = settings.model_copy(
            update={"amqp_url": rabbit.url, "admin_port": admin_port, "publish_timeout_s": 1.0}
        )
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            running(settings),
        ):
            # Given a ready pipeline
            await _wait_for_status(http, admin_port, 200, timeout_s=10, when="at start")
            # When RabbitMQ goes away, then the process says it is not ready
            await asyncio.to_thread(rabbit.stop)
            await _wait_for_status(
                http, admin_port, 503, timeout_s=30, when="after RabbitMQ stopped"
            )
            # When it is back on the same port, then the process is ready again
            await asyncio.to_thread(rabbit.start)
            await _wait_for_status(
                http, admin_port, 200, timeout_s=60, when="after RabbitMQ restarted"
            )
            # When the broker is connected but confirms nothing (a memory alarm blocks every
            # publisher) while events wait, then the relay says it is not ready
            await asyncio.to_thread(rabbit.set_memory_alarm, True)
            conn = await asyncpg.connect(settings.database_url)
            try:
                await publish_many(conn, [trade(i, account=f"acc_ops_{i % 3}") for i in range(20)])
                await _wait_for_status(
                    http, admin_port, 503, timeout_s=30, when="during a memory alarm"
                )
                assert '"relay": false' in (await _readyz(http, admin_port))[1]
                # When the alarm clears, then it is ready again and the events went out
                await asyncio.to_thread(rabbit.set_memory_alarm, False)
                await _wait_for_status(
                    http, admin_port, 200, timeout_s=30, when="after the memory alarm"
                )
                await wait_until(
                    lambda: conn.fetchval(
                        "SELECT count(*) = 0 FROM delivery.outbox WHERE published_at IS NULL"
                    ),
                    timeout_s=30,
                    what="the outbox to drain",
                )
            finally:
                await conn.close()
    finally:
        await asyncio.to_thread(rabbit.close)
