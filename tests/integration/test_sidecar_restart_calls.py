"""A unary call made right after a sidecar restart succeeds with the default client settings.

A real sidecar process is killed while a trainer's channel is connected; the trainer keeps
calling while it is down (which drives the channel into its reconnect backoff), the sidecar
is started again on the same port and data dir, and as soon as it reports SERVING the
trainer calls again through the same typed client, and through MLflow's own client on the
`sidecar://` plugin. Both must succeed, every round. A sidecar that stays down still ends
a call within its deadline, with UNAVAILABLE saying how long it was unreachable.
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.errors import SidecarError, UnavailableError
from mlflow_sidecar.mlflow_plugin.connection import connection_for
from mlflow_sidecar.v1 import tracking_pb2_grpc
from tests.support.sidecar_process import SidecarProcess

# Enough rounds that a call landing in the channel's reconnect backoff is met.
ROUNDS = 5
# How long the sidecar stays down (before it is started again) while the trainer keeps
# calling: its channels' reconnect backoff grows meanwhile.
DOWN_S = 2.5


def _keep_calling(call, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    while not stop.is_set():
        try:
            call()
        except Exception:  # the sidecar is down: failures are what this drives
            time.sleep(0.05)


def test_unary_calls_right_after_a_sidecar_restart_succeed(
    mlflow_server, tmp_path, unique, monkeypatch
):
    sidecar = SidecarProcess(tmp_path / "sidecar", mlflow_server.url)
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target})  # default retries and deadline
    tracking = container.experiment_tracking()
    uri = f"sidecar://{sidecar.target}"
    # MLflow sets it for a client made with a tracking URI; the test gives it back.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    plugin = MlflowClient(tracking_uri=uri)
    # Calls with a short deadline on each channel, made while the sidecar is down.
    impatient = GrpcExperimentTracking(container.tracking_stub(), timeout_s=0.5)
    plugin_channel = connection_for(uri).channel.channel
    impatient_plugin = GrpcExperimentTracking(
        tracking_pb2_grpc.ExperimentTrackingServiceStub(plugin_channel), timeout_s=0.5
    )
    try:
        experiment = tracking.create_experiment(f"restart-{unique}")
        run_id = plugin.create_run(experiment.experiment_id).info.run_id
        failures: list[str] = []
        for round_ in range(ROUNDS):
            sidecar.kill()
            stop = threading.Event()
            pokers = [
                threading.Thread(
                    target=_keep_calling,
                    args=(lambda: impatient.get_experiment(experiment.experiment_id), stop),
                ),
                threading.Thread(
                    target=_keep_calling, args=(lambda: impatient_plugin.get_run(run_id), stop)
                ),
            ]
            for poker in pokers:
                poker.start()
            time.sleep(DOWN_S)
            # Same port and data dir; returns once it says SERVING. The calls go on while
            # it starts, as a busy trainer's would, keeping the channels reconnecting.
            sidecar.start()
            stop.set()
            try:
                assert tracking.get_experiment(experiment.experiment_id).name == experiment.name
            except SidecarError as exc:
                failures.append(f"round {round_}, typed client: {exc!r}")
            try:
                plugin.log_param(run_id, f"round_{round_}", str(round_))
            except Exception as exc:
                failures.append(f"round {round_}, plugin: {exc!r}")
            for poker in pokers:
                poker.join(60)
        assert not failures, failures
        assert plugin.get_run(run_id).data.params == {f"round_{i}": str(i) for i in range(ROUNDS)}
    finally:
        container.shutdown_resources()
        sidecar.stop()


def test_a_call_to_a_sidecar_that_stays_down_ends_within_its_deadline(
    mlflow_server, tmp_path, unique
):
    sidecar = SidecarProcess(tmp_path / "sidecar", mlflow_server.url)
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "timeout_s": 3})
    tracking = container.experiment_tracking()
    try:
        experiment = tracking.create_experiment(f"down-{unique}")
        sidecar.kill()
        started = time.monotonic()
        with pytest.raises(UnavailableError) as err:
            tracking.get_experiment(experiment.experiment_id)
        elapsed = time.monotonic() - started
        assert 2.5 < elapsed < 4.5
        assert f"the sidecar at {sidecar.target} was unreachable for" in err.value.message
    finally:
        container.shutdown_resources()
        sidecar.stop()
