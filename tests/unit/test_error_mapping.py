"""The one error mapping: domain errors -> status codes with `google.rpc.Status` details
(AIP-193), anything else -> a generic INTERNAL; and the client's decoding of those details."""

from __future__ import annotations

import errno
import logging
import re
import resource
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mlflow_sidecar.client import errors
from mlflow_sidecar.core.conversions import ACCEPTED_POINTS_METADATA
from mlflow_sidecar.core.errors import ERROR_DOMAIN, ErrorReason, error_from_rpc
from mlflow_sidecar.server.auth import AuthInterceptor
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.interceptors import (
    RETRY_PUSHBACK_KEY,
    AccessLogInterceptor,
    ErrorMappingInterceptor,
)
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.mlflow_gateway.logged_models import LoggedModelGateway
from mlflow_sidecar.server.servicers.tracking import TrackingServicer
from mlflow_sidecar.server.services.artifact_transfers import ArtifactTransfers
from mlflow_sidecar.server.services.logged_models import LoggedModelService
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.fakes.mlflow_port import FakeMlflow

CASES = [
    (
        errors.NotFoundError("run x does not exist", reason=ErrorReason.RUN_NOT_FOUND),
        grpc.StatusCode.NOT_FOUND,
    ),
    (errors.AlreadyExistsError("exists"), grpc.StatusCode.ALREADY_EXISTS),
    (
        errors.InvalidArgumentError("series[2].timestamps_ms[1]", "must not be negative"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        errors.FailedPreconditionError(
            "write-once", reason=ErrorReason.PARAM_VALUE_CHANGED, metadata={"key": "lr"}
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    (
        errors.UnavailableError(
            "MLflow is unavailable",
            reason=ErrorReason.MLFLOW_UNAVAILABLE,
            metadata={"mlflow_error_code": "TEMPORARILY_UNAVAILABLE"},
        ),
        grpc.StatusCode.UNAVAILABLE,
    ),
    (errors.DeadlineExceededError("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (
        errors.ResourceExhaustedError(
            "spool full", reason=ErrorReason.SPOOL_FULL, retry_after_s=1.5
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    (errors.UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError("not allowed"), grpc.StatusCode.PERMISSION_DENIED),
    (
        errors.DataLossError("sha256 mismatch", reason=ErrorReason.DIGEST_MISMATCH),
        grpc.StatusCode.DATA_LOSS,
    ),
]


class RaisingService:
    """Raises whatever the test sets, from every method the servicer calls; StreamMetrics
    accepts `accept_before_failing` messages (one point each) before it raises."""

    error: Exception = RuntimeError("boom")
    accept_before_failing = 0

    def accept_metrics(self, batch):
        if self.accept_before_failing > 0:
            self.accept_before_failing -= 1
            return len(batch)
        raise self.error

    def __getattr__(self, name: str):
        def raise_it(*args, **kwargs):
            raise self.error

        return raise_it


class SelfAbortingServicer(TrackingServicer):
    """GetRun fails the way grpc's generated base servicer does: it sets a status itself."""

    def GetRun(self, request, context):
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")


def _start(tmp_path, service, *, servicer_cls=TrackingServicer, interceptors=()):
    config = load_config(data_dir=tmp_path)
    staging = Staging(config)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AccessLogInterceptor(), *interceptors, ErrorMappingInterceptor()],
    )
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(
        servicer_cls(
            service,
            ArtifactTransfers(FakeMlflow(), staging),
            staging,
            # Never called here: its gateway is not even opened.
            LoggedModelService(LoggedModelGateway(MlflowGateway(config)), staging),
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture()
def server_and_service(
    tmp_path,
) -> Iterator[tuple[pb_grpc.ExperimentTrackingServiceStub, RaisingService]]:
    service = RaisingService()
    server, port = _start(tmp_path, service)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.ExperimentTrackingServiceStub(channel), service
    server.stop(0)


def _details(err: grpc.RpcError) -> dict[str, object]:
    """The decoded `google.rpc.Status` details of a failed call, by kind."""
    status = rpc_status.from_call(err)
    assert status is not None, f"{err.code().name} without google.rpc.Status details"
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.__name__] = message
    return found


def _trailers(err: grpc.RpcError) -> dict[str, str | bytes]:
    return dict(err.trailing_metadata() or ())


@pytest.mark.parametrize(("error", "code"), CASES, ids=[c[1].name for c in CASES])
def test_domain_errors_map_to_their_status_code_and_details(server_and_service, error, code):
    stub, service = server_and_service
    service.error = error
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == code
    assert err.value.details() == error.message

    details = _details(err.value)
    info = details["ErrorInfo"]
    assert info.domain == ERROR_DOMAIN
    assert info.reason == error.reason
    assert dict(info.metadata) == error.metadata
    if error.field:
        (violation,) = details["BadRequest"].field_violations
        assert violation.field == error.field
        assert violation.description == error.problem
    else:
        assert "BadRequest" not in details
    if error.retry_after_s is not None:
        assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1500
    else:
        assert "RetryInfo" not in details

    # The client rebuilds the same domain error from the details alone.
    decoded = error_from_rpc(err.value)
    assert type(decoded) is type(error)
    assert decoded.reason == error.reason
    assert decoded.metadata == error.metadata
    assert decoded.field == error.field
    assert decoded.retry_after_s == error.retry_after_s
    assert decoded.message == error.message


def test_only_unavailable_tells_the_client_retry_policy_not_to_retry(server_and_service):
    stub, service = server_and_service
    service.error = errors.UnavailableError("down", reason=ErrorReason.MLFLOW_UNAVAILABLE)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert _trailers(err.value)[RETRY_PUSHBACK_KEY] == "-1"

    service.error = errors.NotFoundError("gone")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert RETRY_PUSHBACK_KEY not in _trailers(err.value)


def test_a_failed_stream_keeps_its_accepted_points_next_to_the_details(server_and_service):
    stub, service = server_and_service
    service.accept_before_failing = 2
    service.error = errors.ResourceExhaustedError(
        "full", reason=ErrorReason.SPOOL_FULL, retry_after_s=1.0
    )
    point = pb.MetricPoint(run_id="r", key="k", value=1.0, timestamp_ms=1)
    messages = [pb.StreamMetricsRequest(points=[point]) for _ in range(3)]
    with pytest.raises(grpc.RpcError) as err:
        stub.StreamMetrics(iter(messages))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _trailers(err.value)[ACCEPTED_POINTS_METADATA] == "2"
    decoded = error_from_rpc(err.value)
    assert decoded.reason == ErrorReason.SPOOL_FULL
    assert decoded.retry_after_s == 1.0


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
    assert "secret-detail" in caplog.text
    rid = re.search(r"request id (\S+)\)", err.value.details())
    assert rid is not None
    info = _details(err.value)["ErrorInfo"]
    assert info.reason == ErrorReason.INTERNAL
    assert dict(info.metadata) == {"request_id": rid.group(1)}
    assert rid.group(1) in caplog.text
    assert error_from_rpc(err.value).metadata == {"request_id": rid.group(1)}


def test_internal_domain_error_hides_its_detail(server_and_service):
    stub, service = server_and_service
    service.error = errors.InternalError(
        "mlflow said: password=hunter2", metadata={"secret": "hunter2"}
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in err.value.details()
    assert b"hunter2" not in rpc_status.from_call(err.value).SerializeToString()


def test_a_status_the_handler_set_itself_also_carries_details(tmp_path):
    server, port = _start(tmp_path, RaisingService(), servicer_cls=SelfAbortingServicer)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            pb_grpc.ExperimentTrackingServiceStub(channel).GetRun(pb.GetRunRequest())
    finally:
        server.stop(0)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _details(err.value)["ErrorInfo"].reason == ErrorReason.UNIMPLEMENTED
    assert isinstance(error_from_rpc(err.value), errors.UnimplementedError)


def test_an_auth_refusal_carries_details(tmp_path):
    server, port = _start(tmp_path, RaisingService(), interceptors=[AuthInterceptor(["t0k"])])
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            pb_grpc.ExperimentTrackingServiceStub(channel).GetRun(pb.GetRunRequest())
    finally:
        server.stop(0)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = _details(err.value)["ErrorInfo"]
    assert (info.domain, info.reason) == (ERROR_DOMAIN, ErrorReason.UNAUTHENTICATED)
    assert "t0k" not in err.value.details()


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


@pytest.mark.parametrize(
    ("error", "level"),
    [
        (errors.NotFoundError("nope"), logging.INFO),
        (errors.InvalidArgumentError("run_id", "bad"), logging.INFO),
        (errors.UnavailableError("MLflow down"), logging.WARNING),
        (RuntimeError("bug"), logging.WARNING),
    ],
)
def test_access_log_level_tells_the_callers_outcomes_from_failures(
    server_and_service, caplog, error, level
):
    stub, service = server_and_service
    service.error = error
    with (
        caplog.at_level(logging.DEBUG, logger="mlflow_sidecar.access"),
        pytest.raises(grpc.RpcError),
    ):
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    access = [r for r in caplog.records if r.name == "mlflow_sidecar.access"]
    assert [r.levelno for r in access] == [level]


# -- the client's decoding, without a server -------------------------------------------


class FakeCall(grpc.RpcError, grpc.Call):
    """A failed call as grpc hands it to the client."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def _with_details(status: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    return ((rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),)


def test_a_status_without_details_gets_the_generic_reason_and_no_parsed_field():
    # What grpc itself produces (a transport failure), or an old server's wording.
    unavailable = error_from_rpc(FakeCall(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert isinstance(unavailable, errors.UnavailableError)
    assert unavailable.reason == ErrorReason.UNAVAILABLE
    invalid = error_from_rpc(
        FakeCall(grpc.StatusCode.INVALID_ARGUMENT, "page_size: must be between 1 and 1000")
    )
    assert isinstance(invalid, errors.InvalidArgumentError)
    assert (invalid.reason, invalid.field) == (ErrorReason.INVALID_ARGUMENT, "")
    assert invalid.message == "page_size: must be between 1 and 1000"


def test_the_field_comes_from_bad_request_not_from_the_message():
    error = errors.InvalidArgumentError(
        "page_token", "is not a token", reason=ErrorReason.INVALID_PAGE_TOKEN
    )
    status = errors.to_rpc_status(error)
    # Whatever the message says, the details decide.
    status.message = "something: else entirely"
    decoded = error_from_rpc(
        FakeCall(grpc.StatusCode.INVALID_ARGUMENT, status.message, _with_details(status))
    )
    assert isinstance(decoded, errors.InvalidArgumentError)
    assert (decoded.field, decoded.problem) == ("page_token", "is not a token")
    assert decoded.reason == ErrorReason.INVALID_PAGE_TOKEN


def test_another_domains_error_info_is_not_taken_for_ours():
    status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="nope")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="RUN_NOT_FOUND", domain="example.com")
    )
    decoded = error_from_rpc(FakeCall(grpc.StatusCode.NOT_FOUND, "nope", _with_details(status)))
    assert isinstance(decoded, errors.NotFoundError)
    assert decoded.reason == ErrorReason.NOT_FOUND


def test_details_that_contradict_the_status_line_are_ignored():
    status = errors.to_rpc_status(errors.NotFoundError("x", reason=ErrorReason.RUN_NOT_FOUND))
    decoded = error_from_rpc(FakeCall(grpc.StatusCode.INTERNAL, "x", _with_details(status)))
    assert isinstance(decoded, errors.InternalError)
    assert decoded.reason == ErrorReason.INTERNAL


def test_every_reason_is_upper_snake_case_and_unique():
    values = [reason.value for reason in ErrorReason]
    assert len(values) == len(set(values))
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*[A-Z0-9]", v) and len(v) <= 63 for v in values)


def test_every_specific_reason_is_documented_in_the_proto_and_the_readme():
    root = Path(__file__).resolve().parents[2]
    proto = (root / "protos/mlflow_sidecar/v1/tracking.proto").read_text()
    readme = (root / "README.md").read_text()
    generic = {code.name for code in grpc.StatusCode}
    for reason in ErrorReason:
        if reason.value in generic:
            continue
        assert f"- {reason.value} [" in proto, reason
        assert f"| `{reason.value}` |" in readme, reason


def test_a_full_disk_on_any_write_path_is_resource_exhausted(server_and_service):
    import errno

    stub, service = server_and_service
    service.error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "disk is full" in (err.value.details() or "")
    assert error_from_rpc(err.value).reason == ErrorReason.DISK_FULL


def test_a_field_violation_describes_the_problem_without_repeating_the_field():
    # Errors other than INVALID_ARGUMENT name a field too (PERMISSION_DENIED on `source`).
    error = errors.PermissionDeniedError(
        "source: the location is outside the artifact stores",
        reason=ErrorReason.PATH_OUTSIDE_ROOTS,
        field="source",
    )
    (violation,) = [
        v
        for d in errors.to_rpc_status(error).details
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpacked_bad_request(d).field_violations
    ]
    assert (violation.field, violation.description) == (
        "source",
        "the location is outside the artifact stores",
    )


def _unpacked_bad_request(detail) -> error_details_pb2.BadRequest:
    message = error_details_pb2.BadRequest()
    detail.Unpack(message)
    return message


@pytest.mark.parametrize(
    ("method", "payload"),
    [
        # Field 1 (run_id) of GetRunRequest, a string, holding bytes that are not UTF-8.
        ("GetRun", b"\x0a\x02\xff\xfe"),
        # Not a protobuf message at all: a length running past the end.
        ("GetRun", b"\x0a\x7f"),
        # A streaming request: the first message is not UTF-8 either.
        ("StreamMetrics", b"\x0a\x05\x0a\x03\xff\xfe\xfd"),
    ],
)
def test_a_request_that_does_not_decode_is_invalid_argument_with_details(tmp_path, method, payload):
    server, port = _start(tmp_path, RaisingService())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    path = f"/mlflow_sidecar.v1.ExperimentTrackingService/{method}"
    with pytest.raises(grpc.RpcError) as err:
        if method == "StreamMetrics":
            channel.stream_unary(path)(iter([payload]), timeout=10)
        else:
            channel.unary_unary(path)(payload, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert method in err.value.details()
    info = _details(err.value)["ErrorInfo"]
    assert info.reason == ErrorReason.INVALID_ARGUMENT
    assert "x-request-id" in _trailers(err.value)
    channel.close()
    server.stop(0)


def test_a_process_out_of_file_handles_says_so_with_its_limit(server_and_service, caplog):
    # However deep a library wraps it, EMFILE is the sidecar's limit, not a bug to look
    # up in the log: the caller retries, the operator learns what to raise.
    stub, service = server_and_service
    try:
        raise OSError(errno.EMFILE, "Too many open files")
    except OSError as exc:
        wrapped = RuntimeError("could not stage the upload")
        wrapped.__cause__ = exc
    service.error = wrapped
    with (
        caplog.at_level(logging.ERROR, logger="mlflow_sidecar"),
        pytest.raises(grpc.RpcError) as err,
    ):
        stub.GetRun(pb.GetRunRequest(run_id="x"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = error_from_rpc(err.value)
    assert error.reason == ErrorReason.TOO_MANY_OPEN_FILES
    limit = str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    assert error.metadata["open_files_limit"] == limit
    assert error.retry_after_s == 1.0
    assert f"limit of {limit} open files" in caplog.text and "GetRun" in caplog.text
