"""`MetricStream`: batches points from a training loop onto StreamMetrics calls.

    with container.metric_stream() as stream:
        for step in range(steps):
            stream.log_metrics(run_id, {"reward": r, "loss": l}, step=step)
    # on exit every point is in the sidecar's durable spool

`log` never waits for MLflow: points are buffered, cut into messages by count and by
age, and sent on a background thread. Each call carries messages for a short window;
a window that fails with UNAVAILABLE is sent again (points carry their timestamps, so
a resend is an exact duplicate that MLflow ignores). While the spool is full
(RESOURCE_EXHAUSTED) the stream backs off and `log` blocks once its buffer is full:
backpressure reaches the trainer instead of points being dropped.
"""

from __future__ import annotations

import collections
import operator
import threading
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from mlflow_sidecar.client.conversions import ACCEPTED_POINTS_METADATA
from mlflow_sidecar.client.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    SidecarError,
    error_from_rpc,
    error_from_status,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _checked_point(
    run_id: Any, key: Any, value: Any, timestamp_ms: Any, step: Any
) -> tuple[str, str, float, int, int]:
    """The point as protobuf will take it, or TypeError naming what it would not take.

    Numbers of other types (numpy's, say) are converted, as protobuf converts them."""
    for name, text in (("run_id", run_id), ("key", key)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, not {type(text).__name__}")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"metric {key!r}: value must be a number, not {type(value).__name__}")
    return (
        run_id,
        key,
        float(value),
        operator.index(timestamp_ms) or _now_ms(),
        operator.index(step),
    )


class MetricStream:
    """Streams metric points of any runs to the sidecar's spool from a background thread."""

    def __init__(
        self,
        stub: pb_grpc.ExperimentTrackingServiceStub,
        *,
        max_batch_points: int = 1000,
        max_delay_s: float = 0.2,
        call_window_s: float = 2.0,
        max_buffered_points: int = 500_000,
        retry_budget_s: float = 60.0,
    ) -> None:
        self._stub = stub
        self._max_batch = max_batch_points
        self._max_delay_s = max_delay_s
        self._window_s = call_window_s
        self._max_buffered = max_buffered_points
        self._retry_budget_s = retry_budget_s
        self._cond = threading.Condition()
        self._buffer: list[tuple[str, str, float, int, int]] = []
        self._buffer_since = 0.0
        self._queue: collections.deque[pb.StreamMetricsRequest] = collections.deque()
        self._queued_points = 0
        self._in_flight: list[pb.StreamMetricsRequest] = []
        self._accepted = 0
        self._error: SidecarError | None = None
        self._closing = False
        # Set by flush(): end the open call as soon as the queue is empty.
        self._flushing = False
        self._thread = threading.Thread(target=self._send_loop, name="metric-stream", daemon=True)
        self._thread.start()

    # -- the trainer's side ------------------------------------------------------------

    @property
    def accepted(self) -> int:
        """Points the sidecar has committed to its spool so far."""
        with self._cond:
            return self._accepted

    def log(
        self, run_id: str, key: str, value: float, *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """Buffer one point; blocks only while the buffer is full (backpressure).

        Raises TypeError at once for a point of the wrong types."""
        # The hot path of a training loop: the point waits as a tuple and its protobuf
        # message is built with its batch's, so its types are checked here, cheaply.
        if (
            type(value) is float
            and type(step) is int
            and type(timestamp_ms) is int
            and type(run_id) is str
            and type(key) is str
        ):
            point = (run_id, key, value, timestamp_ms or _now_ms(), step)
        else:
            point = _checked_point(run_id, key, value, timestamp_ms, step)
        with self._cond:
            if self._error is not None or self._buffered() >= self._max_buffered:
                self._wait_for_room()
            buffer = self._buffer
            if not buffer:
                self._buffer_since = time.monotonic()
            buffer.append(point)
            if len(buffer) >= self._max_batch:
                self._cut()

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """Buffer one point per metric, all with the same step and timestamp."""
        stamp = timestamp_ms or _now_ms()
        for key, value in metrics.items():
            self.log(run_id, key, value, step=step, timestamp_ms=stamp)

    def flush(self, timeout_s: float | None = None) -> int:
        """Send everything buffered and wait until the sidecar accepted it; returns the total
        accepted so far. Raises the stream's error, or DeadlineExceededError on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._cut()
            self._flushing = True
            self._cond.notify_all()
            try:
                while (self._queue or self._in_flight) and self._error is None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DeadlineExceededError(f"{self._buffered()} points not yet accepted")
                    self._cond.wait(0.1 if left is None else min(left, 0.1))
            finally:
                self._flushing = False
            self._raise_if_failed()
            return self._accepted

    def close(self, timeout_s: float | None = None) -> int:
        """Flush, then stop the background thread; returns the points accepted in total."""
        try:
            return self.flush(timeout_s)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(5)

    def __enter__(self) -> MetricStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals (callers hold self._cond) -------------------------------------------

    def _buffered(self) -> int:
        return len(self._buffer) + self._queued_points

    def _wait_for_room(self) -> None:
        self._raise_if_failed()
        while self._buffered() >= self._max_buffered and self._error is None:
            self._cond.wait(0.1)
        self._raise_if_failed()

    def _cut(self) -> None:
        if self._buffer:
            message = pb.StreamMetricsRequest()
            # Filling the repeated field in place: half the cost of building each point
            # as a message of its own and copying it in.
            add = message.points.add
            for r, k, v, t, s in self._buffer:
                add(run_id=r, key=k, value=v, timestamp_ms=t, step=s)
            self._queue.append(message)
            self._queued_points += len(self._buffer)
            self._buffer = []

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the background thread ----------------------------------------------------------

    def _send_loop(self) -> None:
        failing_since: float | None = None
        delay = 0.05
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    if self._buffer and time.monotonic() - self._buffer_since >= self._max_delay_s:
                        self._cut()
                        break
                    self._cond.wait(self._max_delay_s / 2)
                if self._closing and not self._queue:
                    return
            code = self._send_window()
            if self._error is not None:
                return
            if code is None:
                failing_since, delay = None, 0.05
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > self._retry_budget_s:
                with self._cond:
                    self._error = _exhausted_retries(code, self._retry_budget_s)
                    self._cond.notify_all()
                return
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _requests(self) -> Iterator[pb.StreamMetricsRequest]:
        started = time.monotonic()
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    if self._flushing or time.monotonic() - started >= self._window_s:
                        return
                    if self._buffer and time.monotonic() - self._buffer_since >= self._max_delay_s:
                        self._cut()
                        continue
                    self._cond.wait(0.02)
                if not self._queue:
                    return
                message = self._queue.popleft()
                self._queued_points -= len(message.points)
                self._in_flight.append(message)
            yield message

    def _send_window(self) -> grpc.StatusCode | None:
        """One call; None on success, else the retryable status code that ended it."""
        try:
            reply, _call = self._stub.StreamMetrics.with_call(self._requests())
        except grpc.RpcError as exc:
            return self._settle_failure(exc)
        with self._cond:
            self._accepted += reply.accepted_points
            self._in_flight.clear()
            self._cond.notify_all()
        return None

    def _settle_failure(self, exc: grpc.RpcError) -> grpc.StatusCode | None:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        accepted = _accepted_from_trailers(exc)
        with self._cond:
            # Messages are committed whole and in order: drop those the sidecar accepted.
            done = 0
            while self._in_flight and done + len(self._in_flight[0].points) <= accepted:
                done += len(self._in_flight.pop(0).points)
            self._accepted += done
            if code in _RETRYABLE:
                for message in reversed(self._in_flight):
                    self._queue.appendleft(message)
                    self._queued_points += len(message.points)
                self._in_flight.clear()
                self._cond.notify_all()
                return code
            self._error = error_from_rpc(exc)
            self._in_flight.clear()
            self._cond.notify_all()
            return None


def _accepted_from_trailers(exc: grpc.RpcError) -> int:
    if not isinstance(exc, grpc.Call):
        return 0
    for key, value in exc.trailing_metadata() or ():
        if key == ACCEPTED_POINTS_METADATA:
            return int(value)
    return 0


def _exhausted_retries(code: grpc.StatusCode, budget_s: float) -> SidecarError:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(f"the sidecar's spool stayed full for {budget_s:.0f}s")
    return error_from_status(code, f"the sidecar stayed {code.name} for {budget_s:.0f}s")
