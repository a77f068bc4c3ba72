"""The one error mapping: domain errors -> status codes, anything else -> a generic INTERNAL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.client import errors
from mlflow_sidecar.client.errors import error_from_status
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.interceptors import AccessLogInterceptor, ErrorMappingInterceptor
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.servicers.tracking import TrackingServicer
from mlflow_sidecar.server.services.artifact_transfers import ArtifactTransfers
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

CASES = [
    (errors.NotFoundError("run x does not exist"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError("exists"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgumentError("name", "must not be empty"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPreconditionError("write-once"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError("MLflow is unavailable"), grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceededError("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ResourceExhaustedError("spool full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError("not allowed"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.DataLossError("sha256 mismatch"), grpc.StatusCode.DATA_LOSS),
]


class RaisingService:
    """Raises whatever the test sets, from every method the servicer calls."""

    error: Exception = RuntimeError("boom")

    def __getattr__(self, name: str):
        def raise_it(*args, **kwargs):
            raise self.error

        return raise_it


@pytest.fixture()
def server_and_service(
    tmp_path,
) -> Iterator[tuple[pb_grpc.ExperimentTrackingServiceStub, RaisingService]]:
    service = RaisingService()
    config = load_config(data_dir=tmp_path)
    staging = Staging(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AccessLogInterceptor(), ErrorMappingInterceptor()],
    )
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(
        TrackingServicer(service, ArtifactTransfers(MlflowGateway(config), staging), staging),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.ExperimentTrackingServiceStub(channel), service
    server.stop(0)


@pytest.mark.parametrize(("error", "code"), CASES, ids=[c[1].name for c in CASES])
def test_domain_errors_map_to_their_status_code(server_and_service, error, code):
    stub, service = server_and_service
    service.error = error
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == code
    assert err.value.details() == error.message
    # And the client maps the status back to the same domain error type.
    assert type(error_from_status(err.value.code(), err.value.details())) is type(error)


def test_unexpected_errors_are_internal_with_a_generic_message(server_and_service, caplog):
    stub, service = server_and_service
    service.error = KeyError("secret-detail")
    with (
        caplog.at_level(logging.ERROR, logger="mlflow_sidecar.errors"),
        pytest.raises(grpc.RpcError) as err,
    ):
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-detail" not in err.value.details()
    assert "request id" in err.value.details()
    assert "secret-detail" in caplog.text


def test_internal_domain_error_hides_its_detail(server_and_service):
    stub, service = server_and_service
    service.error = errors.InternalError("mlflow said: password=hunter2")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in err.value.details()


def test_access_log_records_method_and_code(server_and_service, caplog):
    stub, service = server_and_service
    service.error = errors.NotFoundError("nope")
    with (
        caplog.at_level(logging.INFO, logger="mlflow_sidecar.access"),
        pytest.raises(grpc.RpcError),
    ):
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert "/mlflow_sidecar.v1.ExperimentTrackingService/GetRun" in caplog.text
    assert "NOT_FOUND" in caplog.text


def test_invalid_argument_round_trips_its_field():
    error = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be between 1 and 1000"
    )
    assert isinstance(error, errors.InvalidArgumentError)
    assert error.field == "page_size"


def test_a_full_disk_on_any_write_path_is_resource_exhausted(server_and_service):
    import errno

    stub, service = server_and_service
    service.error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk is full" in (err.value.details() or "")
