"""The stream freshness SLO (runbooks/slo.md) is one number everywhere: the alerts' threshold
bucket and burn factors, and the dashboard's lines for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboard.json"
METRIC = "delivery_stream_frame_lag_seconds"


def _rules() -> dict[str, str]:
    parts = re.split(r"^\s+- alert: (\S+)\s*$", ALERTS.read_text(), flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_stream_burn_alerts_and_the_dashboard_agree_on_5_s_and_the_factors():
    rules = _rules()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (burn,) = [p for p in panels if p["title"].startswith("Stream freshness SLO burn rate")]
    drawn = {s["value"] for s in burn["fieldConfig"]["defaults"]["thresholds"]["steps"]}
    for name, factor in (
        ("DeliveryStreamFreshnessSLOBurnFast", 14.4),
        ("DeliveryStreamFreshnessSLOBurnSlow", 6),
    ):
        rule = rules[name]
        assert f"({factor} * 0.01)" in rule and factor in drawn, name
        assert rule.count(f'{METRIC}_bucket{{le=~"5(\\\\.0)?"}}') == 2, name
    for target in burn["targets"]:
        assert 'le=~"5(\\\\.0)?"' in target["expr"], target["expr"]
    (lag,) = [p for p in panels if p["title"].startswith("Stream frame lag")]
    assert 5 in {s["value"] for s in lag["fieldConfig"]["defaults"]["thresholds"]["steps"]}
    # On the SLO row: below it and above the next row.
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in panels if p["type"] == "row")
    assert rows[0][1].startswith("SLO") and rows[0][0] < burn["gridPos"]["y"] < rows[1][0]
