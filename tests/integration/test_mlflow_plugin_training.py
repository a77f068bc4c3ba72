"""An unmodified training script with MLFLOW_TRACKING_URI=sidecar://…, checked with a plain
MlflowClient against the real mlflow server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from mlflow_sidecar.client import ClientContainer
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.processes import MlflowServer
from tests.support.sidecar_process import SidecarProcess

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "stock_training.py"
STEPS = 10_000


def script_env(tracking_uri: str) -> dict[str, str]:
    """The script's environment: ours without MLflow's or the sidecar's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLFLOW_SIDECAR"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true")
    return env


def run_script(tracking_uri: str, *args: str, cwd: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=script_env(tracking_uri),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # Nothing the script (or autolog for it) did met an operation the sidecar lacks.
    assert "not supported through the sidecar" not in done.stderr, done.stderr[-4000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def file_digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def delivered(target: str, run_id: str) -> None:
    """Wait until the sidecar delivered the run's points and its end to MLflow."""
    container = ClientContainer()
    container.config.from_dict({"target": target})
    try:
        flushed = container.experiment_tracking().flush_metrics(run_id, timeout_s=300)
        assert flushed.complete, flushed
    finally:
        container.shutdown_resources()


def assert_run_complete(direct: MlflowClient, run_id: str, steps: int) -> None:
    """Every param, every metric point exactly once, the run ended."""
    run = direct.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in ("lr", "gamma", "policy")} == {
        "lr": "0.001",
        "gamma": "0.99",
        "policy": "ppo",
    }
    history = direct.get_metric_history(run_id, "reward")
    assert len(history) == steps
    assert sorted((m.step, m.value) for m in history) == [(s, s * 0.5) for s in range(steps)]


def test_stock_training_script_through_the_sidecar(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str, tmp_path: Path
) -> None:
    name = f"stock-{unique}"
    result = run_script(
        f"sidecar://{sidecar.target}", f"stock-{unique}", name, str(STEPS), cwd=tmp_path
    )
    assert result["prediction"] == [2.0, 4.0]

    direct = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    run_id = str(result["run_id"])
    delivered(sidecar.target, run_id)
    assert_run_complete(direct, run_id, STEPS)

    # autolog's model and the pyfunc model: both logged models of the run, READY.
    run = direct.get_run(run_id)
    experiment_id = run.info.experiment_id
    models = direct.search_logged_models(experiment_ids=[experiment_id])
    assert {m.source_run_id for m in models} == {run_id}
    assert {m.name for m in models} == {"model", "policy"}
    assert {o.model_id for o in run.outputs.model_outputs} == {m.model_id for m in models}
    assert "training_score" in run.data.metrics  # autolog's own metric

    version = direct.get_model_version_by_alias(name, "champion")
    assert version.version == str(result["version"])
    assert version.source == f"models:/{result['model_id']}"

    # The bytes the server keeps are the bytes the script logged, and load the same.
    policy = direct.get_logged_model(str(result["model_id"]))
    stored = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=policy.artifact_location,
            dst_path=str(tmp_path / "stored"),
            tracking_uri=mlflow_server.url,
        )
    )
    sidecar_repo = get_artifact_repository(
        f"sidecar://{sidecar.target}/models/{result['model_id']}/artifacts"
    )
    (tmp_path / "through-sidecar").mkdir()
    through_sidecar = Path(sidecar_repo.download_artifacts("", str(tmp_path / "through-sidecar")))
    expected = file_digests(stored)
    assert {"MLmodel", "python_model.pkl"} <= set(expected)
    assert file_digests(through_sidecar) == expected


def wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 300) -> None:
    """Wait until the script wrote `path` (it fails the test if the script died first)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the script exited early: {proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the script never reached {path.name}")
        time.sleep(0.05)


def test_stock_script_survives_a_killed_sidecar_and_an_mlflow_outage(
    own_mlflow: MlflowServer, unique: str, tmp_path: Path
) -> None:
    # A sidecar set to ride out an outage of its MLflow: it retries for up to two minutes.
    sidecar = SidecarProcess(
        tmp_path / "sidecar", own_mlflow.url, MLFLOW_SIDECAR__RETRY__MAX_TIME_S="120"
    )
    sidecar.start()
    gate = tmp_path / "gate"
    env = script_env(f"sidecar://{sidecar.target}")
    # The trainer waits as long as the sidecar does (its default deadline is 30 s).
    env.update(
        MLFLOW_SIDECAR_CLIENT_TIMEOUT_S="150", MLFLOW_SIDECAR_CLIENT_STREAM_RECONNECT_S="300"
    )
    name = f"outage-{unique}"
    script = subprocess.Popen(
        [sys.executable, str(SCRIPT), name, name, str(STEPS), str(gate)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Half the points logged: SIGKILL the sidecar and start it again on its spool.
        wait_for(Path(f"{gate}.half"), script)
        sidecar.kill()
        sidecar.start()
        # Then MLflow goes away for 10 s while the script logs the other half and goes on.
        own_mlflow.stop()
        gate.write_text("go")
        time.sleep(10)
        own_mlflow.start()
        out, err = script.communicate(timeout=600)
        assert script.returncode == 0, err[-4000:]
        result = json.loads(out.strip().splitlines()[-1])
        delivered(sidecar.target, str(result["run_id"]))
    finally:
        if script.poll() is None:
            script.kill()
            script.communicate()
        sidecar.stop()
    assert result["prediction"] == [2.0, 4.0]
    direct = MlflowClient(tracking_uri=own_mlflow.url, registry_uri=own_mlflow.url)
    assert_run_complete(direct, str(result["run_id"]), STEPS)
    assert direct.get_model_version_by_alias(name, "champion").version == str(result["version"])


LEFT_OPEN = """
import sys
import mlflow
mlflow.set_experiment(sys.argv[1])
run = mlflow.start_run()
for step in range(3000):
    mlflow.log_metric("x", float(step), step=step)
print(run.info.run_id)
"""


def test_a_process_that_exits_mid_run_hands_its_points_over(
    sidecar: RunningSidecar, mlflow_server: MlflowServer, unique: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LEFT_OPEN, f"left-open-{unique}"],
        env=script_env(f"sidecar://{sidecar.target}"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    run_id = done.stdout.strip().splitlines()[-1]
    delivered(sidecar.target, run_id)
    direct = MlflowClient(tracking_uri=mlflow_server.url)
    history = direct.get_metric_history(run_id, "x")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(3000)]


def test_a_run_ends_through_the_plugin_while_mlflow_is_down(
    own_mlflow: MlflowServer, unique: str, tmp_path: Path
) -> None:
    # MLflow's answers take the sidecar a few seconds of retries each while it is down.
    running = RunningSidecar(sidecar_config(tmp_path / "sidecar", own_mlflow.url))
    uri = f"sidecar://{running.target}"
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_id = client.create_run(client.create_experiment(f"ends-{unique}")).info.run_id
        client.log_metric(run_id, "loss", 1.0, step=0)
        own_mlflow.stop()
        client.log_metric(run_id, "loss", 0.5, step=1)
        # As `with mlflow.start_run()` ends its run: the sidecar records the end behind
        # the run's points, so the end needs no answer of MLflow's.
        client.set_terminated(run_id, "FINISHED")
        own_mlflow.start()
        delivered(running.target, run_id)
    finally:
        running.stop()
    direct = MlflowClient(tracking_uri=own_mlflow.url)
    assert direct.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in direct.get_metric_history(run_id, "loss")] == [0, 1]
