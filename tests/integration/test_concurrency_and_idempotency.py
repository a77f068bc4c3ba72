"""Concurrent trainers on one sidecar, and StartRun idempotency under retries."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import mlflow
import pytest

from mlflow_sidecar.core.domain import Metric
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

THREADS = 8
BATCHES = 20
POINTS = 100


def test_eight_threads_log_to_one_sidecar(client_container, unique):
    tracking = client_container.experiment_tracking()
    exp = tracking.create_experiment(f"threads-{unique}").experiment_id
    shared = tracking.start_run(exp, run_name="shared").run_id
    own = [tracking.start_run(exp, run_name=f"t{i}").run_id for i in range(THREADS)]

    def trainer(index: int) -> int:
        accepted = 0
        for batch in range(BATCHES):
            points = [
                Metric(
                    "loss", float(index), 1_700_000_000_000 + batch * POINTS + i, batch * POINTS + i
                )
                for i in range(POINTS)
            ]
            accepted += tracking.log_metrics(own[index], points)
            accepted += tracking.log_metrics(
                shared, [Metric(f"reward_{index}", float(batch), 1_700_000_000_000 + batch, batch)]
            )
            tracking.set_run_tags(own[index], {"batch": str(batch)})
        tracking.log_params(own[index], {"worker": str(index)})
        return accepted

    with ThreadPoolExecutor(THREADS) as pool:
        totals = list(pool.map(trainer, range(THREADS)))
    assert totals == [BATCHES * (POINTS + 1)] * THREADS

    for index, run_id in enumerate(own):
        history = []
        token = ""
        while True:
            page = tracking.get_metric_history(run_id, "loss", page_size=1000, page_token=token)
            history += page.items
            token = page.next_page_token
            if not token:
                break
        assert [m.step for m in history] == list(range(BATCHES * POINTS))
        run = tracking.get_run(run_id)
        assert run.params == {"worker": str(index)}
        assert run.tags["batch"] == str(BATCHES - 1)
    shared_run = tracking.get_run(shared)
    assert sorted(shared_run.metrics) == sorted(f"reward_{i}" for i in range(THREADS))
    for index in range(THREADS):
        assert len(tracking.get_metric_history(shared, f"reward_{index}").items) == BATCHES


def test_start_run_retried_with_the_same_request_id_makes_one_run(
    tracking_stub, mlflow_server, unique
):
    exp = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name=f"idem-{unique}")
    ).experiment.experiment_id
    request = pb.StartRunRequest(experiment_id=exp, run_name="r", client_request_id=f"req-{unique}")
    # A client that lost the first answer sends the same request again, and again concurrently.
    first = tracking_stub.StartRun(request).run
    again = tracking_stub.StartRun(request).run
    with ThreadPoolExecutor(6) as pool:
        concurrent = list(pool.map(lambda _: tracking_stub.StartRun(request).run, range(6)))
    ids = {first.info.run_id, again.info.run_id, *(r.info.run_id for r in concurrent)}
    assert ids == {first.info.run_id}
    runs = mlflow.MlflowClient(tracking_uri=mlflow_server.url).search_runs([exp])
    assert [r.info.run_id for r in runs] == [first.info.run_id]

    other = tracking_stub.StartRun(
        pb.StartRunRequest(experiment_id=exp, client_request_id=f"other-{unique}")
    ).run
    assert other.info.run_id != first.info.run_id


def test_start_run_repeated_after_an_upgrade_finds_the_run_an_older_sidecar_made(
    tracking_stub, mlflow_server, unique
):
    # Sidecars before the request ledger tagged the run with its client_request_id under
    # another name; the trainer's retry reaches the upgraded sidecar.
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    exp = plain.create_experiment(f"upgraded-{unique}")
    old = plain.create_run(
        exp, run_name="r", tags={"mlflow_sidecar.client_request_id": f"req-{unique}"}
    ).info.run_id
    request = pb.StartRunRequest(experiment_id=exp, run_name="r", client_request_id=f"req-{unique}")
    assert tracking_stub.StartRun(request).run.info.run_id == old
    request.request_id = f"req-{unique}"  # the typed client sends both
    assert tracking_stub.StartRun(request).run.info.run_id == old
    assert [r.info.run_id for r in plain.search_runs([exp])] == [old]


def test_log_metrics_retried_with_the_same_request_id_logs_once(
    tracking_stub, mlflow_server, run_id, unique
):
    # No timestamps: the sidecar stamps them on arrival, so only the request id can tell
    # a repeat from new points.
    request = pb.LogMetricsRequest(
        run_id=run_id,
        metrics=[pb.Metric(key="reward", value=0.5, step=s) for s in range(3)],
        request_id=f"log-{unique}",
    )
    first = tracking_stub.LogMetrics(request)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: tracking_stub.LogMetrics(request), range(4)))
    assert all(answer == first for answer in again)
    history = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(
        run_id, "reward"
    )
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_a_request_id_another_call_used_is_refused_by_the_entity_it_made(
    tracking_stub, registry_stub, mlflow_server, unique
):
    # The entity made by another call with this id (through a sidecar whose ledger never
    # saw it) has another name: never answered with, and never made a second time.
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    used = f"used-{unique}"
    plain.create_experiment(f"first-{unique}", tags={"mlflow_sidecar.request_id": used})
    plain.create_registered_model(f"first-{unique}", tags={"mlflow_sidecar.request_id": used})
    with pytest.raises(grpc.RpcError) as experiment:
        tracking_stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"second-{unique}", request_id=used)
        )
    with pytest.raises(grpc.RpcError) as model:
        registry_stub.CreateRegisteredModel(
            reg_pb.CreateRegisteredModelRequest(name=f"second-{unique}", request_id=used)
        )
    for refused in (experiment.value, model.value):
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc(refused).reason == ErrorReason.REQUEST_ID_REUSED
    assert plain.get_experiment_by_name(f"second-{unique}") is None
    assert not plain.search_registered_models(f"name = 'second-{unique}'")
