"""A bounded coverage-guided fuzzing run (atheris, libFuzzer) of the publish command's line
reader: 10,000 inputs grown from valid lines of every event type; any exception other than a
named refusal fails it (the harness is tests/fuzz/atheris_lines.py). No services: it is here
because libFuzzer ends its process, so the run is a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 only")

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "atheris_lines.py"
SEEDS = [
    {"type": "account.closed", "account_id": "acc_1", "data": {"reason": "requested"}},
    {
        "id": "evt_1",
        "type": "trade.executed",
        "account_id": "acc_1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {
            "trade_id": "t1",
            "order_id": "o1",
            "instrument": "BTC-USD",
            "side": "buy",
            "quantity": "0.25",
            "price": "64000.50",
            "executed_at": "2026-11-23T10:00:00Z",
        },
    },
    {
        "type": "account.balance_changed",
        "account_id": "acc_2",
        "data": {"asset": "EUR", "delta": "-1.5", "balance": "10", "reason": "fee"},
    },
]


def test_the_line_reader_survives_a_bounded_fuzzing_run(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed{i}").write_bytes(json.dumps(seed).encode() + b"\n")
    (corpus / "two_lines").write_bytes(
        b"\r\n".join(json.dumps(s).encode() for s in SEEDS[:2]) + b"\n"
    )
    options = ["-runs=10000", "-max_len=4096", "-seed=1", f"-artifact_prefix={tmp_path}/"]
    result = subprocess.run(
        [sys.executable, str(HARNESS), *options, str(corpus)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    report = [line for line in result.stderr.splitlines() if "Instrumenting" not in line]
    assert result.returncode == 0, "\n".join(report[-40:])
    assert "Done 10000 runs" in result.stderr
