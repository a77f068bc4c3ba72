"""`MetricStream`: batches points from a training loop onto StreamMetrics calls.

    with container.metric_stream() as stream:
        for step in range(steps):
            stream.log_metrics(run_id, {"reward": r, "loss": l}, step=step)
    # on exit every point is in the sidecar's durable spool

`log` never waits for MLflow: points are buffered per run and key and sent on a
background thread, which cuts them into messages (packed `series`) once a batch is due,
by count or by age. A sender that fell behind the trainer takes everything buffered
(up to `max_message_bytes`) into its next message, so a trainer that logs faster than
messages travel gets fewer, larger messages instead of a queue of small ones. A message
carries timestamps and steps as fixed-width integers, copied out of the buffers as they
lie, once the sidecar said it reads them (the initial metadata of each StreamMetrics call);
until then, and to a sidecar that does not say so, as varints, which cost the sender a
Python int per number. The stream's first call ends after one message, so that the
answer comes before the bulk of the points is cut. Each call
carries messages for a short window, or until it carries half of `max_buffered_points`
(the sidecar says what it accepted when a call ends, and until then its points hold room
in the buffer); a window that fails with UNAVAILABLE is sent again
(points carry their timestamps, so a resend is an exact duplicate that MLflow ignores).
While the spool is full, or the sidecar serves as many streaming calls as it admits
(RESOURCE_EXHAUSTED, reasons SPOOL_FULL and TOO_MANY_STREAMS), the stream keeps the refused
points, backs off and `log` blocks once its buffer is full: backpressure reaches the
trainer instead of points being dropped; refusals that outlast `retry_budget_s` fail the
stream with the sidecar's reason. A message of more points than the sidecar's whole spool
(TOO_MANY_POINTS) is cut again to the limit the refusal names, which the sidecar also
announces at the start of every call (`max-message-points`), and later cuts keep to it.
Points of a run ended through the sidecar (RUN_ENDED: another process ended it, say) are
dropped, that run's later points are refused at once, the next flush reports the drop
once, and the stream goes on for its other runs.
While the sidecar cannot be reached (it restarts, say) the stream keeps trying for
`retry_budget_s` (the `stream_reconnect_s` setting) and then fails with UnavailableError
(reason SIDECAR_UNREACHABLE). A sidecar that still holds the connection but answers
nothing (stopped, hung, or an address that accepts connections and never speaks gRPC)
counts as unreachable too: every call has a deadline, its window and the time its points
take at the slowest pace a working sidecar commits them, plus `retry_budget_s`. With
`when_full="raise"`, a `log` that finds the buffer full raises ResourceExhaustedError
(reason CLIENT_BUFFER_FULL) instead of waiting and keeps nothing of its call.

A stream belongs to the process that made it: in a forked child (os.fork, multiprocessing's
`fork` start method) its `log` and `flush` raise FailedPreconditionError (reason
STREAM_USED_AFTER_FORK) instead of hanging on a lock or a thread the child does not have.

`log` takes no lock, because a lock is a third of what it costs, and never builds a
message: that is the sender's work. It is still safe from any number of threads: a
point is packed by `struct` (whose checks of its numbers' types and ranges cost less
than Python's) and goes into its run and key's `bytearray` with one `+=`, which is
atomic, and a cut takes a prefix of each buffer (`row[:n]`, then `del row[:n]`), so a
point added meanwhile stays for the next cut instead of being lost. Buffers are kept for the life
of the stream: each cut visits every run and key the stream has seen, so a stream should
span one job's runs, not an unbounded stream of them.

`close` ends with a last cut that seals every buffer first (a `memoryview` of a
`bytearray` forbids resizing it), then takes all of each: a `log` that found its buffer
before the close either added its point before the seal, and the last cut sends it, or
fails to add it and raises FailedPreconditionError (reason CLIENT_CLOSED). No point is
lost between the two.

A stream dropped without `close` is collected like any object: its thread holds only the
stream's core (`_StreamCore`), and the stream's finalizer tells the core to close itself,
which its sender does with the same last cut, then ends.
"""

from __future__ import annotations

import collections
import logging
import math
import operator
import os
import re
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, NoReturn

import grpc

