"""The slim `remote` install (mlflow-skinny): a sidecar behind a tracking server runs without
what only the full `mlflow` package brings, and the embedded store, which needs it, is refused
at start in one line that says so.

The sidecar runs as its own process with every module of full MLflow's own dependencies made
unimportable, as in an environment where only mlflow-skinny is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import grpc
import pytest
import tomllib
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from mlflow_sidecar.v1 import tracking_pb2, tracking_pb2_grpc
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _requirements(dist: str) -> set[str]:
    """The installed distribution's unconditional requirements."""
    try:
        required = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return set()
    return {_name(r) for r in required if "extra ==" not in r}


def _closure(roots: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        dist = todo.pop()
        if dist not in seen:
            seen.add(dist)
            todo.extend(_requirements(dist) - seen)
    return seen


def full_mlflow_only_modules() -> set[str]:
    """Top-level modules of the distributions that full `mlflow` adds to mlflow-skinny and
    that nothing else of the `remote` install needs (SQLAlchemy, alembic, Flask, pandas, ...)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    remote = {_name(r) for r in extras["optional-dependencies"]["remote"]}
    remote |= {_name(r) for r in extras["dependencies"]}
    kept = _closure(remote)
    added = _closure(_requirements("mlflow")) - kept
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if all(_name(d) in added for d in dists) and not module.startswith("_")
    }


SERVE = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # import fails: ModuleNotFoundError, as when not installed
from mlflow_sidecar.server.cli import main
sys.exit(main(["serve"]))
"""


def slim_sidecar(data_dir: Path, tracking_uri: str, port: int) -> subprocess.Popen[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLFLOW_SIDECAR") and name not in MLFLOW_ENV_KEYS
    }
    env.update(
        MLFLOW_SIDECAR__DATA_DIR=str(data_dir),
        MLFLOW_SIDECAR__SERVER__PORT=str(port),
        MLFLOW_SIDECAR__SERVER__GRACE_S="2",
    )
    if tracking_uri:
        env["MLFLOW_SIDECAR__MLFLOW__TRACKING_URI"] = tracking_uri
    blocked = sorted(full_mlflow_only_modules())
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, *blocked],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_blocked_modules_are_what_full_mlflow_adds():
    blocked = full_mlflow_only_modules()
    assert {"sqlalchemy", "alembic", "flask", "pandas"} <= blocked
    assert {"mlflow", "numpy", "grpc", "google"}.isdisjoint(blocked)


def test_the_remote_extra_is_the_server_extra_with_mlflow_skinny():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    server = {r for r in extras["server"] if _name(r) != "mlflow"}
    remote = {r for r in extras["remote"] if _name(r) != "mlflow-skinny"}
    assert remote == server
    (skinny,) = [r for r in extras["remote"] if _name(r) == "mlflow-skinny"]
    (full,) = [r for r in extras["server"] if _name(r) == "mlflow"]
    assert skinny.removeprefix("mlflow-skinny") == full.removeprefix("mlflow")


def test_embedded_mode_without_full_mlflow_is_refused_in_one_line(tmp_path):
    proc = slim_sidecar(tmp_path / "data", "", free_port())
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("mlflow-sidecar: the embedded MLflow store needs the full mlflow")
    assert "pip install 'mlflow-sidecar[server]'" in lines[0]
    assert "MLFLOW_SIDECAR__MLFLOW__TRACKING_URI" in lines[0]
    assert not (tmp_path / "data" / "mlflow.db").exists()


@pytest.mark.integration
def test_remote_mode_serves_without_full_mlflow(tmp_path, mlflow_server, unique):
    port = free_port()
    proc = slim_sidecar(tmp_path / "data", mlflow_server.url, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the slim sidecar did not start"
                time.sleep(0.3)
            tracking = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
            experiment_id = tracking.CreateExperiment(
                tracking_pb2.CreateExperimentRequest(name=f"slim-{unique}")
            ).experiment.experiment_id
            run_id = tracking.StartRun(
                tracking_pb2.StartRunRequest(experiment_id=experiment_id)
            ).run.info.run_id
            tracking.LogMetrics(
                tracking_pb2.LogMetricsRequest(
                    run_id=run_id, metrics=[tracking_pb2.Metric(key="reward", value=1.5, step=1)]
                )
            )
            run = tracking.GetRun(tracking_pb2.GetRunRequest(run_id=run_id)).run
            assert [(m.key, m.value) for m in run.data.metrics] == [("reward", 1.5)]
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert "mode: MLflow server" in output
