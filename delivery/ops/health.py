"""Readiness as shared state: each component says whether it is connected and working; the
admin server's ``/readyz`` answers from it. Draining makes the whole process not-ready."""

from __future__ import annotations

from dataclasses import dataclass, field

from delivery.ops import metrics


@dataclass
class Health:
    _ready: dict[str, bool] = field(default_factory=dict)
    draining: bool = False

    def register(self, component: str) -> None:
        self._ready.setdefault(component, False)
        metrics.UP.labels(component).set(0)

    def set(self, component: str, ready: bool) -> None:
        self._ready[component] = ready
        metrics.UP.labels(component).set(1 if ready else 0)

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self._ready) and all(self._ready.values())

    def report(self) -> dict[str, object]:
        return {"ready": self.ready, "draining": self.draining, "components": dict(self._ready)}