from mlflow_sidecar.core import names
from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.conversions import (
    ACCEPTED_POINTS_METADATA,
    MAX_MESSAGE_POINTS_METADATA,
    SERIES_COLUMNS_FIXED,
    SERIES_COLUMNS_METADATA,
)
from mlflow_sidecar.core.errors import (
    ClientErrorReason,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    SidecarError,
    UnavailableError,
    error_from_rpc,
    error_from_status,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

# DEADLINE_EXCEEDED is the stream's own deadline of a call (see `_call_timeout_s`).
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
RUN_ENDED = ErrorReason.RUN_ENDED

_log = logging.getLogger(__name__)


_INT64_MAX = 2**63 - 1

DEFAULT_BATCH_POINTS = 1000
"""Buffered points that make a batch due unless a stream is given `max_batch_points`:
about 20 KiB."""

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""The largest message a stream sends unless it is given `max_message_bytes`."""

DEFAULT_RECONNECT_S = 60.0
"""How long a stream keeps trying to reach the sidecar unless given `retry_budget_s`."""

SLOWEST_POINTS_PER_S = 100_000
"""The slowest pace, in points per second, at which a sidecar that still works commits a
stream's points (a sidecar commits over a million a second): a call's deadline allows its
points this long, so a busy sidecar is not taken for a hung one."""

DEFAULT_MAX_BUFFERED_POINTS = 500_000
"""The most points a stream holds until the sidecar accepted them (about 12 MiB), unless
it is given `max_buffered_points`."""

CLIENT_BUFFER_FULL = ClientErrorReason.CLIENT_BUFFER_FULL
"""Reason of the error `log` raises on a full buffer with `when_full="raise"`."""

SIDECAR_UNREACHABLE = ClientErrorReason.SIDECAR_UNREACHABLE
"""Reason of the error a stream fails with once the sidecar stayed unreachable too long."""

STREAM_USED_AFTER_FORK = ClientErrorReason.STREAM_USED_AFTER_FORK
"""Reason of the error a stream raises in a forked child of the process that made it."""

# The longest an idle sender waits before it looks again whether its stream was dropped:
# `abandon` cannot wake it (see there).
_ABANDON_CHECK_S = 0.5

# Reason of the error `log` and `flush` raise on a closed stream (as a closed channel's).
_CLIENT_CLOSED = ClientErrorReason.CLIENT_CLOSED

MAX_POINT_BYTES = 8 + 10 + 10
"""The most a point of a series takes on the wire (a double and two varints): a message
is sized before it is built."""

# The same for a series, its run id and key aside (tags and lengths).
_SERIES_BYTES = 32

# A point as a row holds it: value, timestamp_ms and step, in the byte order that
# `memoryview.cast` reads.
_POINT = struct.Struct("=dqq")
_pack_point = _POINT.pack
# One run's points of one key until the next cut, packed one after the other.
_Row = bytearray
# What a cut took from a row and has yet to put into messages: its run and key, the
# packed points, and how many they are.
_Pending = tuple[tuple[str, str], memoryview, int]


# A packed `repeated double` or `repeated sfixed64` on the wire is a tag, a length and the
# numbers' bytes, little-endian: on such a machine a row's columns go in as they lie,
# merged by protobuf in C, without a Python number each (a varint column costs a Python
# int per number, most of what the sender spends on a point).
_VALUES_TAG = bytes([pb.MetricSeries.VALUES_FIELD_NUMBER << 3 | 2])
_FIXED_STAMPS_TAG = bytes([pb.MetricSeries.FIXED_TIMESTAMPS_MS_FIELD_NUMBER << 3 | 2])
_FIXED_STEPS_TAG = bytes([pb.MetricSeries.FIXED_STEPS_FIELD_NUMBER << 3 | 2])
_NUMBERS_AS_ON_THE_WIRE = sys.byteorder == "little"


def _packed_field(tag: bytes, column: memoryview[Any]) -> bytes:
    """A packed field of fixed-width numbers: tag, varint length, the column's bytes."""
    data = column.tobytes()
    length, size = bytearray(), len(data)
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return tag + length + data


def _add_columns(series: pb.MetricSeries, points: memoryview, *, fixed: bool) -> None:
    """Add packed points (`_POINT` each) to `series`: timestamps and steps as fixed-width
    integers when `fixed` (the sidecar said it reads them), else as varints."""
    integers = points.cast("q")
    if not _NUMBERS_AS_ON_THE_WIRE:
        series.values.extend(points.cast("d")[0::3])
        series.timestamps_ms.extend(integers[1::3])
        series.steps.extend(integers[2::3])
        return
    values = _packed_field(_VALUES_TAG, points.cast("d")[0::3])
    if not fixed:
        series.timestamps_ms.extend(integers[1::3])
        series.steps.extend(integers[2::3])
        series.MergeFromString(values)
        return
    series.MergeFromString(
        b"".join(
            (
                values,
                _packed_field(_FIXED_STAMPS_TAG, integers[1::3]),
                _packed_field(_FIXED_STEPS_TAG, integers[2::3]),
            )
        )
    )


def _stamp_for(key: str, timestamp_ms: Any) -> int:
    """The timestamp of a point logged with a `timestamp_ms` not above 0: now for 0, else
    the error `checked_numbers` gives."""
    checked_numbers(key, 0.0, timestamp_ms, 0)
    return now_ms()


def checked_numbers(key: str, value: Any, timestamp_ms: Any, step: Any) -> tuple[float, int, int]:
    """A point's numbers as protobuf will take them, or the TypeError or ValueError
    that names what the sidecar would refuse: the check `log` makes of a point, for a
    caller that must check several points before it logs any of them.

    Numbers of other types (numpy's, say) are converted, as protobuf converts them."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"metric {key!r}: value must be a number, not {type(value).__name__}")
    stamp, number = operator.index(timestamp_ms), operator.index(step)
    if not 0 <= stamp <= _INT64_MAX:
        raise ValueError(f"metric {key!r}: timestamp_ms must be in [0, 2**63), got {stamp}")
    if not -_INT64_MAX - 1 <= number <= _INT64_MAX:
        raise ValueError(f"metric {key!r}: step must fit in 64 bits, got {number}")
    try:
        return float(value), stamp, number
    except OverflowError:
        raise ValueError(
            f"metric {key!r}: value is too large for a float (at most about 1.8e308)"
        ) from None


def _fresh(error: SidecarError) -> SidecarError:
    """A copy of `error` to raise, without its traceback.

    The stream keeps its error and raises it on every later `log`, perhaps millions of
    times: raising the one object each time added every raise's frames to its traceback,
    which kept them all alive (hundreds of MB for a trainer that catches and goes on)."""
    kind = type(error)
    copy = kind.__new__(kind, *error.args)
    copy.__dict__.update(error.__dict__)
    copy.metadata = dict(error.metadata)
    return copy


def _closed_error() -> FailedPreconditionError:
    return FailedPreconditionError("the metric stream is closed", reason=_CLIENT_CLOSED)


class _Refusing(dict[str, dict[str, _Row]]):
    """The buffers of a stream that failed, was closed or is full: a lookup raises why."""

    def __init__(self, error: SidecarError) -> None:
        super().__init__()
        self.error = error

    def __getitem__(self, key: object) -> NoReturn:
        raise _fresh(self.error)

    def setdefault(self, key: object, default: object = None) -> NoReturn:
        raise _fresh(self.error)


# Every live stream, so that a forked child can disarm its copies (see _after_fork).
_STREAMS: weakref.WeakSet[_StreamCore] = weakref.WeakSet()


class _StreamCore:
    """All of a `MetricStream` but the object its caller holds: its buffers, its calls and
    its sender thread. The thread holds this, never the `MetricStream`, so that a stream
    dropped without `close()` can be collected, and its finalizer `abandon`s this."""

    def __init__(
        self,
        stub: pb_grpc.ExperimentTrackingServiceStub,
        *,
        max_batch_points: int = DEFAULT_BATCH_POINTS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_delay_s: float = 0.2,
        call_window_s: float = 2.0,
        max_buffered_points: int = DEFAULT_MAX_BUFFERED_POINTS,
        retry_budget_s: float = DEFAULT_RECONNECT_S,
        when_full: Literal["block", "raise"] = "block",
    ) -> None:
        if when_full not in ("block", "raise"):
            raise ValueError(f"when_full must be 'block' or 'raise', not {when_full!r}")
        self._stub = stub
        self._max_batch = max_batch_points
        # Enough for one point of the longest run id and key, whatever the caller asked.
        self._max_message_bytes = max(max_message_bytes, 2048)
        self._max_delay_s = max_delay_s
        self._window_s = call_window_s
        self._max_buffered = max_buffered_points
        # A call ends once it carries this many points, so that the sidecar's answer
        # frees their room in the buffer while the trainer can still fill the rest.
        self._acknowledge_at = max(1, max_buffered_points // 2)
        self._retry_budget_s = retry_budget_s
        self._raise_when_full = when_full == "raise"
        self._pid = os.getpid()
        # Guards everything but the pending rows (see the module docstring).
        self._cond = threading.Condition(threading.Lock())
        # One cut at a time (the sender's, or a flush's); taken before self._cond.
        self._cut_lock = threading.Lock()
        # Rows by run id, then key.
        self._rows: dict[str, dict[str, _Row]] = {}
        # What log() looks rows up in: the rows, or while it must not add any (the stream
        # failed, was closed, or its buffer is full with when_full="raise") a _Refusing.
        self._pending: dict[str, dict[str, _Row]] = self._rows
        # Points logged since the last cut. Concurrent callers may lose an increment,
        # which only delays a count cut; the age cut does not depend on it.
        self._count = 0
        # The count at which log() tells the sender again that a batch is due.
        self._signal_at = max_batch_points
        self._last_cut = time.monotonic()
        # Set by close()'s last cut, with views that keep the rows it took from growing.
        self._sealed = False
        self._seals: list[memoryview] = []
        # Cut messages with their point counts, oldest first.
        self._queue: collections.deque[tuple[pb.StreamMetricsRequest, int]] = collections.deque()
        self._queued_points = 0
        self._in_flight: list[tuple[pb.StreamMetricsRequest, int]] = []
        self._accepted = 0
        self._error: SidecarError | None = None
        # The sidecar's RetryInfo of the last retryable failure (a full spool says when).
        self._retry_after_s = 0.0
        # The sidecar's answer to the last retryable failure: what the stream fails with
        # once they outlast the retry budget (a full spool, a stream limit).
        self._last_refusal: SidecarError | None = None
        self._closing = False
        # Set by flush(): end the open call as soon as the queue is empty.
        self._flushing = False
        # The number of the call whose requests may take queued messages. gRPC's thread
        # that reads a call's requests may ask for one more after the call has ended; a
        # message it took then would sit in flight where no call sends it, so an ended
        # call's number is retired, under self._cond, before its messages are settled.
        self._call = 0
        # Whether the sidecar reads fixed-width timestamps and steps, as the last call that
        # succeeded said at its start; None until one has. Until then messages carry
        # varints, which every sidecar reads, and a call ends after one message, so that
        # the bulk of the points is cut in the form the sidecar reads best.
        self._fixed_columns: bool | None = None
        # The most points the sidecar takes in one message (its spool's size), as its
        # last call said at the start or its refusal of a larger message; None: no limit
        # known.
        self._max_message_points: int | None = None
        # Runs the sidecar refused points of for good (ended through it, RUN_ENDED): log()
        # raises the refusal for them, and their points are dropped from what is unsent.
        self._ended_runs: dict[str, SidecarError] = {}
        # What flush() reports, once each: the points such a refusal dropped.
        self._unreported: list[SidecarError] = []
        # Set, without a lock, by the finalizer of a MetricStream dropped unclosed: the
        # sender closes the stream itself (see `abandon`).
        self._abandoned = False
        self._thread = threading.Thread(target=self._send, name="metric-stream", daemon=True)
        self._thread.start()
        _STREAMS.add(self)

    # -- the trainer's side ------------------------------------------------------------

    @property
    def accepted(self) -> int:
        """The work of `MetricStream.accepted`."""
        with self._cond:
            return self._accepted

    def log(
        self, run_id: str, key: str, value: float, *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """The work of `MetricStream.log`."""
        # The hot path of a training loop: two lookups and one append of the point
        # packed by `struct`, which also checks its numbers' types and ranges in C.
        try:
            # Raises the stream's error once it failed or was closed (see `_fail`).
            row = self._pending[run_id][key]
        except (KeyError, TypeError):  # a new run or key, or not a str at all
            row = self._open_row(run_id, key)
        try:
            stamp = timestamp_ms if timestamp_ms > 0 else _stamp_for(key, timestamp_ms)
            row += _pack_point(value, stamp, step)
        except (TypeError, struct.error, OverflowError):
            value, stamp, step = checked_numbers(key, value, timestamp_ms, step)
            self._add(row, _pack_point(value, stamp or now_ms(), step))
        except BufferError:  # the row was sealed by close() after this call found it
            raise _closed_error() from None
        count = self._count = self._count + 1
        if count >= self._signal_at:
            self._batch_due()

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """The work of `MetricStream.log_metrics`."""
        stamp = timestamp_ms or now_ms()
        for key, value in metrics.items():
            self.log(run_id, key, value, step=step, timestamp_ms=stamp)

    def flush(self, timeout_s: float | None = None, *, report_dropped: bool = True) -> int:
        """The work of `MetricStream.flush`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._cut_whole()
        with self._cond:
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
            if self._unreported and report_dropped:
                reports, self._unreported = self._unreported, []
                raise _one_report(reports)
            return self._accepted

    def close(self, timeout_s: float | None = None) -> int:
        """The work of `MetricStream.close`."""
        with self._cond:
            if self._closing:
                return self._accepted
        try:
            self._cut_whole(last=True)
            return self.flush(timeout_s)
        finally:
            with self._cond:
                self._closing = True
                if self._error is None:
                    self._fail(_closed_error())
                self._cond.notify_all()
            self._thread.join(5)

    def resumed(self, run_id: str) -> None:
        """The work of `MetricStream.resumed`."""
        with self._cond:
            self._ended_runs.pop(run_id, None)

    def abandon(self) -> None:
        """Close the stream in the background, its `MetricStream` dropped unclosed: the
        sender makes the last cut, sends what the stream holds as `close()` would, and ends.

        Called by a finalizer, which may run in any thread, the sender's included, at any
        allocation, with self._cond or self._cut_lock held by the thread it runs in: it
        takes no lock, and the sender sees the flag within its next wait."""
        self._abandoned = True

    # -- log()'s rare paths (called without self._cond) --------------------------------

    def _open_row(self, run_id: str, key: str) -> _Row:
        for name, text in (("run_id", run_id), ("key", key)):
            if not isinstance(text, str):
                raise TypeError(f"{name} must be a str, not {type(text).__name__}")
        # Once per run and key: the sidecar would refuse the whole message that carried it.
        names.run_id("run_id", run_id)
        names.key("key", key)
        ended = self._ended_runs.get(run_id)
        if ended is not None:
            raise _fresh(ended)
        # setdefault: two threads opening the same run and key share one row.
        row = self._pending.setdefault(run_id, {}).setdefault(key, bytearray())
        if self._sealed:
            # The last cut may have sealed the rows it saw before this one was made.
            raise _fresh(self._error) if self._error is not None else _closed_error()
        return row

    @staticmethod
    def _add(row: _Row, point: bytes) -> None:
        try:
            row += point
        except BufferError:  # see log()
            raise _closed_error() from None

    def _batch_due(self) -> None:
        with self._cond:
            # Until the sender gets to it (a loop that never releases the GIL lets it in
            # only at the interpreter's switch interval), say so again only a batch later.
            self._signal_at = self._count + self._max_batch
            self._cond.notify_all()
            # Backpressure: past the limit, the trainer waits for the sender, or with
            # when_full="raise" log() refuses points until the sender made room.
            if self._buffered() >= self._max_buffered:
                if self._raise_when_full:
                    self._refuse_while_full()
                else:
                    self._wait_for_room()

    # -- internals (callers hold self._cond) -------------------------------------------

    def _buffered(self) -> int:
        # Points on their way count too: the stream holds them until the sidecar has
        # accepted them, to send them again after a failed call.
        return self._count + self._queued_points + self._unacknowledged()

    def _unacknowledged(self) -> int:
        return sum(n for _, n in self._in_flight)

    def _refuse_while_full(self) -> None:
        if self._error is None and not self._sealed:  # a closed stream says so instead
            self._pending = _Refusing(
                ResourceExhaustedError(
                    f"the metric stream's buffer is full: {self._buffered()} points wait for"
                    f" the sidecar (stream_buffer_points={self._max_buffered}); the point"
                    " was not logged",
                    reason=CLIENT_BUFFER_FULL,
                    metadata={"buffer_points": str(self._max_buffered)},
                    retry_after_s=self._max_delay_s,
                )
            )

    def _reopen_if_room(self) -> None:
        # Only after the sidecar accepted something: a failed call puts its points back,
        # so room seen while they were on their way was never there.
        if (
            self._pending is not self._rows
            and self._error is None
            and not self._sealed
            and self._buffered() < self._max_buffered
        ):
            self._pending = self._rows

    def _wait_for_room(self) -> None:
        self._raise_if_failed()
        while self._buffered() >= self._max_buffered and self._error is None:
            self._cond.wait(0.1)
        self._raise_if_failed()

    def _due(self) -> bool:
        """A batch is due: by count, or by age if anything is pending at all.

        Pending points show in the count, not by walking the rows (which log() may add to
        meanwhile, and which grow with every run and key ever logged): log() counts a
        point after appending it, and a cut zeroes the count before taking the rows, so a
        point a cut has not taken is always counted."""
        if self._count >= self._max_batch:
            return True
        return self._count > 0 and time.monotonic() - self._last_cut >= self._max_delay_s

    def _idle(self) -> bool:
        """Nothing to send yet: no message queued, no batch due, and not closing."""
        return not self._queue and not self._closing and not self._due()

    def _drained_for_close(self) -> bool:
        return self._closing and not self._queue

    def _fail(self, error: SidecarError) -> None:
        # log() does not check for an error, as that is a tenth of what it costs: the
        # buffers it looks points up in are swapped for ones that raise the error.
        self._error = error
        self._pending = _Refusing(error)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise _fresh(self._error)

    # -- cutting (callers do not hold self._cond) ---------------------------------------

    def _cut_whole(self, *, last: bool = False) -> None:
        """`_cut`, in a thread of its own that the caller waits for: a KeyboardInterrupt
        (Ctrl-C during `flush()`) raised in the caller cannot stop a cut between taking
        points out of their rows and queueing them, which would lose them unreported."""
        failed: list[BaseException] = []

        def cut() -> None:
            try:
                self._cut(last=last)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller, as before
                failed.append(exc)

        cutter = threading.Thread(target=cut, name="metric-stream-cut", daemon=True)
        cutter.start()
        cutter.join()
        if failed:
            raise failed[0]

    def _cut(self, *, last: bool = False) -> int:
        """Queue what is pending, as few messages as fit; returns the points queued.

        The `last` cut (close's) first stops log() from adding points, then takes all."""
        with self._cut_lock:
            if self._error is not None or self._sealed:
                return 0  # nothing will be sent any more, or the last cut took it all
            self._count = 0
            self._signal_at = self._max_batch
            self._last_cut = time.monotonic()
            if last:
                self._seal()
            found = self._found_rows()
            if last:
                self._seals = [memoryview(row) for _, row in found]
                self._rows = {}
            return self._queue_messages(self._take_points(found, last=last))

    def _seal(self) -> None:
        with self._cond:
            # A log() from now on raises; one that found its row before adds its
            # point before the seal (and the last cut takes it), or raises.
            self._sealed = True
            self._pending = _Refusing(_closed_error())

    def _found_rows(self) -> list[tuple[tuple[str, str], _Row]]:
        # list(): one atomic copy, as log() may add a run and key meanwhile. What log()
        # appends from here on waits for the next cut, so that this one ends.
        return [
            ((run_id, key), row)
            for run_id, keys in list(self._rows.items())
            for key, row in list(keys.items())
        ]

    @staticmethod
    def _take_points(found: list[tuple[tuple[str, str], _Row]], *, last: bool) -> list[_Pending]:
        """The whole points of each row, taken out of it unless the row is sealed."""
        rows: list[_Pending] = []
        for name, row in found:
            size = len(row) // _POINT.size * _POINT.size
            if size:
                rows.append((name, memoryview(row[:size]), size // _POINT.size))
                if not last:
                    # Only this prefix goes: what log() appended since stays in the row.
                    del row[:size]
        return rows

    def _queue_messages(self, rows: list[_Pending]) -> int:
        # Each message is queued as soon as it is built, so the sender need not wait
        # for the whole cut.
        queued = 0
        while rows:
            message, points, rows = self._take(rows)
            with self._cond:
                self._queue.append((message, points))
                self._queued_points += points
                self._cond.notify_all()
            queued += points
        return queued

    def _take(self, rows: list[_Pending]) -> tuple[pb.StreamMetricsRequest, int, list[_Pending]]:
        """One message of the first points of `rows`, at most `max_message_bytes`; returns
        it, its points and what is left of `rows` for the next one.

        When not all fit, each run and key gets its share of the message, so that none
        waits behind another; with more runs and keys than fit, the first ones go first."""
        budget = self._max_message_bytes
        overheads = [
            _SERIES_BYTES + len(run_id.encode()) + len(key.encode()) for (run_id, key), _, _ in rows
        ]
        wanted = sum(n for _, _, n in rows)
        fits = max(1, (budget - sum(overheads)) // MAX_POINT_BYTES)
        # The sidecar takes no message of more points than its spool holds.
        cap = self._max_message_points or wanted
        fits = min(fits, cap)
        message = pb.StreamMetricsRequest()
        add = message.series.add
        points = size = 0
        left: list[_Pending] = []
        for ((run_id, key), data, n), overhead in zip(rows, overheads, strict=True):
            share = n if wanted <= fits else max(1, n * fits // wanted)
            if points >= cap or (size and size + overhead + share * MAX_POINT_BYTES > budget):
                left.append(((run_id, key), data, n))
                continue
            # The first series of a message always goes, as much of it as fits.
            share = max(1, min(share, (budget - overhead) // MAX_POINT_BYTES, cap - points))
            _add_columns(
                add(run_id=run_id, key=key),
                data[: _POINT.size * share],
                fixed=self._fixed_columns is True,
            )
            points += share
            size += overhead + share * MAX_POINT_BYTES
            if share < n:
                left.append(((run_id, key), data[_POINT.size * share :], n - share))
        return message, points, left

    # -- the background thread ----------------------------------------------------------

    def _send(self) -> None:
        """The thread's body: the send loop, whose unexpected failure fails the stream (a
        flush or close waiting for the sender would otherwise wait for a thread that is gone)."""
        try:
            self._send_loop()
        except Exception as exc:
            with self._cond:
                if self._error is None:
                    self._fail(
                        InternalError(
                            f"the metric stream's sender failed and sends nothing more:"
                            f" {type(exc).__name__}: {exc}"
                        )
                    )
                self._cond.notify_all()
            raise

    def _send_loop(self) -> None:
        failing_since: float | None = None
        delay = 0.05
        while self._wait_for_work():
            accepted_before = self._accepted
            started = time.monotonic()
            code = self._send_window()
            if self._error is not None:
                return
            if code is None:
                failing_since, delay = None, 0.05
                continue
            progressed = self._accepted > accepted_before
            if progressed:
                # The sidecar took some of the call's messages before it refused one (a
                # spool that drains as fast as MLflow takes points): that is progress,
                # and the stream gives up only on a sidecar that takes nothing at all.
                failing_since, delay = None, 0.05
            # A call that took nothing failed from its start: the time gRPC spent on it
            # (its own retries of an unreachable sidecar, a deadline) counts.
            failing_since = failing_since or (time.monotonic() if progressed else started)
            if not self._back_off(code, failing_since, delay):
                return
            delay = min(delay * 2, 2.0)

    def _wait_for_work(self) -> bool:
        """Wait until there is something to send; False once the stream closed and sent
        everything it queued."""
        with self._cond:
            while self._idle() and not self._abandoned:
                self._cond.wait(min(self._max_delay_s / 2, _ABANDON_CHECK_S))
            closing = self._closing
        if self._abandoned and not closing:
            # Nobody can log or close any more: close as close() would, from here.
            self._cut(last=True)
            with self._cond:
                self._closing = True
        with self._cond:
            return not self._drained_for_close()

    def _back_off(self, code: grpc.StatusCode, failing_since: float, delay: float) -> bool:
        """Sleep before the next window after a retryable failure; False (and the stream
        failed) once the sidecar has been failing for longer than the retry budget."""
        if time.monotonic() - failing_since > self._retry_budget_s:
            with self._cond:
                self._fail(_exhausted_retries(code, self._retry_budget_s, self._last_refusal))
                self._cond.notify_all()
            return False
        # Never sooner than the sidecar asked; never past the retry budget.
        left = self._retry_budget_s - (time.monotonic() - failing_since)
        time.sleep(max(0.0, min(max(delay, self._retry_after_s), left)))
        return True

    def _requests(self, call: int) -> Iterator[pb.StreamMetricsRequest]:
        started = time.monotonic()
        while self._window_has_work(call, started):
            message = self._dequeue(call)
            if message is not None:
                yield message

    def _window_has_work(self, call: int, started: float) -> bool:
        """Wait for a message to send in call number `call`, opened at `started`, cutting
        a due batch into messages; False when the call should end (or has ended) instead."""
        with self._cond:
            flying = self._unacknowledged()
            if flying >= self._acknowledge_at or (flying and self._fixed_columns is None):
                # The sidecar says what it accepted only when a call ends, and the buffer
                # holds points until then: a call that ran on would fill it and hold the
                # trainer in `log` until the window closed. Until a call has succeeded,
                # one message is enough: its answer says which columns the sidecar reads.
                return False
            while self._idle():
                if self._call != call or self._abandoned:
                    return False
                if self._flushing or time.monotonic() - started >= self._window_s:
                    return False
                self._cond.wait(0.02)
            if self._call != call or self._drained_for_close():
                return False
            cut = not self._queue
        if cut:
            # Outside self._cond: log() calls that find a batch due do not wait for it.
            self._cut()
        return True

    def _dequeue(self, call: int) -> pb.StreamMetricsRequest | None:
        # A message stays in flight until the sidecar accepted it, to be sent again if
        # the call fails.
        with self._cond:
            if self._call != call:
                return None  # the call has ended: the message waits for the next one
            if not self._queue:
                return None  # the count ran ahead of what was pending
            message, count = self._queue.popleft()
            self._queued_points -= count
            self._in_flight.append((message, count))
            self._cond.notify_all()
        return message

    def _send_window(self) -> grpc.StatusCode | None:
        """One call; None on success, else the retryable status code that ended it."""
        with self._cond:
            self._call += 1
            call = self._call
        try:
            reply, done = self._stub.StreamMetrics.with_call(
                self._requests(call), timeout=self._call_timeout_s()
            )
        except grpc.RpcError as exc:
            return self._settle_failure(exc)
        except (SidecarError, ValueError) as exc:
            # The channel was closed (gRPC's own channels say so with a ValueError) or is
            # used in a forked child: nothing this stream holds can be sent any more.
            error = (
                exc
                if isinstance(exc, SidecarError)
                else FailedPreconditionError(
                    f"the sidecar channel is closed: {exc}", reason=_CLIENT_CLOSED
                )
            )
            with self._cond:
                self._call += 1
                self._fail(error)
                self._in_flight.clear()
                self._cond.notify_all()
            return None
        self._learn_columns(done)
        with self._cond:
            self._call += 1
            self._accepted += reply.accepted_points
            self._in_flight.clear()
            self._reopen_if_room()
            self._cond.notify_all()
        return None

    def _call_timeout_s(self) -> float | None:
        """The deadline of one call; None with an endless retry budget.

        Without one, a sidecar that holds the connection and answers nothing (stopped,
        hung) was noticed only by keepalive after a minute or more, and an address that
        accepts connections but never speaks gRPC by the connect timeout: `close()` hung
        that long whatever `retry_budget_s` said. A call carries messages for its window,
        at most until it holds `_acknowledge_at` points and one message more; a sidecar
        that takes them at the slowest pace of a working one answers within that time,
        and the retry budget on top is the longest a stream waits for a sidecar."""
        if not math.isfinite(self._retry_budget_s):
            return None
        most_points = self._acknowledge_at + self._max_message_bytes // MAX_POINT_BYTES
        return self._window_s + most_points / SLOWEST_POINTS_PER_S + self._retry_budget_s

    def _learn_columns(self, call: object) -> None:
        """Send fixed-width columns from the next cut on if the sidecar of `call`, a call
        that succeeded, said it reads them; varints if it did not."""
        metadata = call.initial_metadata() if isinstance(call, grpc.Call) else None
        forms = dict(metadata or ()).get(SERIES_COLUMNS_METADATA, "")
        # Messages already cut keep their form: a sidecar that lost the fixed form (one
        # downgraded while the stream ran) refuses them (INVALID_ARGUMENT).
        self._fixed_columns = SERIES_COLUMNS_FIXED in str(forms).split(",")
        self._max_message_points = _positive_int(
            dict(metadata or ()).get(MAX_MESSAGE_POINTS_METADATA)
        )

    def _after_fork_in_child(self) -> None:
        # The sender thread did not come along, and a lock it held stays held: new locks,
        # and the stream fails so that log() and flush() raise instead of hanging.
        self._cond = threading.Condition(threading.Lock())
        self._cut_lock = threading.Lock()
        self._closing = True  # close() in the child has nothing to do
        self._fail(
            FailedPreconditionError(
                f"this metric stream was made in process {self._pid}, not in this one"
                f" ({os.getpid()}): a stream does not survive fork; make a new"
                " ClientContainer and metric stream in the child",
                reason=STREAM_USED_AFTER_FORK,
                metadata={"made_in_pid": str(self._pid), "pid": str(os.getpid())},
            )
        )

    def _drop_ended_run(self, run_id: str, refusal: SidecarError) -> None:
        """Drop every unsent point of `run_id`, which the sidecar refuses for good, and
        refuse its points from now on; flush() reports what was dropped. Under self._cond."""
        self._ended_runs[run_id] = refusal
        self._in_flight, in_flight = _without_run(self._in_flight, run_id)
        queue, queued = _without_run(list(self._queue), run_id)
        self._queue = collections.deque(queue)
        self._queued_points -= queued
        # A log() that found its row before this sees it no more: its point is dropped
        # with the row's, as the sidecar would refuse it.
        rows = self._rows.pop(run_id, {})
        buffered = sum(len(row) // _POINT.size for row in rows.values())
        dropped = in_flight + queued + buffered
        _log.warning("dropped %d points of run %s: %s", dropped, run_id, refusal.message)
        self._unreported.append(
            FailedPreconditionError(
                f"{dropped} points of run {run_id} were not accepted: {refusal.message};"
                " the stream goes on for its other runs",
                reason=RUN_ENDED,
                metadata={**refusal.metadata, "points": str(dropped)},
            )
        )

    def _fitting_points(self, exc: grpc.RpcError) -> int | None:
        """How many points fit one message when gRPC refused the first one in flight as
        larger than the sidecar takes; None for any other refusal. Later messages are cut
        to the sidecar's limit too, so the stream goes on in smaller messages."""
        details = exc.details() if isinstance(exc, grpc.Call) else ""
        sizes = _too_large(details or "")
        if sizes is None:
            return None
        size, limit = sizes
        # A tenth below the limit: points differ in size (key lengths, columns).
        self._max_message_bytes = max(2048, min(self._max_message_bytes, limit * 9 // 10))
        first = self._in_flight[0][1]
        current = self._max_message_points or first
        return max(1, min(current, first * limit * 9 // (10 * max(size, 1))))

    def _settle_failure(self, exc: grpc.RpcError) -> grpc.StatusCode | None:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        accepted = _accepted_from_trailers(exc)
        with self._cond:
            self._call += 1  # see self._call: nothing more goes into this call's flight
            # Messages are committed whole and in order: drop those the sidecar accepted.
            done = 0
            while self._in_flight and done + self._in_flight[0][1] <= accepted:
                done += self._in_flight.pop(0)[1]
            self._accepted += done
            refusal = error_from_rpc(exc)
            ended = refusal.metadata.get("run_id") if refusal.reason == RUN_ENDED else None
            if ended:
                # One run's end refuses the message: the stream goes on for the others.
                self._drop_ended_run(ended, refusal)
            cap = _message_points_limit(refusal)
            if cap is None and self._in_flight:
                cap = self._fitting_points(exc)
            if cap is not None:
                # More points in one message than the spool holds: no wait would make
                # room, but the same points in smaller messages fit.
                self._max_message_points = cap
                self._in_flight = _split_messages(self._in_flight, cap)
                self._queue = collections.deque(_split_messages(list(self._queue), cap))
            # A message over a limit the sidecar did not say cannot be sent again.
            retry = (
                bool(ended)
                or cap is not None
                or (code in _RETRYABLE and refusal.reason != ErrorReason.TOO_MANY_POINTS)
            )
            if retry:
                self._last_refusal = refusal
                self._retry_after_s = self._last_refusal.retry_after_s or 0.0
                for message, count in reversed(self._in_flight):
                    self._queue.appendleft((message, count))
                    self._queued_points += count
                self._in_flight.clear()
                self._cond.notify_all()
                return code
            self._fail(refusal)
            self._in_flight.clear()
            self._cond.notify_all()
            return None


class MetricStream:
    """Streams metric points of any runs to the sidecar's spool from a background thread.

    `max_buffered_points` bounds the points held until the sidecar accepted them; when the
    buffer is full, `when_full` decides: `block` makes `log` wait for room, `raise` makes it
    raise ResourceExhaustedError (reason CLIENT_BUFFER_FULL). The bound is checked once per
    batch, so it may be passed by up to `max_batch_points`. `retry_budget_s` is how long the
    stream keeps trying while the sidecar is unreachable (0: not at all; `inf`: forever);
    then it fails, and a blocked `log` raises that error.

    A stream dropped without `close()` closes itself in the background once it is
    collected: its thread sends what it holds as `close()` would (trying for at most
    `retry_budget_s` while the sidecar is unreachable) and ends, so neither the thread nor
    the channel outlives it by more than that. Nothing reports on that delivery, and a
    process that exits first loses those points: close a stream to know its points are in
    the spool. A `log` taken from a stream (`log = stream.log`) does not keep it alive."""

    def __init__(
        self,
        stub: pb_grpc.ExperimentTrackingServiceStub,
        *,
        max_batch_points: int = DEFAULT_BATCH_POINTS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_delay_s: float = 0.2,
        call_window_s: float = 2.0,
        max_buffered_points: int = DEFAULT_MAX_BUFFERED_POINTS,
        retry_budget_s: float = DEFAULT_RECONNECT_S,
        when_full: Literal["block", "raise"] = "block",
    ) -> None:
        self._core = _StreamCore(
            stub,
            max_batch_points=max_batch_points,
            max_message_bytes=max_message_bytes,
            max_delay_s=max_delay_s,
            call_window_s=call_window_s,
            max_buffered_points=max_buffered_points,
            retry_budget_s=retry_budget_s,
            when_full=when_full,
        )
        # The hot path of a training loop goes straight to the core's `log`: a call
        # through a method of this object adds about a tenth to what a point costs.
        self.log = self._core.log  # type: ignore[method-assign]
        finalizer = weakref.finalize(self, self._core.abandon)
        # At exit the process ends the thread anyway; a stream still referenced then is
        # left as before.
        finalizer.atexit = False

    @property
    def accepted(self) -> int:
        """Points the sidecar has committed to its spool so far."""
        return self._core.accepted

    def log(
        self, run_id: str, key: str, value: float, *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """Buffer one point; blocks only while the buffer is full (backpressure), or with
        `when_full="raise"` raises ResourceExhaustedError (reason CLIENT_BUFFER_FULL) then.

        Raises TypeError (or ValueError, for a number out of range; InvalidArgumentError
        for a run id or key MLflow does not take) at once for a point the sidecar would
        refuse: it never reaches a batch. Safe to call from several threads."""
        self._core.log(run_id, key, value, step=step, timestamp_ms=timestamp_ms)

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, timestamp_ms: int = 0
    ) -> None:
        """Buffer one point per metric, all with the same step and timestamp."""
        self._core.log_metrics(run_id, metrics, step=step, timestamp_ms=timestamp_ms)

    def flush(self, timeout_s: float | None = None, *, report_dropped: bool = True) -> int:
        """Send everything buffered and wait until the sidecar accepted it; returns the total
        accepted so far. Raises the stream's error, or DeadlineExceededError on timeout.

        Points of a run the sidecar refuses for good (ended through it: RUN_ENDED) are
        dropped and the stream goes on for its other runs; the next flush that
        `report_dropped` raises FailedPreconditionError (reason RUN_ENDED, metadata
        `run_id` and `points`) once, after flushing the rest: one error for all such runs
        (their ids comma-separated in `run_id`, `points` their sum), so that a `close()`,
        after which nothing more is raised, reports them all."""
        return self._core.flush(timeout_s, report_dropped=report_dropped)

    def close(self, timeout_s: float | None = None) -> int:
        """Flush, then stop the background thread; returns the points accepted in total.

        Closing again returns the same total. `log` and `flush` on a closed stream raise
        FailedPreconditionError (reason CLIENT_CLOSED): a point logged then could never be
        sent. A `log` running in another thread while the stream closes either has its
        point sent by this close or raises that error."""
        return self._core.close(timeout_s)

    def resumed(self, run_id: str) -> None:
        """The run was resumed (`ExperimentTracking.resume_run`): `log` takes its points
        again after the sidecar refused them (RUN_ENDED). A refusal not yet reported by
        `flush()` still is."""
        self._core.resumed(run_id)

    def __enter__(self) -> MetricStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _one_report(reports: list[SidecarError]) -> SidecarError:
    """The refusals of points of several ended runs as one error, each run named."""
    if len(reports) == 1:
        return reports[0]
    return FailedPreconditionError(
        "; ".join(report.message for report in reports),
        reason=RUN_ENDED,
        metadata={
            "run_id": ",".join(report.metadata.get("run_id", "") for report in reports),
            "points": str(sum(int(report.metadata.get("points", "0")) for report in reports)),
        },
    )


def _without_run(
    messages: list[tuple[pb.StreamMetricsRequest, int]], run_id: str
) -> tuple[list[tuple[pb.StreamMetricsRequest, int]], int]:
    """`messages` without the points of `run_id` (a message left empty goes), and how
    many points went."""
    kept: list[tuple[pb.StreamMetricsRequest, int]] = []
    dropped = 0
    for message, count in messages:
        if all(p.run_id != run_id for p in message.points) and all(
            s.run_id != run_id for s in message.series
        ):
            kept.append((message, count))
            continue
        rest = pb.StreamMetricsRequest(
            points=[p for p in message.points if p.run_id != run_id],
            series=[s for s in message.series if s.run_id != run_id],
        )
        left = len(rest.points) + sum(len(s.values) for s in rest.series)
        dropped += count - left
        if left:
            kept.append((rest, left))
    return kept, dropped


def _positive_int(text: object) -> int | None:
    try:
        number = int(str(text))
    except ValueError:
        return None
    return number if number > 0 else None


# gRPC's own refusal of a message over the receiver's limit (the sidecar's
# `server.max_message_bytes`, when it is below the client's `max_message_bytes`).
_TOO_LARGE_RE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def _too_large(details: str) -> tuple[int, int] | None:
    """(size, limit) of a message gRPC refused as larger than the receiver takes."""
    found = _TOO_LARGE_RE.search(details)
    return (int(found[1]), int(found[2])) if found else None


def _message_points_limit(error: SidecarError) -> int | None:
    """The points a message may hold, when `error` refused a larger one and said so."""
    if error.reason != ErrorReason.TOO_MANY_POINTS:
        return None
    return _positive_int(error.metadata.get("max_points"))


def _split_messages(
    messages: list[tuple[pb.StreamMetricsRequest, int]], cap: int
) -> list[tuple[pb.StreamMetricsRequest, int]]:
    """`messages` again, in order, each of more than `cap` points cut into pieces of at
    most `cap`: a series' points keep their order."""
    pieces: list[tuple[pb.StreamMetricsRequest, int]] = []
    for message, count in messages:
        if count <= cap:
            pieces.append((message, count))
            continue
        piece, taken = pb.StreamMetricsRequest(), 0
        for point in message.points:
            piece.points.append(point)
            taken += 1
            if taken == cap:
                pieces.append((piece, taken))
                piece, taken = pb.StreamMetricsRequest(), 0
        for series in message.series:
            start = 0
            while start < len(series.values):
                end = start + min(cap - taken, len(series.values) - start)
                part = piece.series.add(run_id=series.run_id, key=series.key)
                for field in _SERIES_COLUMNS:
                    column = getattr(series, field)
                    if len(column):
                        getattr(part, field).extend(column[start:end])
                taken += end - start
                start = end
                if taken == cap:
                    pieces.append((piece, taken))
                    piece, taken = pb.StreamMetricsRequest(), 0
        if taken:
            pieces.append((piece, taken))
    return pieces


_SERIES_COLUMNS = ("values", "timestamps_ms", "steps", "fixed_timestamps_ms", "fixed_steps")


def _accepted_from_trailers(exc: grpc.RpcError) -> int:
    if not isinstance(exc, grpc.Call):
        return 0
    for key, value in exc.trailing_metadata() or ():
        if key == ACCEPTED_POINTS_METADATA:
            return int(value)
    return 0


def _exhausted_retries(
    code: grpc.StatusCode, budget_s: float, last: SidecarError | None
) -> SidecarError:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # The sidecar's own reason (a full spool or disk, its stream limit) and its words.
        said = f": {last}" if last is not None else ""
        return ResourceExhaustedError(
            f"the sidecar refused the stream's points for {budget_s:.0f}s{said}",
            reason=last.reason if last is not None else "",
            metadata=dict(last.metadata) if last is not None else None,
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # DEADLINE_EXCEEDED: the stream's own deadline passed with no answer, a sidecar
        # that holds the connection but takes nothing.
        return UnavailableError(
            "the sidecar stayed unreachable, or answered none of the stream's calls, for"
            f" longer than stream_reconnect_s ({budget_s:g}s); the points it had not"
            " accepted are lost: raise stream_reconnect_s to outlast longer sidecar"
            " restarts",
            reason=SIDECAR_UNREACHABLE,
            metadata={"stream_reconnect_s": f"{budget_s:g}"},
        )
    return error_from_status(code, f"the sidecar stayed {code.name} for {budget_s:.0f}s")


def _after_fork() -> None:
    for stream in list(_STREAMS):
        stream._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)
