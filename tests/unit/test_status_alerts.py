"""The alert names ``delivery status`` prints (``delivery.store.unhealthy.ALERTS``) are rules
of ops/prometheus/alerts.yml: renaming a rule without the mapping breaks this test."""

from __future__ import annotations

import re
from pathlib import Path

from delivery.store.unhealthy import ALERTS, OUTBOX_ALERTS, Kind, format_age

ALERTS_YML = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "alerts.yml"


def _rules() -> dict[str, str]:
    """Each alert's name and its expression's text (up to the next rule)."""
    text = ALERTS_YML.read_text()
    parts = re.split(r"^\s+- alert: (\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_alert_status_names_is_a_rule_of_alerts_yml():
    rules = _rules()
    assert "DeliveryCircuitOpen" in rules  # the parse found the rules
    named = [name for name in ALERTS.values() if name is not None]
    named += [name for _, name in OUTBOX_ALERTS]
    missing = sorted(set(named) - set(rules))
    assert missing == [], f"delivery status names alerts that alerts.yml lacks: {missing}"


def test_every_kind_has_its_alert_decided():
    # OUTBOX_BACKLOG's rule depends on the age: OUTBOX_ALERTS.
    assert set(ALERTS) | {Kind.OUTBOX_BACKLOG} == set(Kind)


def test_the_outbox_thresholds_are_the_rules_thresholds():
    rules = _rules()
    for threshold_s, name in OUTBOX_ALERTS:
        (expr,) = re.findall(r"expr: (.*)", rules[name])
        assert expr.strip() == f"max(delivery_outbox_oldest_age_seconds) > {threshold_s:g}"


def test_ages_read_short():
    assert [format_age(s) for s in (0, 59.9, 60, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "0s",
        "59s",
        "1m00s",
        "3m12s",
        "2h05m",
        "3d04h",
    ]
