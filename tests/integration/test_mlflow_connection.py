"""MLflow's own variables route a real `mlflow-sidecar serve`; the `mlflow` health service
follows a real mlflow server that stops and starts while the sidecar keeps serving."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import mlflow

from mlflow_sidecar.client import ClientContainer, Metric
from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from tests.support.sidecar_process import CLI, SidecarProcess


def own_env(**extra: str) -> dict[str, str]:
    """The environment without any sidecar or MLflow setting, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLFLOW_SIDECAR") and name not in MLFLOW_ENV_KEYS
    }
    return {**env, **extra}


def sidecar_with(data_dir, **env: str) -> SidecarProcess:
    """A sidecar process whose environment holds only its data dir, port and `env`."""
    sidecar = SidecarProcess(data_dir)
    own = {k: v for k, v in sidecar.env.items() if k.startswith("MLFLOW_SIDECAR__")}
    sidecar.env = own_env(**own, **env)
    return sidecar


def health(target: str, service: str = "") -> str:
    result = subprocess.run(
        [CLI, "health", "--target", target, "--service", service, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (result.stdout or result.stderr).strip().rsplit(" ", 1)[-1]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_mlflow_tracking_uri_alone_routes_runs_to_that_server(own_mlflow, tmp_path, unique):
    sidecar = sidecar_with(
        tmp_path / "sidecar",
        MLFLOW_TRACKING_URI=own_mlflow.url,
        # A server without auth ignores these; the log must not show the password.
        MLFLOW_TRACKING_USERNAME="alice",
        MLFLOW_TRACKING_PASSWORD="s3cret-pw",
    )
    assert not any(k.startswith("MLFLOW_SIDECAR__MLFLOW__") for k in sidecar.env)
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target})
    try:
        tracking = container.experiment_tracking()
        exp = tracking.create_experiment(f"env-uri-{unique}")
        run = tracking.start_run(exp.experiment_id, run_name="routed")
        tracking.log_params(run.run_id, {"lr": "0.1"})
        tracking.log_metrics(run.run_id, [Metric("reward", 1.5, step=1)])
    finally:
        container.shutdown_resources()
        sidecar.stop()

    stored = mlflow.MlflowClient(tracking_uri=own_mlflow.url).get_run(run.run_id)
    assert stored.data.params == {"lr": "0.1"}
    assert stored.data.metrics == {"reward": 1.5}
    assert not (sidecar.data_dir / "mlflow.db").exists()  # no embedded store was made
    log = sidecar.log_path.read_text()
    assert f"mode: MLflow server {own_mlflow.url}" in log
    assert "credentials: username, password" in log
    assert "s3cret-pw" not in log


def test_mlflow_health_service_follows_an_outage_while_the_sidecar_keeps_serving(
    own_mlflow, tmp_path, unique
):
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment(f"outage-{unique}")).info.run_id
    sidecar = sidecar_with(
        tmp_path / "sidecar",
        MLFLOW_SIDECAR__MLFLOW__TRACKING_URI=own_mlflow.url,
        MLFLOW_SIDECAR__MLFLOW__PROBE_INTERVAL_S="0.5",
        MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S="2",
    )
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target})
    try:
        wait_until(lambda: health(sidecar.target, "mlflow") == "SERVING", "mlflow SERVING")

        own_mlflow.stop()
        wait_until(lambda: health(sidecar.target, "mlflow") == "NOT_SERVING", "NOT_SERVING")
        assert health(sidecar.target) == "SERVING"
        assert health(sidecar.target, "mlflow_sidecar.v1.ExperimentTrackingService") == "SERVING"
        assert health(sidecar.target, "mlflow_sidecar.v1.ModelRegistryService") == "SERVING"
        # The spool takes metrics during the outage.
        with container.metric_stream() as stream:
            for step in range(10):
                stream.log(run_id, "loss", float(step), step=step)
        assert stream.accepted == 10

        own_mlflow.start()
        wait_until(lambda: health(sidecar.target, "mlflow") == "SERVING", "SERVING again")
        tracking = container.experiment_tracking()
        assert tracking.flush_metrics(run_id, timeout_s=120).pending_points == 0
    finally:
        container.shutdown_resources()
        sidecar.stop()

    assert len(plain.get_metric_history(run_id, "loss")) == 10
    warnings = [line for line in sidecar.log_path.read_text().splitlines() if "WARNING" in line]
    assert any("MLflow is unreachable" in line for line in warnings)
    assert any("MLflow is reachable again" in line for line in warnings)
