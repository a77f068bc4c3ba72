"""Clients' keepalive pings at the interval the README's Limits table accepts keep their
connections and calls, also while a call sends nothing (a trainer between epochs, an
inference server whose watch sees no change)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.grpc_server import KEEPALIVE_MIN_PING_INTERVAL_MS, SidecarServer
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2, tracking_pb2_grpc

# Long enough for grpc's default rule (a ping at most every 5 minutes, GOAWAY at the third
# early one) to end the call several times over.
IDLE_S = 60


class _CountingTracking(tracking_pb2_grpc.ExperimentTrackingServiceServicer):
    def StreamMetrics(self, request_iterator, context):
        accepted = sum(len(message.points) for message in request_iterator)
        return tracking_pb2.StreamMetricsResponse(accepted_points=accepted)


def test_a_call_idle_between_pings_every_ten_seconds_keeps_its_connection(tmp_path) -> None:
    config = load_config(data_dir=tmp_path, server={"port": 0})
    server = SidecarServer(
        config, _CountingTracking(), registry_pb2_grpc.ModelRegistryServiceServicer()
    )
    server.start()
    pinging = [
        ("grpc.keepalive_time_ms", KEEPALIVE_MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    outbox: queue.Queue[tracking_pb2.StreamMetricsRequest | None] = queue.Queue()

    def requests() -> Iterator[tracking_pb2.StreamMetricsRequest]:
        while (message := outbox.get()) is not None:
            yield message

    point = tracking_pb2.MetricPoint(run_id="a" * 32, key="loss", value=1.0, step=1)
    try:
        with grpc.insecure_channel(server.address, options=pinging) as channel:
            stub = tracking_pb2_grpc.ExperimentTrackingServiceStub(channel)
            call = stub.StreamMetrics.future(requests(), timeout=IDLE_S + 60)
            outbox.put(tracking_pb2.StreamMetricsRequest(points=[point]))
            ended = threading.Event()
            call.add_done_callback(lambda _: ended.set())
            assert not ended.wait(IDLE_S), f"the idle call ended: {call.exception()!r}"
            outbox.put(tracking_pb2.StreamMetricsRequest(points=[point]))
            outbox.put(None)
            assert call.result(timeout=30).accepted_points == 2
    finally:
        outbox.put(None)
        server.stop()
