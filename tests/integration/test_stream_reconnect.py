"""A metric stream outlasts a sidecar restart as long as `stream_reconnect_s` allows: a real
sidecar process is killed while a trainer logs, kept down longer than the old fixed window
of 60 s, and started again on the same port and data dir; every point logged is in MLflow
exactly once. With a short window the stream gives up with a clear error instead."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import UnavailableError
from tests.support.sidecar_process import SidecarProcess

# Longer than the stream's old fixed window of 60 s: only a longer stream_reconnect_s
# gets through it.
DOWN_S = 65.0


def _container(target: str, reconnect_s: float) -> ClientContainer:
    container = ClientContainer()
    container.config.from_dict({"target": target, "stream_reconnect_s": reconnect_s})
    return container


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_stream_outlasts_a_sidecar_restart_within_its_window(mlflow_server, tmp_path, unique):
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = plain.create_run(plain.create_experiment(f"reconnect-{unique}")).info.run_id
    sidecar = SidecarProcess(tmp_path / "sidecar", mlflow_server.url)
    sidecar.start()
    # The window covers the time down plus a restart.
    container = _container(sidecar.target, reconnect_s=180)
    stream = container.metric_stream()
    steps = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def trainer() -> None:
        nonlocal steps
        try:
            while not stop.is_set():
                stream.log(run_id, "reward", float(steps), step=steps)
                steps += 1
                time.sleep(0.002)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=trainer)
    try:
        thread.start()
        _wait_for(lambda: stream.accepted > 200, "the first points")
        sidecar.kill()
        time.sleep(DOWN_S)  # the trainer keeps logging into its buffer
        before = steps
        sidecar.start()  # same port and data dir
        _wait_for(lambda: stream.accepted > before or failure, "points after the restart")
        assert not failure, failure  # e.g. SIDECAR_UNREACHABLE with a window under DOWN_S
        stop.set()
        thread.join(60)
        assert not failure, failure
        assert stream.close(timeout_s=120) == steps  # the trainer saw no error
        assert container.experiment_tracking().flush_metrics(timeout_s=300).pending_points == 0
    finally:
        stop.set()
        container.shutdown_resources()
        sidecar.stop()
    history = plain.get_metric_history(run_id, "reward")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(steps)]


def test_a_short_window_gives_up_with_a_clear_error(mlflow_server, tmp_path, unique):
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = plain.create_run(plain.create_experiment(f"give-up-{unique}")).info.run_id
    sidecar = SidecarProcess(tmp_path / "sidecar", mlflow_server.url)
    sidecar.start()
    container = _container(sidecar.target, reconnect_s=1)
    stream = container.metric_stream()
    try:
        stream.log(run_id, "reward", 0.0, step=0)
        assert stream.flush(timeout_s=60) == 1
        sidecar.kill()
        step = 1
        with pytest.raises(UnavailableError) as err:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stream.log(run_id, "reward", float(step), step=step)
                step += 1
                time.sleep(0.01)
        assert err.value.reason == "SIDECAR_UNREACHABLE"
        assert "stream_reconnect_s (1s)" in err.value.message
        with pytest.raises(UnavailableError):
            stream.flush(timeout_s=5)
    finally:
        container.shutdown_resources()
        sidecar.stop()
