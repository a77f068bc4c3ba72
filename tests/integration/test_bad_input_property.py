"""Random and boundary values thrown at every RPC of both services.

Every answer must be OK or a documented status code, never INTERNAL or UNKNOWN; every
non-OK answer must carry decodable `google.rpc.Status` details with an `ErrorInfo` of
domain mlflow-sidecar, and INVALID_ARGUMENT a `BadRequest` naming the field; the server
must stay SERVING; data accepted before must be intact.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_sidecar.core.errors import ERROR_DOMAIN
from mlflow_sidecar.v1 import registry_pb2, tracking_pb2
from mlflow_sidecar.v1 import tracking_pb2 as pb

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
}

# Streams that end only when the client leaves: a request they take is answered by a first
# message, after which the client leaves.
ENDLESS = {"WatchModelAlias"}

METHODS: list[MethodDescriptor] = [
    method
    for module in (tracking_pb2, registry_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]

_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
_nasty_text = st.one_of(
    st.just(""),
    _text,
    st.text(alphabet=st.characters(codec="ascii", categories=("Cc",)), min_size=1, max_size=5),
    st.sampled_from(
        [
            "../../etc/passwd",
            "/absolute/path",
            "a/" * 300 + "b",
            "x" * 10_000,
            "ünïcödé-名前-🚀",
            "'; DROP TABLE runs; --",
            "name = 'x' OR 1=1",
            "runs:/" + "0" * 32 + "/model",
            "models:/missing@champion",
            "latest",
            "v3",
            "a\\b",
            " ",
            "%s%n",
        ]
    ),
)
_ints = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
_longs = st.one_of(
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1)
)
_doubles = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e-308]),
    st.floats(allow_nan=True, allow_infinity=True),
)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type, fields filled with hostile values (or left unset)."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = _scalar(field.message_type.fields_by_name["value"], depth)
            fields[field.name] = st.dictionaries(
                _nasty_text, _nasty_text if values is None else values, max_size=4
            )
            continue
        single = _scalar(field, depth)
        if single is None:
            continue
        if field.is_repeated:
            fields[field.name] = st.lists(single, max_size=4)
        else:
            fields[field.name] = single
    optional = {name: st.one_of(st.none(), strategy) for name, strategy in fields.items()}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return _nasty_text
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _doubles
    if field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return _longs
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return _ints
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _ints)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return None if depth > 2 else message_strategy(field.message_type, depth + 1)
    return None


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        target = getattr(message, name)
        if isinstance(value, dict):
            target.update(value)
        elif isinstance(value, list):
            target.extend(value)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _invoke(
    channel: grpc.Channel, method: MethodDescriptor, requests: list[Message]
) -> grpc.RpcError | None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = GetMessageClass(method.output_type)
    kwargs = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_cls.FromString,
    }
    try:
        if method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter(requests), timeout=30)
        elif method.name in ENDLESS:
            call = channel.unary_stream(path, **kwargs)(requests[0], timeout=30)
            next(call)
            call.cancel()
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **kwargs)(requests[0], timeout=30):
                pass
        else:
            channel.unary_unary(path, **kwargs)(requests[0], timeout=30)
    except grpc.RpcError as exc:
        return exc
    return None


def _details_problem(err: grpc.RpcError) -> str | None:
    """What is wrong with a failed call's `google.rpc.Status` details; None when they keep
    the promise: decodable, an ErrorInfo of our domain with a reason, and for
    INVALID_ARGUMENT a BadRequest with a named field."""
    try:
        status = rpc_status.from_call(err)
    except ValueError as exc:
        return f"details contradict the status line: {exc}"
    if status is None:
        return "no google.rpc.Status details"
    infos, violations = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    if len(infos) != 1 or infos[0].domain != ERROR_DOMAIN or not infos[0].reason:
        return f"no single ErrorInfo of domain {ERROR_DOMAIN} with a reason: {infos}"
    if err.code() == grpc.StatusCode.INVALID_ARGUMENT and not (
        violations and all(v.field for v in violations)
    ):
        return f"INVALID_ARGUMENT without a BadRequest field: {violations}"
    return None


@pytest.fixture(scope="module")
def reference(tracking_stub):
    """Data accepted before the storm, checked after it."""
    exp = tracking_stub.CreateExperiment(
        pb.CreateExperimentRequest(name="bad-input-reference", get_if_exists=True)
    ).experiment.experiment_id
    run_id = tracking_stub.StartRun(pb.StartRunRequest(experiment_id=exp)).run.info.run_id
    tracking_stub.LogParams(pb.LogParamsRequest(run_id=run_id, params={"lr": "0.1"}))
    tracking_stub.LogMetrics(
        pb.LogMetricsRequest(
            run_id=run_id, metrics=[pb.Metric(key="m", value=float(i), step=i) for i in range(10)]
        )
    )
    return run_id


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_every_rpc_answers_bad_input_with_a_documented_code(channel, reference, method):
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(message_strategy(method.input_type), min_size=1, max_size=3))
    def check(requests: list[Message]) -> None:
        err = _invoke(channel, method, requests)
        code = grpc.StatusCode.OK if err is None else err.code()
        assert code in DOCUMENTED, f"{method.name} answered {code.name} to {requests!r:.500}"
        if err is not None:
            problem = _details_problem(err)
            assert problem is None, (
                f"{method.name} answered {code.name} {err.details()!r}: {problem};"
                f" request {requests!r:.500}"
            )

    check()

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_data_accepted_before_is_intact(tracking_stub, reference):
    run = tracking_stub.GetRun(pb.GetRunRequest(run_id=reference)).run
    assert dict(run.data.params) == {"lr": "0.1"}
    history = tracking_stub.GetMetricHistory(
        pb.GetMetricHistoryRequest(run_id=reference, metric_key="m")
    ).metrics
    assert [(m.step, m.value) for m in history] == [(i, float(i)) for i in range(10)]
