"""gRFC A6 server pushback, as the client's channel applies it to its retries.

The sidecar answers UNAVAILABLE with `grpc-retry-pushback-ms: -1` once it has spent its
own MLflow retries; the typed client's channel retries UNAVAILABLE. These tests count the
attempts that reach a real server through the client's own channel (`SharedChannel`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.client.channel import SharedChannel
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.core.errors import ErrorReason, UnavailableError
from mlflow_sidecar.server.interceptors import ErrorMappingInterceptor

# A method of a service the client's retry policy names.
METHOD = "/mlflow_sidecar.v1.ExperimentTrackingService/GetRun"
MAX_ATTEMPTS = 5


class _Counting(grpc.GenericRpcHandler):
    """Answers every call UNAVAILABLE, with or without pushback, and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.pushback: str | None = None
        self._lock = threading.Lock()

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls += 1
            if self.pushback is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", self.pushback),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "try elsewhere")

        return grpc.unary_unary_rpc_method_handler(answer)


@pytest.fixture()
def counting() -> Iterator[tuple[_Counting, grpc.Channel]]:
    handler = _Counting()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = _client_channel(port)
    yield handler, channel.channel
    channel.close()
    server.stop(0)


def _client_channel(port: int) -> SharedChannel:
    return SharedChannel(ClientSettings(target=f"127.0.0.1:{port}", max_attempts=MAX_ATTEMPTS))


def _call(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(METHOD)(b"", timeout=30)
    return err.value


def test_without_pushback_the_client_retries_unavailable(counting):
    handler, channel = counting
    assert _call(channel).code() == grpc.StatusCode.UNAVAILABLE
    assert handler.calls == MAX_ATTEMPTS


def test_a_negative_pushback_stops_the_client_retrying(counting):
    handler, channel = counting
    handler.pushback = "-1"
    assert _call(channel).code() == grpc.StatusCode.UNAVAILABLE
    assert handler.calls == 1


def test_the_sidecars_unavailable_is_tried_once(tmp_path):
    """The error mapping's UNAVAILABLE, end to end through the client's channel options."""
    calls = 0

    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        nonlocal calls
        calls += 1
        raise UnavailableError("MLflow is unavailable", reason=ErrorReason.MLFLOW_UNAVAILABLE)

    class Handler(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            return grpc.unary_unary_rpc_method_handler(answer)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=[Handler()],
        interceptors=[ErrorMappingInterceptor()],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = _client_channel(port)
        try:
            assert _call(channel.channel).code() == grpc.StatusCode.UNAVAILABLE
        finally:
            channel.close()
    finally:
        server.stop(0)
    assert calls == 1
