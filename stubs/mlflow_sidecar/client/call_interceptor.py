"""The one shape of the client's gRPC interceptors: every kind of call goes through `_call`.

grpc asks for four methods (unary/stream requests x unary/stream responses); the client's
interceptors treat all four alike, so they implement `_call` once here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class CallDetails(grpc.ClientCallDetails):
    """A call's details with its metadata replaced (grpc's own type is a read-only ABC)."""

    def __init__(
        self, base: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


def with_metadata(details: grpc.ClientCallDetails, *extra: tuple[str, str | bytes]) -> CallDetails:
    """`details` with `extra` appended to its metadata."""
    return CallDetails(details, (*(details.metadata or ()), *extra))


class CallInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Intercepts every kind of call with one method, `_call(continuation, details,
    request_or_iterator)`, which must return what `continuation` returns."""

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        raise NotImplementedError

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request_iterator)
