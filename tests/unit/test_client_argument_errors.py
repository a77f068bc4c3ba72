"""Arguments the typed clients cannot send are refused before anything is sent, with an
error that names them: a number outside what its field holds is InvalidArgumentError on
the field as the request spells it, a value of the wrong type a TypeError naming it.
protobuf's own ValueError, OverflowError or TypeError named neither ("Value out of range",
"bad argument type for built-in operation"), and a str status a bare KeyError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.domain import Metric, MetricPoint
from mlflow_sidecar.core.errors import InvalidArgumentError

Call = Callable[[Any, Any], object]

OUT_OF_RANGE: dict[str, tuple[str, Call]] = {
    "log_metrics step": (
        "metrics[1].step",
        lambda t, r: t.log_metrics("run", [Metric("m", 1.0), Metric("m", 1.0, step=2**63)]),
    ),
    "log_metrics timestamp": (
        "metrics[0].timestamp_ms",
        lambda t, r: t.log_metrics("run", [Metric("m", 1.0, timestamp_ms=2**64)]),
    ),
    "log_metrics value": (
        "metrics[0].value",
        lambda t, r: t.log_metrics("run", [Metric("m", 10**400)]),
    ),
    "enqueue_metrics step": (
        "points[0].step",
        lambda t, r: t.enqueue_metrics([MetricPoint("run", "m", 1.0, step=-(2**63) - 1)]),
    ),
    "start_run start time": (
        "start_time_ms",
        lambda t, r: t.start_run("1", start_time_ms=2**63),
    ),
    "end_run end time": ("end_time_ms", lambda t, r: t.end_run("run", end_time_ms=2**63)),
    "get_model_version": ("version", lambda t, r: r.get_model_version("m", 2**70)),
    "set_model_alias": ("version", lambda t, r: r.set_model_alias("m", "a", 2**63)),
    "update_model_version": (
        "version",
        lambda t, r: r.update_model_version("m", 2**63, description="d"),
    ),
    "delete_model_version": ("version", lambda t, r: r.delete_model_version("m", 2**63)),
    "set_model_version_tag": (
        "version",
        lambda t, r: r.set_model_version_tag("m", 2**63, "k", "v"),
    ),
    "delete_model_version_tag": (
        "version",
        lambda t, r: r.delete_model_version_tag("m", 2**63, "k"),
    ),
}

WRONG_TYPE: dict[str, tuple[str, Call]] = {
    "log_params value": ("params['lr']", lambda t, r: t.log_params("run", {"lr": 0.1})),
    "end_run status": ("status", lambda t, r: t.end_run("run", "FINISHED")),
    "create_experiment tag": (
        "tags['seed']",
        lambda t, r: t.create_experiment("e", tags={"seed": 7}),
    ),
    "start_run tag": ("tags['seed']", lambda t, r: t.start_run("1", tags={"seed": 7})),
    "set_run_tags": ("tags['seed']", lambda t, r: t.set_run_tags("run", {"seed": 7})),
    "create_registered_model tag": (
        "tags['owner']",
        lambda t, r: r.create_registered_model("m", tags={"owner": None}),
    ),
    "create_model_version tag": (
        "tags['score']",
        lambda t, r: r.create_model_version("m", source="runs:/r/m", tags={"score": 0.9}),
    ),
}


def _clients() -> tuple[GrpcExperimentTracking, GrpcModelRegistry, mock.Mock, mock.Mock]:
    tracking_stub, registry_stub = mock.Mock(), mock.Mock()
    return (
        GrpcExperimentTracking(tracking_stub),
        GrpcModelRegistry(registry_stub),
        tracking_stub,
        registry_stub,
    )


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_a_number_out_of_range_is_invalid_argument_on_its_field(case: str) -> None:
    field, call = OUT_OF_RANGE[case]
    tracking, registry, tracking_stub, registry_stub = _clients()
    with pytest.raises(InvalidArgumentError) as err:
        call(tracking, registry)
    assert err.value.field == field
    assert tracking_stub.mock_calls == [] and registry_stub.mock_calls == []


@pytest.mark.parametrize("case", sorted(WRONG_TYPE))
def test_a_value_of_the_wrong_type_is_a_type_error_naming_it(case: str) -> None:
    name, call = WRONG_TYPE[case]
    tracking, registry, tracking_stub, registry_stub = _clients()
    with pytest.raises(TypeError) as err:
        call(tracking, registry)
    assert str(err.value).startswith(f"{name} must be ")
    assert tracking_stub.mock_calls == [] and registry_stub.mock_calls == []


def test_a_stream_refuses_a_value_too_large_for_a_float_as_it_does_a_step() -> None:
    stream = MetricStream(mock.Mock())
    try:
        with pytest.raises(ValueError, match="metric 'k': value is too large for a float"):
            stream.log("r" * 32, "k", 10**400)
        with pytest.raises(ValueError, match="metric 'k': step must fit in 64 bits"):
            stream.log("r" * 32, "k", 1.0, step=2**63)
    finally:
        stream.close(timeout_s=30)
