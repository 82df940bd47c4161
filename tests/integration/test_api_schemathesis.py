"""schemathesis against the live ``delivery api``: generated requests for every operation of
the served /openapi.json, with a publish+manage+read key, bounded examples. No answer may be a
5xx, and every answer must be as documented (status, content type, headers, schema); requests
the document forbids must be refused. The served document is the committed one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from delivery.api.routes import ROUTES
from delivery.testing.api import api_process
from tests.support import settings_env, tenant_with_key

pytestmark = pytest.mark.integration

COMMITTED = Path(__file__).resolve().parents[2] / "ops" / "openapi.json"
MAX_EXAMPLES = 8  # per operation and phase: about 45 s on two busy CPUs
# Every check but positive_data_acceptance: a request the schema allows may still be refused
# by what no schema says (a cursor this server never gave out, a URL that does not parse as
# one, a window whose until is not after its since, a subscription id that does not exist),
# and those answers are documented 400/404/422.
EXCLUDED_CHECKS = "positive_data_acceptance"


def _st() -> str:
    found = shutil.which("st", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')")
    return found


async def test_the_served_document_is_the_committed_one(settings):
    async with (
        api_process(settings_env(settings)) as api,
        aiohttp.ClientSession() as http,
        http.get(api.url + "/openapi.json") as answer,
    ):
        assert answer.status == 200
        served = await answer.json()
    assert served == json.loads(COMMITTED.read_text())


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    settings, tmp_path
):
    _, key = await tenant_with_key(settings, "fuzzed", "publish,manage,read")
    async with api_process(settings_env(settings)) as api:
        run = subprocess.run(
            [
                _st(),
                "run",
                api.url + "/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                "--exclude-checks",
                EXCLUDED_CHECKS,
                "--max-examples",
                str(MAX_EXAMPLES),
                "--workers",
                "2",
                "--seed",
                "20261207",
                "--generation-database",
                "none",
                "--no-color",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )
        log = api.log()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert f"Tested: {len(ROUTES)}" in run.stdout  # every operation was exercised
    assert "✅ Stateful" in run.stdout  # calls chained by the document's links ran too
    assert '"request_failed"' not in log  # no unhandled exception behind any answer
