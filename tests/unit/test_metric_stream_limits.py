"""The stream's limits: how long it keeps trying to reach the sidecar, and what `log` does
when its buffer is full (`block` or `raise`); the settings that set them."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from pydantic import ValidationError

from mlflow_sidecar.client import ClientContainer, ClientSettings, load_env
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import ResourceExhaustedError, UnavailableError
from mlflow_sidecar.v1 import tracking_pb2 as pb


class _Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a call to a sidecar that is not there ends with."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _Sidecar:
    """A StreamMetrics that is down for its first `down_calls` calls, or until `up` is set."""

    def __init__(self, down_calls: int = 0, up: threading.Event | None = None) -> None:
        self.down_calls = down_calls
        self.up = up
        self.points: list[int] = []
        self.calls = 0
        # The points of each message, per call that got through.
        self.messages: list[list[int]] = []

    def with_call(self, requests, timeout=None, **kwargs):
        self.calls += 1
        if self.calls <= self.down_calls or (self.up is not None and not self.up.is_set()):
            next(requests, None)  # the call got as far as one message
            raise _Unavailable()
        messages: list[int] = []
        self.messages.append(messages)
        for message in requests:
            messages.append(sum(len(series.steps) for series in message.series))
            for series in message.series:
                self.points.extend(series.steps)
        return pb.StreamMetricsResponse(accepted_points=sum(messages)), None


class _Stub:
    def __init__(self, call: _Sidecar) -> None:
        self.StreamMetrics = call


def test_the_stream_outlasts_an_outage_within_its_reconnect_window() -> None:
    sidecar = _Sidecar(down_calls=4)
    stream = MetricStream(_Stub(sidecar), retry_budget_s=30, max_delay_s=0.01)  # type: ignore[arg-type]
    for step in range(50):
        stream.log("run", "loss", 1.0, step=step, timestamp_ms=5)
    assert stream.close(timeout_s=60) == 50
    assert sorted(set(sidecar.points)) == list(range(50))


def test_past_its_reconnect_window_the_stream_gives_up_with_a_clear_error() -> None:
    sidecar = _Sidecar(up=threading.Event())  # never up
    stream = MetricStream(_Stub(sidecar), retry_budget_s=0.3, max_delay_s=0.01)  # type: ignore[arg-type]
    stream.log("run", "loss", 1.0, step=1, timestamp_ms=5)
    with pytest.raises(UnavailableError) as err:
        stream.flush(timeout_s=60)
    assert err.value.reason == "SIDECAR_UNREACHABLE"
    assert "stream_reconnect_s" in err.value.message
    with pytest.raises(UnavailableError):
        stream.log("run", "loss", 2.0, step=2, timestamp_ms=5)


class _SlowlyUnavailable(_Sidecar):
    """Each call fails only after `seconds`, as gRPC's own retries of an unreachable
    sidecar take a while."""

    def __init__(self, seconds: float) -> None:
        super().__init__(up=threading.Event())
        self.seconds = seconds

    def with_call(self, requests, timeout=None, **kwargs):
        time.sleep(self.seconds)
        return super().with_call(requests, timeout, **kwargs)


def test_the_time_a_failed_call_took_counts_against_the_reconnect_window() -> None:
    # The first call alone outlasts the window: the stream gives up after it, rather
    # than starting the window once the call has failed.
    sidecar = _SlowlyUnavailable(seconds=1.0)
    stream = MetricStream(_Stub(sidecar), retry_budget_s=0.6, max_delay_s=0.01)  # type: ignore[arg-type]
    stream.log("run", "loss", 1.0, step=1, timestamp_ms=5)
    with pytest.raises(UnavailableError):
        stream.flush(timeout_s=60)
    assert sidecar.calls == 1


def test_a_zero_window_gives_up_at_the_first_failed_call() -> None:
    sidecar = _Sidecar(down_calls=1)  # the second call would have worked
    stream = MetricStream(_Stub(sidecar), retry_budget_s=0, max_delay_s=0.01)  # type: ignore[arg-type]
    stream.log("run", "loss", 1.0, step=1, timestamp_ms=5)
    with pytest.raises(UnavailableError):
        stream.flush(timeout_s=60)
    assert sidecar.calls == 1


def test_block_waits_for_room_and_gives_up_with_the_stream() -> None:
    sidecar = _Sidecar(up=threading.Event())
    stream = MetricStream(
        _Stub(sidecar),  # type: ignore[arg-type]
        max_batch_points=5,
        max_buffered_points=10,
        retry_budget_s=1.0,
        max_delay_s=0.01,
    )
    with pytest.raises(UnavailableError) as err:
        for step in range(1_000_000):
            stream.log("run", "loss", 1.0, step=step, timestamp_ms=5)
    assert err.value.reason == "SIDECAR_UNREACHABLE"
    assert step < 100  # it waited at the bound instead of buffering on


def test_a_call_ends_once_it_carries_half_the_buffer_so_a_fast_trainer_is_not_held() -> None:
    # The sidecar acknowledges points when a call ends; a call that ran for its whole
    # window would hold a trainer logging more than the buffer per window in `log` until
    # the window closed (here: ten minutes).
    sidecar = _Sidecar()
    stream = MetricStream(
        _Stub(sidecar),  # type: ignore[arg-type]
        max_batch_points=100,
        max_buffered_points=2_000,
        call_window_s=600,
        max_delay_s=600,
    )
    total = 50_000
    logging_done = threading.Event()

    def trainer() -> None:
        for step in range(total):
            stream.log("run", "loss", 1.0, step=step, timestamp_ms=5)
        logging_done.set()

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    assert logging_done.wait(60), "log() was held until the call window closed"
    assert stream.close(timeout_s=60) == total
    assert sorted(sidecar.points) == list(range(total))
    assert len(sidecar.messages) >= total // 2_000
    # A call takes a next message only while it carries fewer than half the buffer.
    for messages in sidecar.messages:
        assert sum(messages[:-1]) < 1_000, messages


def test_raise_refuses_points_while_full_and_takes_them_again_once_there_is_room() -> None:
    up = threading.Event()
    sidecar = _Sidecar(up=up)
    stream = MetricStream(
        _Stub(sidecar),  # type: ignore[arg-type]
        max_batch_points=5,
        max_buffered_points=10,
        retry_budget_s=600,
        max_delay_s=0.01,
        when_full="raise",
    )
    logged: list[int] = []
    with pytest.raises(ResourceExhaustedError) as err:
        for step in range(1_000):
            stream.log("run", "loss", 1.0, step=step, timestamp_ms=5)
            logged.append(step)
    assert err.value.reason == "CLIENT_BUFFER_FULL"
    assert "stream_buffer_points=10" in err.value.message
    assert 10 <= len(logged) < 20
    up.set()
    deadline = time.monotonic() + 60
    while True:  # the sender makes room once the sidecar is back
        try:
            stream.log("run", "loss", 1.0, step=1_000, timestamp_ms=5)
            break
        except ResourceExhaustedError:
            assert time.monotonic() < deadline, "no room was made"
            time.sleep(0.05)
    logged.append(1_000)
    assert stream.close(timeout_s=60) == len(logged)
    # Every point that log() took arrived; the one it refused did not.
    assert sorted(set(sidecar.points)) == logged


def test_settings_reach_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_STREAM_RECONNECT_S", "600")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_STREAM_BUFFER_POINTS", "1234")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_STREAM_WHEN_FULL", "raise")
    container = ClientContainer()
    load_env(container)
    stream = container.metric_stream()
    assert stream._core._retry_budget_s == 600
    assert stream._core._max_buffered == 1234
    assert stream._core._raise_when_full
    stream.close()
    container.shutdown_resources()
    defaults = ClientSettings()
    assert (defaults.stream_reconnect_s, defaults.stream_buffer_points) == (60.0, 500_000)
    assert defaults.stream_when_full == "block"
    assert ClientSettings(stream_reconnect_s=float("inf")).stream_reconnect_s == float("inf")


@pytest.mark.parametrize(
    ("key", "value"),
    [("stream_reconnect_s", -1), ("stream_buffer_points", 0), ("stream_when_full", "drop")],
)
def test_bad_stream_settings_name_the_setting(key: str, value: object) -> None:
    with pytest.raises(ValidationError, match=key):
        ClientSettings(**{key: value})


@pytest.mark.parametrize(
    "key",
    ["max_attempts", "timeout_s", "chunk_bytes", "stream_buffer_points", "stream_reconnect_s"],
)
def test_a_boolean_is_no_number_for_the_client_either(key: str) -> None:
    with pytest.raises(ValidationError, match="not the boolean true"):
        ClientSettings(**{key: True})
