"""The real grpcurl binary against a running sidecar, through server reflection only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
TRACKING = "mlflow_sidecar.v1.ExperimentTrackingService"


def grpcurl(
    target: str, *args: str, data: dict | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = [GRPCURL, "-plaintext", *flags]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, target, *args], capture_output=True, text=True, timeout=60, check=False
    )


def call(target: str, method: str, data: dict) -> dict:
    result = grpcurl(target, f"{TRACKING}/{method}", data=data)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_list_shows_both_services_and_health(sidecar):
    result = grpcurl(sidecar.target, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert "mlflow_sidecar.v1.ExperimentTrackingService" in services
    assert "mlflow_sidecar.v1.ModelRegistryService" in services
    assert "grpc.health.v1.Health" in services


def test_describe_shows_the_contract(sidecar):
    result = grpcurl(sidecar.target, "describe", TRACKING)
    assert result.returncode == 0, result.stderr
    assert "rpc StartRun ( .mlflow_sidecar.v1.StartRunRequest )" in result.stdout
    assert "rpc StreamMetrics ( stream .mlflow_sidecar.v1.StreamMetricsRequest )" in result.stdout
    message = grpcurl(sidecar.target, "describe", "mlflow_sidecar.v1.StartRunRequest")
    assert "string request_id = 7;" in message.stdout
    assert "client_request_id = 6 [deprecated = true]" in message.stdout


PROTOS = Path(__file__).resolve().parents[2] / "protos" / "mlflow_sidecar" / "v1"


def comments_of(proto_file: str, message: str) -> list[str]:
    """The comment lines inside `message ... { ... }` of the proto source, stripped."""
    lines = (PROTOS / proto_file).read_text().splitlines()
    start = lines.index(f"message {message} {{")
    end = lines.index("}", start)
    return [line.strip() for line in lines[start:end] if line.strip().startswith("//")]


@pytest.mark.parametrize(
    ("proto_file", "message"),
    [
        ("tracking.proto", "EndRunRequest"),
        ("tracking.proto", "LoggedModelOrder"),
        ("registry.proto", "UploadModelHeader"),
    ],
)
def test_describe_shows_the_contracts_comments(sidecar, proto_file, message):
    # What a field means, and what leaving it out means, lives in the comments alone.
    comments = comments_of(proto_file, message)
    assert comments, f"{message} has no comments to show"
    result = grpcurl(sidecar.target, "describe", f"mlflow_sidecar.v1.{message}")
    assert result.returncode == 0, result.stderr
    shown = [line.strip() for line in result.stdout.splitlines()]
    assert [line for line in comments if line not in shown] == []


def test_describe_shows_one_rpc_with_its_comments(sidecar):
    lines = (PROTOS / "tracking.proto").read_text().splitlines()
    rpc = next(i for i, line in enumerate(lines) if line.strip().startswith("rpc EndRun("))
    comments = []
    for line in reversed(lines[:rpc]):
        if not line.strip().startswith("//"):
            break
        comments.insert(0, line.strip())
    assert comments, "EndRun has no comment to show"
    result = grpcurl(sidecar.target, "describe", f"{TRACKING}.EndRun")
    assert result.returncode == 0, result.stderr
    assert "rpc EndRun ( .mlflow_sidecar.v1.EndRunRequest )" in result.stdout
    shown = [line.strip() for line in result.stdout.splitlines()]
    assert [line for line in comments if line not in shown] == []


def test_health_check_through_grpcurl(sidecar):
    result = grpcurl(sidecar.target, "grpc.health.v1.Health/Check", data={"service": TRACKING})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_tracking_sequence_with_json_alone(sidecar, unique):
    target = sidecar.target
    exp = call(target, "CreateExperiment", {"name": f"grpcurl-{unique}", "get_if_exists": True})
    experiment_id = exp["experiment"]["experiment_id"]
    run = call(
        target,
        "StartRun",
        {"experiment_id": experiment_id, "run_name": "cli", "request_id": f"cli-{unique}"},
    )["run"]
    run_id = run["info"]["run_id"]
    # The same request again is the same run.
    again = call(
        target,
        "StartRun",
        {"experiment_id": experiment_id, "run_name": "cli", "request_id": f"cli-{unique}"},
    )["run"]
    assert again["info"]["run_id"] == run_id
    call(target, "LogParams", {"run_id": run_id, "params": {"lr": "0.001"}})
    logged = call(
        target,
        "LogMetrics",
        {"run_id": run_id, "metrics": [{"key": "reward", "value": 1.5, "step": 1}]},
    )
    assert logged == {"accepted_points": "1"}
    fetched = call(target, "GetRun", {"run_id": run_id})["run"]
    assert fetched["data"]["params"] == {"lr": "0.001"}
    assert fetched["data"]["metrics"][0]["value"] == 1.5
    ended = call(target, "EndRun", {"run_id": run_id, "status": "RUN_STATUS_FINISHED"})["run"]
    assert ended["info"]["status"] == "RUN_STATUS_FINISHED"
    resumed = call(target, "ResumeRun", {"run_id": run_id})["run"]
    assert resumed["info"]["status"] == "RUN_STATUS_RUNNING"
    assert resumed["info"]["end_time_ms"] == ended["info"]["end_time_ms"]


def test_stream_metrics_says_which_series_columns_it_reads_and_takes_fixed_ones(sidecar, unique):
    exp = call(sidecar.target, "CreateExperiment", {"name": f"fixed-{unique}"})
    run = call(sidecar.target, "StartRun", {"experiment_id": exp["experiment"]["experiment_id"]})
    run_id = run["run"]["info"]["run_id"]
    series = {
        "run_id": run_id,
        "key": "reward",
        "values": [1.5, 2.5],
        "fixed_timestamps_ms": ["1764000000000", "1764000000001"],
        "fixed_steps": ["-1", "7"],
    }
    # -v prints the response headers: the initial metadata.
    result = grpcurl(
        sidecar.target, f"{TRACKING}/StreamMetrics", data={"series": [series]}, flags=("-v",)
    )
    assert result.returncode == 0, result.stderr
    assert "series-columns: varint,fixed64" in result.stdout
    assert '"accepted_points": "2"' in result.stdout
    call(sidecar.target, "FlushMetrics", {"run_id": run_id})
    history = call(sidecar.target, "GetMetricHistory", {"run_id": run_id, "metric_key": "reward"})
    assert sorted((m["step"], m["timestamp_ms"], m["value"]) for m in history["metrics"]) == [
        ("-1", "1764000000000", 1.5),
        ("7", "1764000000001", 2.5),
    ]


def test_errors_show_their_status_code(sidecar):
    result = grpcurl(sidecar.target, f"{TRACKING}/GetRun", data={"run_id": "0" * 32})
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr


def test_delete_and_restore_with_json_alone(sidecar, unique):
    target = sidecar.target
    experiment_id = call(target, "CreateExperiment", {"name": f"grpcurl-delete-{unique}"})[
        "experiment"
    ]["experiment_id"]
    run_id = call(target, "StartRun", {"experiment_id": experiment_id})["run"]["info"]["run_id"]
    assert call(target, "DeleteRun", {"run_id": run_id}) == {}
    restored_run = call(target, "RestoreRun", {"run_id": run_id})["run"]
    assert restored_run["info"]["lifecycle_stage"] == "LIFECYCLE_STAGE_ACTIVE"
    assert call(target, "DeleteExperiment", {"experiment_id": experiment_id}) == {}
    deleted = call(target, "GetExperiment", {"experiment_id": experiment_id})["experiment"]
    assert deleted["lifecycle_stage"] == "LIFECYCLE_STAGE_DELETED"
    refused = grpcurl(
        target, f"{TRACKING}/CreateExperiment", data={"name": f"grpcurl-delete-{unique}"}
    )
    assert "Code: FailedPrecondition" in refused.stderr
    assert "RestoreExperiment" in refused.stderr
    restored = call(target, "RestoreExperiment", {"experiment_id": experiment_id})["experiment"]
    assert restored["lifecycle_stage"] == "LIFECYCLE_STAGE_ACTIVE"


def test_list_shows_both_reflection_versions_and_describes_v1(sidecar):
    services = grpcurl(sidecar.target, "list").stdout.split()
    assert "grpc.reflection.v1.ServerReflection" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    described = grpcurl(sidecar.target, "describe", "grpc.reflection.v1.ServerReflection")
    assert described.returncode == 0, described.stderr
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in (
        described.stdout
    )


def test_a_v1_reflection_client_is_answered(sidecar):
    """A client that speaks only grpc.reflection.v1 (message classes of that package)."""
    pool = descriptor_pool.Default()
    request_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response_class = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    with grpc.insecure_channel(sidecar.target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        answers = list(
            info(
                iter(
                    [
                        request_class(list_services=""),
                        request_class(file_containing_symbol=TRACKING),
                    ]
                ),
                timeout=10,
            )
        )
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {TRACKING, "grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= listed
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answers[1].file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "mlflow_sidecar.v1" for f in files)
