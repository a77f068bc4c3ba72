"""The client's retries of unary calls: the schedule, gRFC A6 pushback, the message a call
ends with, and, through a real loopback server, a call that waits for a sidecar to come
back within its deadline and one that gives up at its deadline when it does not."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.client.channel import CLIENT_STREAMING_METHODS, SharedChannel
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.client.unary_retry import (
    RetrySchedule,
    pushback_refuses,
    unreachable_details,
)
from mlflow_sidecar.core.errors import ClientErrorReason, FailedPreconditionError
from mlflow_sidecar.v1 import registry_pb2, tracking_pb2
from tests.support.processes import free_port

METHOD = "/mlflow_sidecar.v1.ExperimentTrackingService/GetRun"


def test_the_backoff_doubles_from_a_tenth_of_a_second_up_to_two_seconds():
    schedule = RetrySchedule(max_attempts=5)
    ceilings = [schedule.backoff_s(retry, draw=lambda low, high: high) for retry in range(1, 8)]
    assert ceilings == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert schedule.backoff_s(3, draw=lambda low, high: low) == 0.0  # full jitter


def test_a_call_is_retried_while_it_has_tries_and_time_left():
    schedule = RetrySchedule(max_attempts=3)
    assert schedule.may_retry(1, 5.0)
    assert schedule.may_retry(2, 0.01)
    assert not schedule.may_retry(3, 5.0)
    assert not schedule.may_retry(1, 0.0)


@pytest.mark.parametrize(
    ("metadata", "refused"),
    [
        (None, False),
        ((), False),
        ((("x-other", "-1"),), False),
        ((("grpc-retry-pushback-ms", "-1"),), True),
        ((("grpc-retry-pushback-ms", b"-1"),), True),
        ((("grpc-retry-pushback-ms", "250"),), False),
        ((("grpc-retry-pushback-ms", "soon"),), True),  # gRFC A6: not a number, no retry
    ],
)
def test_a_negative_or_unreadable_pushback_refuses_a_retry(metadata, refused):
    assert pushback_refuses(metadata) is refused


def test_the_message_says_how_long_and_over_how_many_tries():
    assert unreachable_details("127.0.0.1:1", 2.46, 3, "Connection refused") == (
        "the sidecar at 127.0.0.1:1 was unreachable for 2.5 s over 3 tries: Connection refused"
    )
    assert "over 1 try:" in unreachable_details("h:1", 30.0, 1, "x")


def test_grpc_retries_exactly_the_client_streams_of_the_protos():
    declared = {
        (service.full_name, method.name)
        for module in (tracking_pb2, registry_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.client_streaming and not method.server_streaming
    }
    assert set(CLIENT_STREAMING_METHODS) == declared


class _Counting(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.calls = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails):
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


def _serve(port: int, handler: grpc.GenericRpcHandler) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


@pytest.fixture()
def down() -> Iterator[tuple[int, SharedChannel]]:
    """A client channel to a port nothing listens on yet, driven into reconnect backoff."""
    port = free_port()
    channel = SharedChannel(ClientSettings(target=f"127.0.0.1:{port}"))
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            channel.channel.unary_unary(METHOD)(b"", timeout=0.3)
    yield port, channel
    channel.close()


def test_a_call_waits_for_the_sidecar_to_come_back_within_its_deadline(down):
    port, channel = down
    handler = _Counting()
    servers: list[grpc.Server] = []
    later = threading.Timer(2.0, lambda: servers.append(_serve(port, handler)))
    later.start()
    try:
        started = time.monotonic()
        assert channel.channel.unary_unary(METHOD)(b"", timeout=15) == b""
        assert time.monotonic() - started < 6  # the channel reconnects within ~1 s
        assert handler.calls == 1
    finally:
        later.join()
        for server in servers:
            server.stop(0)


def test_a_call_to_a_sidecar_that_stays_down_ends_at_its_deadline_with_unavailable(down):
    _, channel = down
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        channel.channel.unary_unary(METHOD)(b"", timeout=1.5)
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 3
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "was unreachable for 1." in err.value.details()


def test_one_attempt_does_not_wait(down):
    port, _ = down
    channel = SharedChannel(ClientSettings(target=f"127.0.0.1:{port}", max_attempts=1))
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            channel.channel.unary_unary(METHOD)(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2
    finally:
        channel.close()


def test_a_call_of_another_service_is_not_retried(down):
    _, channel = down
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        channel.channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2


def test_closing_the_channel_ends_a_waiting_call_with_client_closed(down):
    _, channel = down
    closer = threading.Timer(0.5, channel.close)
    closer.start()
    started = time.monotonic()
    with pytest.raises(FailedPreconditionError) as err:
        channel.channel.unary_unary(METHOD)(b"", timeout=10)
    closer.join()
    assert err.value.reason == ClientErrorReason.CLIENT_CLOSED
    assert time.monotonic() - started < 3
