"""`GrpcAliasWatch`: a WatchModelAlias stream that reconnects on its own and misses no
change: each new stream carries the versions already reported (`last_seen_versions`), so
the sidecar answers with what changed since, and replays of them (CURRENT) are dropped,
unless their creation time says the model was made again (another version, same number)."""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence

import backoff
import grpc

from mlflow_sidecar.client.arguments import strings
from mlflow_sidecar.client.ports import AliasWatch
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import AliasChange, AliasChangeKind, WatchStatus
from mlflow_sidecar.core.errors import (
    CancelledError,
    ClientErrorReason,
    ResourceExhaustedError,
    SidecarError,
    UnavailableError,
    error_from_rpc,
)
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc

# Reconnect backoff: 0.1 s doubling up to 5 s, each wait drawn at random below that.
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 5.0

# Failures a new stream can get past: the sidecar restarting or stopping (UNAVAILABLE,
# SHUTTING_DOWN included), a stream the sidecar ended because the client fell behind or had
# no room for it (RESOURCE_EXHAUSTED), a call cancelled by anyone but this watch.
_RETRYABLE = (UnavailableError, ResourceExhaustedError, CancelledError)


class GrpcAliasWatch(AliasWatch):
    """The watch of `aliases` of `name` through a sidecar. Opening it waits for the
    sidecar's first message, so a bad request raises here. A stream that fails with a
    retryable error is opened again with backoff (and at least the sidecar's RetryInfo);
    after `reconnect_s` of failing in a row the iteration raises UnavailableError (reason
    SIDECAR_UNREACHABLE). A watch dropped without `close()` cancels its stream once it is
    collected, so the sidecar frees what the stream held there."""

    def __init__(
        self,
        stub: pb_grpc.ModelRegistryServiceStub,
        name: str,
        aliases: Sequence[str],
        *,
        last_seen_versions: Mapping[str, int] | None = None,
        last_seen_creation_times_ms: Mapping[str, int] | None = None,
        reconnect_s: float = 60.0,
    ) -> None:
        self._stub = stub
        self._name = name
        self._aliases = strings("aliases", aliases)
        # alias -> the version last reported (0: not set); sent with every new stream.
        self._reported: dict[str, int] = dict(last_seen_versions or {})
        # alias -> the creation time of the version last reported: a model deleted and
        # made again while no stream was open (or no process of the caller ran) has a
        # version of the same number, another.
        self._reported_created: dict[str, int] = dict(last_seen_creation_times_ms or {})
        self._reconnect_s = reconnect_s
        self._status: WatchStatus | None = None
        self._ready: deque[AliasChange] = deque()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._open = _OpenCall()
        self._failing_since: float | None = None
        self._delays = reconnect_delays()
        # gRPC cancels a call it collects, but a call with a done callback (the trace
        # context interceptor adds one) is held by its own state until it ends: an
        # unclosed watch kept its stream, and a worker and a slot of the sidecar, for
        # the life of the process.
        weakref.finalize(self, self._open.cancel).atexit = False
        try:
            self._take(self._receive())
        except BaseException:
            self.close()
            raise

    @property
    def status(self) -> WatchStatus | None:
        return self._status

    @property
    def last_seen_versions(self) -> dict[str, int]:
        return dict(self._reported)

    @property
    def last_seen_creation_times_ms(self) -> dict[str, int]:
        return dict(self._reported_created)

    def __next__(self) -> AliasChange:
        while not self._ready:
            self._take(self._receive())
        return self._ready.popleft()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            call, self._open.call = self._open.call, None
        if call is not None:
            _cancel(call)

    def _take(self, message: pb.WatchModelAliasResponse) -> None:
        if message.HasField("status"):
            self._status = conv.watch_status_from_pb(message.status)
            return
        change = conv.alias_change_from_pb(message.change)
        if change is None:
            return  # a kind this client does not know yet
        created = change.model_version.creation_time_ms if change.model_version else 0
        if (
            change.kind is AliasChangeKind.CURRENT
            and self._reported.get(change.alias) == change.version
        ):
            known = self._reported_created.get(change.alias, 0)
            if not (change.version and known and created and known != created):
                return  # the replay, on a new stream, of what was reported already
            # The same number, another version: the model was deleted and made again
            # while no stream was open, as an open one would have reported it.
            self._ready.append(
                AliasChange(change.alias, AliasChangeKind.DELETED, None, change.version)
            )
            change = AliasChange(change.alias, AliasChangeKind.SET, change.model_version, 0)
        self._reported[change.alias] = change.version
        self._reported_created[change.alias] = created
        self._ready.append(change)

    def _receive(self) -> pb.WatchModelAliasResponse:
        """The next message, through as many new streams as it takes."""
        while True:
            call = self._current_call()
            try:
                message = next(call)
            except StopIteration:
                # The contract ends a stream only with a status; whatever ended it, resume.
                failure: SidecarError = UnavailableError("the sidecar ended the watch")
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    raise StopIteration from None
                failure = error_from_rpc(exc)
                if not isinstance(failure, _RETRYABLE):
                    raise failure from None
            else:
                self._failing_since = None
                self._delays = reconnect_delays()
                return message
            self._drop(call)
            self._wait_to_reconnect(failure)

    def _current_call(self) -> Iterator[pb.WatchModelAliasResponse]:
        with self._lock:
            if self._closed.is_set():
                raise StopIteration
            if self._open.call is None:
                request = pb.WatchModelAliasRequest(
                    name=self._name,
                    aliases=self._aliases,
                    last_seen_versions=self._reported,
                )
                # No deadline: the stream lasts until it is closed.
                self._open.call = self._stub.WatchModelAlias(request)
            return self._open.call

    def _drop(self, call: Iterator[pb.WatchModelAliasResponse]) -> None:
        with self._lock:
            if self._open.call is call:
                self._open.call = None
        _cancel(call)

    def _wait_to_reconnect(self, failure: SidecarError) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        left = self._reconnect_s - (now - self._failing_since)
        if left <= 0:
            raise UnavailableError(
                f"the watch of {self._name!r} could not reach the sidecar for longer than"
                f" stream_reconnect_s ({self._reconnect_s:g}s): {failure.message}",
                reason=ClientErrorReason.SIDECAR_UNREACHABLE,
                metadata={"stream_reconnect_s": f"{self._reconnect_s:g}"},
            )
        delay = max(backoff.full_jitter(next(self._delays)), failure.retry_after_s or 0.0)
        if self._closed.wait(min(delay, left)):
            raise StopIteration


class _OpenCall:
    """The stream a watch reads now, apart from the watch, for the watch's finalizer to
    cancel once the watch is gone."""

    def __init__(self) -> None:
        self.call: Iterator[pb.WatchModelAliasResponse] | None = None

    def cancel(self) -> None:
        # No lock: a finalizer may run in a thread that holds the watch's lock.
        call = self.call
        if call is not None:
            _cancel(call)


def reconnect_delays() -> Iterator[float]:
    """The upper bounds of the waits before each new stream of a failing run: 0.1 s
    doubling up to 5 s (each wait is drawn below its bound)."""
    delays = backoff.expo(factor=_FIRST_BACKOFF_S, max_value=_MAX_BACKOFF_S)
    next(delays)  # the generator's priming step
    return delays


def _cancel(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()
