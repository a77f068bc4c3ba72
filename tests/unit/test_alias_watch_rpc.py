"""WatchModelAlias over gRPC, through the sidecar's own server (interceptors, error mapping,
drain) with FakeMlflow behind it: messages, bad requests, a client that leaves, a stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.server.alias_watch import AliasWatchHub
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.grpc_server import SidecarServer
from mlflow_sidecar.server.model_cache import ModelCache
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.servicers.registry import RegistryServicer
from mlflow_sidecar.server.services.alias_watch import AliasWatchService
from mlflow_sidecar.server.services.model_downloads import ModelDownloads
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc
from mlflow_sidecar.v1 import tracking_pb2_grpc
from tests.fakes.mlflow_port import FakeMlflow
from tests.unit.test_alias_watch import model

HOUR = 3600.0


class Sidecar:
    def __init__(self, tmp_path, fake: FakeMlflow) -> None:
        config = load_config(
            data_dir=tmp_path,
            server={"port": 0, "grace_s": 120.0},
            watch={"poll_interval_s": HOUR, "heartbeat_s": HOUR},
        )
        staging = Staging(config)
        self.metrics = SidecarMetrics()
        self.hub = AliasWatchHub(fake, config.watch, self.metrics)
        registry = RegistryService(fake, staging)
        cache = ModelCache(tmp_path / "models", 0, metrics=self.metrics)
        downloads = ModelDownloads(registry, fake, cache, staging)
        self.server = SidecarServer(
            config,
            tracking_pb2_grpc.ExperimentTrackingServiceServicer(),
            RegistryServicer(registry, staging, downloads, AliasWatchService(self.hub)),
            metrics=self.metrics,
            open_streams=[self.hub],
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.ModelRegistryServiceStub(self.channel)


@pytest.fixture()
def fake() -> FakeMlflow:
    fake = FakeMlflow()
    model(fake)
    fake.set_model_alias("m", "champion", 2)
    return fake


@pytest.fixture()
def sidecar(tmp_path, fake) -> Iterator[Sidecar]:
    sidecar = Sidecar(tmp_path, fake)
    yield sidecar
    sidecar.channel.close()
    sidecar.server.stop(0)


def eventually(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


def test_the_stream_sends_each_alias_then_a_status(sidecar):
    call = sidecar.stub.WatchModelAlias(
        pb.WatchModelAliasRequest(name="m", aliases=["champion", "canary"])
    )
    champion, canary, status = next(call), next(call), next(call)
    assert champion.change.kind == pb.ALIAS_CHANGE_KIND_CURRENT
    assert champion.change.model_version.version == 2
    assert champion.change.model_version.source == "s1"
    assert canary.change.alias == "canary" and not canary.change.HasField("model_version")
    assert status.status.mlflow_reachable and status.status.last_poll_time_ms > 0
    call.cancel()


@pytest.mark.parametrize(
    ("request_fields", "code", "field", "reason"),
    [
        ({"name": "m"}, grpc.StatusCode.INVALID_ARGUMENT, "aliases", "INVALID_ARGUMENT"),
        (
            {"name": "m", "aliases": ["a", "a"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "aliases",
            "INVALID_ARGUMENT",
        ),
        (
            {"name": "m", "aliases": ["latest"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "aliases[0]",
            "RESERVED_ALIAS",
        ),
        (
            {"name": "m", "aliases": [f"a{i}" for i in range(17)]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "aliases",
            "INVALID_ARGUMENT",
        ),
        ({"name": "ghost", "aliases": ["a"]}, grpc.StatusCode.NOT_FOUND, "", "MODEL_NOT_FOUND"),
    ],
)
def test_a_refused_stream_has_the_right_status_and_details(
    sidecar, request_fields, code, field, reason
):
    call = sidecar.stub.WatchModelAlias(pb.WatchModelAliasRequest(**request_fields))
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == code
    error = error_from_rpc(err.value)
    assert (error.field, error.reason) == (field, reason)
    assert sidecar.hub.pollers() == ()


def test_a_client_that_cancels_frees_its_watcher_and_the_poller(sidecar):
    calls = [
        sidecar.stub.WatchModelAlias(pb.WatchModelAliasRequest(name="m", aliases=["champion"]))
        for _ in range(2)
    ]
    for call in calls:
        next(call)
    assert sidecar.hub.pollers() == ("m",)
    streams = sidecar.metrics.alias_watch_streams
    calls[0].cancel()
    eventually(lambda: streams._value.get() == 1)
    assert sidecar.hub.pollers() == ("m",)  # the other stream keeps it
    calls[1].cancel()
    eventually(lambda: sidecar.hub.pollers() == ())


def test_stopping_ends_the_streams_with_shutting_down_before_the_drain(sidecar):
    calls = [
        sidecar.stub.WatchModelAlias(pb.WatchModelAliasRequest(name="m", aliases=["champion"]))
        for _ in range(3)
    ]
    for call in calls:
        next(call), next(call)
    # The grace period is two minutes: a stop that waited for the streams would take it.
    stopping = threading.Thread(target=sidecar.server.stop, kwargs={"grace_s": 120.0})
    stopping.start()
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_from_rpc(err.value).reason == ErrorReason.SHUTTING_DOWN
        status = rpc_status.from_call(err.value)
        assert status is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    stopping.join(60)
    assert not stopping.is_alive(), "the stop waited for the streams"


def test_an_open_watch_counts_in_the_stream_and_watch_gauges_and_leaves_them_at_zero(sidecar):
    registry = sidecar.metrics.registry
    names = (
        "mlflow_sidecar_streams_in_progress",
        "mlflow_sidecar_alias_watch_streams",
        "mlflow_sidecar_alias_watch_pollers",
    )

    def gauges() -> tuple[float | None, ...]:
        return tuple(registry.get_sample_value(name) for name in names)

    assert gauges() == (0, 0, 0)
    call = sidecar.stub.WatchModelAlias(pb.WatchModelAliasRequest(name="m", aliases=["champion"]))
    next(call)
    assert gauges() == (1, 1, 1)
    call.cancel()
    eventually(lambda: gauges() == (0, 0, 0))
