"""Readiness: may this sidecar take work now? Answered by `/readyz` on the metrics port.

Ready means the gRPC server accepts calls, the spool is below its high-water mark and,
unless `health.ready_requires_mlflow` is off, MLflow answered the last probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class SpoolDepth(Protocol):
    """How full the metric spool is."""

    @property
    def max_points(self) -> int:
        """Pending points at which the spool refuses more."""

    def pending(self, run_id: str = "") -> int:
        """Undelivered points (of all runs when `run_id` is empty)."""


@dataclass(frozen=True)
class ReadinessReport:
    """The outcome of every check; ready when all that count passed."""

    ready: bool
    checks: dict[str, dict[str, object]] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        """`{"status": "ready"|"not ready", "checks": {name: {"ok": ..., ...}}}`."""
        return {"status": "ready" if self.ready else "not ready", "checks": self.checks}


class Readiness:
    """Runs the readiness checks; each is cheap (a flag, a counter), so probes may be frequent."""

    def __init__(
        self,
        serving: Callable[[], bool],
        *,
        spool: SpoolDepth | None = None,
        spool_high_water: float = 0.9,
        mlflow_reachable: Callable[[], bool | None] | None = None,
        require_mlflow: bool = True,
    ) -> None:
        self._serving = serving
        self._spool = spool
        self._spool_high_water = spool_high_water
        self._mlflow_reachable = mlflow_reachable
        self._require_mlflow = require_mlflow

    def report(self) -> ReadinessReport:
        """Run every check now."""
        checks: dict[str, dict[str, object]] = {}
        ready = True
        serving = self._serving()
        checks["grpc"] = {"ok": serving}
        ready &= serving
        if self._spool is not None:
            pending = self._spool.pending()
            high_water = int(self._spool.max_points * self._spool_high_water)
            below = pending < high_water
            checks["spool"] = {"ok": below, "pending_points": pending, "high_water": high_water}
            ready &= below
        if self._mlflow_reachable is not None:
            reachable = self._mlflow_reachable() is True
            checks["mlflow"] = {"ok": reachable, "required": self._require_mlflow}
            if self._require_mlflow:
                ready &= reachable
        return ReadinessReport(ready, checks)
