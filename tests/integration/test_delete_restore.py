"""Delete/Restore Experiment and Run through the typed client and the raw stubs, behind an
mlflow server and on the embedded store; the name of a deleted experiment; and no SQL
text in any answer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.ports import ExperimentTracking
from mlflow_sidecar.core.domain import LifecycleStage, ViewType
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
)
from mlflow_sidecar.v1 import registry_pb2 as rpb
from mlflow_sidecar.v1 import registry_pb2_grpc as rpb_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

# Words of database errors that must never reach a caller.
SQL_WORDS = ("sql", "sqlite", "psycopg", "integrityerror", "insert into", "unique constraint")


@pytest.fixture()
def tracking(either_sidecar) -> Iterator[ExperimentTracking]:
    container = ClientContainer()
    container.config.from_dict({"target": either_sidecar.target, "timeout_s": 30.0})
    yield container.experiment_tracking()
    container.shutdown_resources()


def test_experiment_delete_and_restore_are_soft_and_idempotent(tracking, unique):
    exp = tracking.create_experiment(f"delete-{unique}")
    run = tracking.start_run(exp.experiment_id)
    tracking.delete_experiment(exp.experiment_id)
    deleted_once = tracking.get_experiment(exp.experiment_id)
    assert deleted_once.lifecycle_stage is LifecycleStage.DELETED
    tracking.delete_experiment(exp.experiment_id)  # deleting a deleted one changes nothing
    assert tracking.get_experiment(exp.experiment_id) == deleted_once
    assert tracking.get_run(run.run_id).info.lifecycle_stage is LifecycleStage.DELETED
    deleted = tracking.search_experiments(
        filter_string=f"name = 'delete-{unique}'", view_type=ViewType.DELETED_ONLY
    )
    assert [e.experiment_id for e in deleted.items] == [exp.experiment_id]
    assert not tracking.search_experiments(filter_string=f"name = 'delete-{unique}'").items

    restored = tracking.restore_experiment(exp.experiment_id)
    assert restored.lifecycle_stage is LifecycleStage.ACTIVE
    assert tracking.restore_experiment(exp.experiment_id) == restored  # active: a no-op
    assert tracking.get_run(run.run_id).info.lifecycle_stage is LifecycleStage.ACTIVE


def test_run_delete_and_restore_are_soft_and_idempotent(tracking, unique):
    exp = tracking.create_experiment(f"delete-run-{unique}")
    run = tracking.start_run(exp.experiment_id)
    tracking.log_params(run.run_id, {"lr": "0.1"})
    tracking.delete_run(run.run_id)
    tracking.delete_run(run.run_id)
    assert tracking.get_run(run.run_id).info.lifecycle_stage is LifecycleStage.DELETED
    with pytest.raises(FailedPreconditionError):
        tracking.log_params(run.run_id, {"other": "1"})
    restored = tracking.restore_run(run.run_id)
    assert restored.info.lifecycle_stage is LifecycleStage.ACTIVE
    assert restored.params == {"lr": "0.1"}
    again = tracking.restore_run(run.run_id)
    assert again.info.lifecycle_stage is LifecycleStage.ACTIVE
    tracking.log_params(run.run_id, {"other": "1"})


def test_unknown_ids_are_not_found(tracking):
    with pytest.raises(NotFoundError):
        tracking.delete_experiment("987654321")
    with pytest.raises(NotFoundError):
        tracking.restore_experiment("987654321")
    with pytest.raises(NotFoundError):
        tracking.delete_run("0" * 32)
    with pytest.raises(NotFoundError):
        tracking.restore_run("0" * 32)


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request)
    return err.value


def test_the_name_of_a_deleted_experiment_is_failed_precondition(either_sidecar, unique):
    name = f"deleted-name-{unique}"
    with grpc.insecure_channel(either_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        experiment_id = stub.CreateExperiment(
            pb.CreateExperimentRequest(name=name)
        ).experiment.experiment_id
        stub.DeleteExperiment(pb.DeleteExperimentRequest(experiment_id=experiment_id))
        for get_if_exists in (False, True):
            err = _error(
                stub.CreateExperiment,
                pb.CreateExperimentRequest(name=name, get_if_exists=get_if_exists),
            )
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            assert "RestoreExperiment" in err.details()
            assert experiment_id in err.details()
            assert not any(word in err.details().lower() for word in SQL_WORDS), err.details()
        err = _error(stub.StartRun, pb.StartRunRequest(experiment_id=experiment_id))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        restored = stub.RestoreExperiment(pb.RestoreExperimentRequest(experiment_id=experiment_id))
        assert restored.experiment.lifecycle_stage == pb.LIFECYCLE_STAGE_ACTIVE
        again = stub.CreateExperiment(pb.CreateExperimentRequest(name=name, get_if_exists=True))
        assert again.experiment.experiment_id == experiment_id


def test_no_sql_text_reaches_a_caller(either_sidecar, unique):
    """Duplicates make MLflow's SQL stores raise IntegrityErrors with the statement in the
    message (SQLite and PostgreSQL alike); the caller gets one clean sentence."""
    with grpc.insecure_channel(either_sidecar.target) as channel:
        tracking = pb_grpc.ExperimentTrackingServiceStub(channel)
        registry = rpb_grpc.ModelRegistryServiceStub(channel)
        tracking.CreateExperiment(pb.CreateExperimentRequest(name=f"dup-{unique}"))
        registry.CreateRegisteredModel(rpb.CreateRegisteredModelRequest(name=f"dup-{unique}"))
        errors = [
            _error(tracking.CreateExperiment, pb.CreateExperimentRequest(name=f"dup-{unique}")),
            _error(
                registry.CreateRegisteredModel,
                rpb.CreateRegisteredModelRequest(name=f"dup-{unique}"),
            ),
        ]
    for err in errors:
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
        assert f"dup-{unique}" in err.details()
        assert not any(word in err.details().lower() for word in SQL_WORDS), err.details()


def test_a_run_deleted_in_mlflow_is_restored_through_the_sidecar(sidecar, mlflow_server, unique):
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        experiment_id = stub.CreateExperiment(
            pb.CreateExperimentRequest(name=f"mlflow-deleted-{unique}")
        ).experiment.experiment_id
        run_id = stub.StartRun(pb.StartRunRequest(experiment_id=experiment_id)).run.info.run_id
        mlflow.MlflowClient(tracking_uri=mlflow_server.url).delete_run(run_id)
        reply = stub.RestoreRun(pb.RestoreRunRequest(run_id=run_id))
        assert reply.run.info.lifecycle_stage == pb.LIFECYCLE_STAGE_ACTIVE
        stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id))
    seen = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id)
    assert seen.info.lifecycle_stage == "deleted"


def test_the_gateway_cuts_database_text_from_mlflow_errors(either_sidecar, unique):
    """MLflow words a duplicate experiment with the driver's error and the INSERT statement
    (both behind a server and embedded); the gateway keeps MLflow's first sentence only."""
    gateway = either_sidecar.container.gateway()
    name = f"dup-gateway-{unique}"
    gateway.create_experiment(name, artifact_location="", tags={}, request_id=f"a-{unique}")
    with pytest.raises(AlreadyExistsError) as err:
        gateway.create_experiment(name, artifact_location="", tags={}, request_id=f"b-{unique}")
    assert err.value.message == f"Experiment(name=dup-gateway-{unique}) already exists."
