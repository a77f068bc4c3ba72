"""A metric stream whose sidecar answers nothing gives up after `stream_reconnect_s`, as one
that cannot be reached does: an address that accepts connections but never speaks gRPC
(a hung sidecar, a black-hole proxy), or a sidecar that takes a call and never answers it.
Without a deadline on its calls, `close()` waited for the connect timeout (about 20 s) in
the first case and forever in the second, whatever `stream_reconnect_s` said."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import SidecarError, UnavailableError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

RECONNECT_S = 1.5
# Generous: a stream gives up a few seconds after RECONNECT_S (its call window and the
# time its points may take come first); what matters is that it does, with this error.
BOUND_S = 10 * RECONNECT_S


@pytest.fixture()
def black_hole() -> Iterator[str]:
    """A TCP listener that accepts connections and never reads or writes a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(10)
    listener.close()
    for connection in accepted:
        connection.close()


class _Silent(pb_grpc.ExperimentTrackingServiceServicer):
    """Reads a StreamMetrics call's messages, then never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def StreamMetrics(self, request_iterator, context):
        for _ in request_iterator:
            pass
        self.release.wait(60)
        return pb.StreamMetricsResponse()


@pytest.fixture()
def silent_sidecar() -> Iterator[str]:
    servicer = _Silent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(0)


def _close_fails_with(target: str) -> BaseException | None:
    container = ClientContainer()
    container.config.from_dict(
        {"target": target, "stream_reconnect_s": RECONNECT_S, "stream_buffer_points": 2000}
    )
    stream = container.metric_stream()
    for step in range(10):
        stream.log("r" * 32, "loss", 1.0, step=step, timestamp_ms=5)
    outcome: list[BaseException | None] = []

    def close() -> None:
        try:
            stream.close()
            outcome.append(None)
        except SidecarError as exc:
            outcome.append(exc)

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(BOUND_S)
    try:
        assert outcome, f"close() still waits after {BOUND_S}s (stream_reconnect_s={RECONNECT_S})"
        return outcome[0]
    finally:
        container.shutdown_resources()


def _assert_unreachable(error: BaseException | None) -> None:
    assert isinstance(error, UnavailableError), error
    assert error.reason == "SIDECAR_UNREACHABLE"
    assert f"stream_reconnect_s ({RECONNECT_S:g}s)" in error.message


def test_close_gives_up_on_an_address_that_never_answers(black_hole: str) -> None:
    _assert_unreachable(_close_fails_with(black_hole))


def test_close_gives_up_on_a_sidecar_that_takes_a_call_and_never_answers(
    silent_sidecar: str,
) -> None:
    _assert_unreachable(_close_fails_with(silent_sidecar))
