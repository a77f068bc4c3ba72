"""Readiness: serving, spool below its high-water mark, MLflow reachable unless not required."""

from __future__ import annotations

from mlflow_sidecar.server.readiness import Readiness
from mlflow_sidecar.server.spool.store import SpoolStore


class Spool:
    def __init__(self, pending: int, max_points: int = 100) -> None:
        self._pending, self.max_points = pending, max_points

    def pending(self, run_id: str = "") -> int:
        return self._pending


def test_ready_only_when_every_required_check_passes():
    def ready(serving=True, pending=0, reachable=True, required=True):
        return (
            Readiness(
                lambda: serving,
                spool=Spool(pending),
                spool_high_water=0.9,
                mlflow_reachable=lambda: reachable,
                require_mlflow=required,
            )
            .report()
            .ready
        )

    assert ready()
    assert not ready(serving=False)
    assert ready(pending=89)
    assert not ready(pending=90)
    assert not ready(reachable=False)
    assert not ready(reachable=None)  # before the first probe
    assert ready(reachable=False, required=False)
    assert not ready(serving=False, required=False)


def test_report_names_every_check():
    report = Readiness(
        lambda: True, spool=Spool(95), mlflow_reachable=lambda: False, require_mlflow=False
    ).report()
    assert report.as_json() == {
        "status": "not ready",
        "checks": {
            "grpc": {"ok": True},
            "spool": {"ok": False, "pending_points": 95, "high_water": 90},
            "mlflow": {"ok": False, "required": False},
        },
    }


def test_the_real_spool_store_is_a_spool_depth(tmp_path):
    store = SpoolStore(tmp_path / "spool.db", max_points=10)
    try:
        report = Readiness(lambda: True, spool=store, spool_high_water=0.5).report()
    finally:
        store.close()
    assert report.checks["spool"] == {"ok": True, "pending_points": 0, "high_water": 5}
