"""Reading this process's Prometheus metrics in tests."""

from __future__ import annotations

from prometheus_client import REGISTRY


def counter_value(name: str, **labels: str) -> float:
    """The sample's current value; 0 before it was first counted."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
