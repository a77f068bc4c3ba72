"""The access log and grpc_server_handled_total record what the client saw: a stream the
client cancelled is CANCELLED, not OK."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.interceptors import (
    AccessLogInterceptor,
    ErrorMappingInterceptor,
    _ended_without_a_code,
)
from mlflow_sidecar.server.observability import SidecarMetrics

METHOD = "/test.v1.WatchService/Watch"


class _Codes(logging.Handler):
    """The grpc_code of every access log line, and an event once one arrived."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.codes: list[str] = []
        self.peers: list[str] = []
        self.logged = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.codes.append(getattr(record, "grpc_code", "?"))
        self.peers.append(getattr(record, "peer", "?"))
        self.logged.set()


@pytest.fixture()
def access_log() -> Iterator[_Codes]:
    logger = logging.getLogger("mlflow_sidecar.access")
    handler = _Codes()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _watch(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """Like WatchModelAlias: a first message, then nothing until the client leaves."""
    left = threading.Event()
    context.add_callback(left.set)
    yield b"first"
    left.wait(60)


def _finite(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"one"
    yield b"two"


@pytest.fixture()
def served(access_log: _Codes) -> Iterator[tuple[grpc.Channel, SidecarMetrics]]:
    metrics = SidecarMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AccessLogInterceptor(metrics)],
    )
    handlers: dict[str, Any] = {
        "Watch": grpc.unary_stream_rpc_method_handler(_watch),
        "Finite": grpc.unary_stream_rpc_method_handler(_finite),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.v1.WatchService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    server.stop(0)


def _handled(metrics: SidecarMetrics, method: str, code: str) -> float:
    value = metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "server_stream",
            "grpc_service": "test.v1.WatchService",
            "grpc_method": method,
            "grpc_code": code,
        },
    )
    return value or 0.0


def test_a_stream_the_client_cancels_is_logged_and_counted_as_cancelled(served, access_log):
    channel, metrics = served
    call = channel.unary_stream(METHOD)(b"")
    assert next(call) == b"first"
    call.cancel()
    assert access_log.logged.wait(60), "the cancelled call was never logged"
    assert access_log.codes == ["CANCELLED"]
    assert access_log.peers[0].startswith("ipv4:127.0.0.1:"), access_log.peers
    assert _handled(metrics, "Watch", "CANCELLED") == 1
    assert _handled(metrics, "Watch", "OK") == 0


def test_a_stream_that_ends_is_still_ok(served, access_log):
    channel, metrics = served
    assert list(channel.unary_stream("/test.v1.WatchService/Finite")(b"")) == [b"one", b"two"]
    assert access_log.logged.wait(60)
    assert access_log.codes == ["OK"]
    assert _handled(metrics, "Finite", "OK") == 1


def test_a_stream_whose_deadline_passes_is_deadline_exceeded(served, access_log):
    channel, metrics = served
    call = channel.unary_stream(METHOD)(b"", timeout=1)
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert access_log.logged.wait(60), "the call was never logged"
    assert access_log.codes == ["DEADLINE_EXCEEDED"]
    assert _handled(metrics, "Watch", "DEADLINE_EXCEEDED") == 1
    # Who made the call is known although grpc has ended it.
    (peer,) = access_log.peers
    assert peer.startswith("ipv4:127.0.0.1:"), peer


class _EndedContext:
    """A call grpc has ended, `remaining` seconds before the server's own deadline."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return self.remaining


@pytest.mark.parametrize("remaining", [-0.2, 0.0, 0.05, 0.9])
def test_a_call_ended_just_before_the_servers_deadline_is_deadline_exceeded(remaining):
    # The client's deadline passes first; its cancel arrives while the server's copy of
    # the deadline, started on arrival, is still a little ahead.
    assert _ended_without_a_code(_EndedContext(remaining)) == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("remaining", [5.0, 10.0**9])
def test_a_call_ended_well_before_its_deadline_is_cancelled(remaining):
    assert _ended_without_a_code(_EndedContext(remaining)) == grpc.StatusCode.CANCELLED


# -- with the error mapping inside, as the sidecar chains them ------------------------------


def _short_upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    """Like UploadArtifact: a stream that stops before its trailer is bad input."""
    for _ in requests:
        pass
    # The request stream of a call cut by its deadline can end before grpc marks the call
    # ended; the handler's code is recorded as the client's outcome only from then on.
    for _ in range(6000):
        if not context.is_active():
            break
        threading.Event().wait(0.01)
    raise InvalidArgumentError("trailer", "the upload ended before its trailer")


def _release_then_fail(_request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """Like DownloadArtifact: grpc ending the call releases what the handler is reading."""
    released = threading.Event()
    context.add_callback(released.set)
    yield b"first"
    released.wait(60)
    raise AttributeError("'NoneType' object has no attribute 'close'")


@pytest.fixture()
def mapped(access_log: _Codes) -> Iterator[tuple[grpc.Channel, SidecarMetrics]]:
    metrics = SidecarMetrics()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[AccessLogInterceptor(metrics), ErrorMappingInterceptor(60.0)],
    )
    handlers: dict[str, Any] = {
        "Upload": grpc.stream_unary_rpc_method_handler(_short_upload),
        "Download": grpc.unary_stream_rpc_method_handler(_release_then_fail),
        "Flush": grpc.unary_unary_rpc_method_handler(_waits_within_its_deadline),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.v1.WatchService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, metrics
    server.stop(0)


# Set once `_waits_within_its_deadline` runs.
started = threading.Event()


def _waits_within_its_deadline(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    """Like FlushMetrics: waits for something that does not come, within the call's
    deadline (a long one)."""
    started.set()
    until = time.monotonic() + 600
    while not call_deadline.expired() and time.monotonic() < until:
        time.sleep(0.05)
    return b"done"


def test_a_call_its_client_cancels_stops_waiting_and_is_logged_at_once(mapped, access_log):
    # The client left: what the call waits for can reach no one, and its worker thread,
    # access line and CANCELLED count are not held until its wait would have ended.
    channel, _ = mapped
    started.clear()
    call = channel.unary_unary("/test.v1.WatchService/Flush").future(b"", timeout=600)
    assert started.wait(30)
    call.cancel()
    assert access_log.logged.wait(30), "the cancelled call was not logged while it waited"
    assert access_log.codes == ["CANCELLED"]


def _stalled() -> Iterator[bytes]:
    yield b"chunk"
    threading.Event().wait(30)  # the client stalls mid-upload


def test_an_upload_cut_by_its_deadline_is_deadline_exceeded_not_the_handlers_code(
    mapped, access_log
):
    channel, metrics = mapped
    with pytest.raises(grpc.RpcError) as ended:
        channel.stream_unary("/test.v1.WatchService/Upload")(_stalled(), timeout=0.5)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert access_log.logged.wait(60), "the call was never logged"
    assert access_log.codes == ["DEADLINE_EXCEEDED"]
    value = metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "client_stream",
            "grpc_service": "test.v1.WatchService",
            "grpc_method": "Upload",
            "grpc_code": "DEADLINE_EXCEEDED",
        },
    )
    assert value == 1


def test_a_failure_caused_by_the_call_ending_is_no_internal_error(mapped, access_log, caplog):
    channel, metrics = mapped
    call = channel.unary_stream("/test.v1.WatchService/Download")(b"", timeout=60)
    assert next(call) == b"first"
    call.cancel()
    assert access_log.logged.wait(60), "the call was never logged"
    assert access_log.codes == ["CANCELLED"]
    assert _handled(metrics, "Download", "INTERNAL") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
