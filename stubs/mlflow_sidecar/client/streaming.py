"""Calling streaming RPCs so that failures surface as domain errors, not as gRPC internals."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

import grpc

from mlflow_sidecar.client.unary_retry import Reconnect, RetrySchedule, sidecar_unreachable
from mlflow_sidecar.core.errors import error_from_rpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")
F = TypeVar("F", bound=Callable[..., Any])


def resent_on_unavailable(
    send: F,
    attempts: int,
    reconnect: Reconnect | None = None,
    wait_s: float = 0.0,
    *,
    upload: bool = False,
) -> F:
    """`send`, called again while its call finds the sidecar unreachable, at most
    `attempts` times in all; the failed call (the `grpc.RpcError` `send` raises) becomes
    its domain error.

    A transfer cannot be replayed by gRPC once it has started, so it is sent again whole;
    an upload's request id makes the repeat safe. Before it is sent again it waits, with
    `reconnect`, for the sidecar to be back, for up to `wait_s` (the transfer's own
    timeout): a restart of a few seconds costs the transfer those seconds, as it costs a
    unary call. Without `reconnect` it waits the schedule's short backoff only. An
    UNAVAILABLE the sidecar answers itself is not sent again (`sidecar_unreachable`, the
    rule of unary calls too): the sidecar has already retried MLflow for it, and a repeat
    would multiply those tries. An `upload` is the exception: the sidecar streams its
    bytes on to MLflow as they arrive and cannot send them to MLflow a second time, so
    sending it again whole here is the only retry an upload MLflow failed gets."""
    schedule = RetrySchedule(max(1, attempts))

    def waited(tries: int) -> bool:
        if reconnect is not None:
            return reconnect.pause(schedule, tries, time.monotonic() + wait_s)
        time.sleep(schedule.backoff_s(tries))
        return True

    @functools.wraps(send)
    def sent(*args: Any, **kwargs: Any) -> Any:
        tries = 0
        while True:
            tries += 1
            try:
                return send(*args, **kwargs)
            except grpc.RpcError as exc:
                retryable = sidecar_unreachable(exc) or (
                    upload and exc.code() == grpc.StatusCode.UNAVAILABLE
                )
                again = retryable and tries < schedule.max_attempts
                if not (again and waited(tries)):
                    raise error_from_rpc(exc) from None

    return cast(F, sent)


class _Recording(Generic[Req]):
    """Wraps a request iterator and keeps the exception it raised.

    gRPC consumes request iterators on its own thread and reports their failures as a
    bare CANCELLED; keeping the exception lets the caller see the real cause (a read
    error, or a progress callback that chose to abort).
    """

    def __init__(self, requests: Iterator[Req]) -> None:
        self._requests = requests
        self.error: Exception | None = None

    def __iter__(self) -> _Recording[Req]:
        return self

    def __next__(self) -> Req:
        try:
            return next(self._requests)
        except StopIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise


def invoke_client_stream(
    method: Callable[..., Resp], requests: Iterator[Req], timeout: float | None
) -> Resp:
    """Call a client-streaming stub method.

    An exception raised while producing the requests cancels the call and is re-raised
    as it was; a failed call raises its `grpc.RpcError` (`resent_on_unavailable` decides
    from it whether to send again, and makes it a domain error).
    """
    recording = _Recording(requests)
    try:
        return method(recording, timeout=timeout)
    except grpc.RpcError:
        if recording.error is not None:
            raise recording.error from None
        raise
