"""Calling streaming RPCs so that failures surface as domain errors, not as gRPC internals."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import backoff
import grpc

from mlflow_sidecar.core.errors import UnavailableError, error_from_rpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")
F = TypeVar("F", bound=Callable[..., Any])


def resent_on_unavailable(send: F, attempts: int) -> F:
    """`send`, called again (with backoff) while it fails with UnavailableError, at most
    `attempts` times in all.

    A client stream cannot be replayed by gRPC once it has started, so an upload that
    failed on its way is sent again whole; its request id makes the repeat safe."""
    wrapped: F = backoff.on_exception(
        backoff.expo,
        UnavailableError,
        max_tries=max(1, attempts),
        factor=0.5,
        max_value=10,
        jitter=backoff.full_jitter,
        logger=None,
    )(send)
    return wrapped


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
    """Call a client-streaming stub method; failures become domain errors.

    An exception raised while producing the requests cancels the call and is re-raised
    as it was.
    """
    recording = _Recording(requests)
    try:
        return method(recording, timeout=timeout)
    except grpc.RpcError as exc:
        if recording.error is not None:
            raise recording.error from None
        raise error_from_rpc(exc) from None
