"""Bearer-token authentication of every RPC except health checks."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc

from mlflow_sidecar.core.errors import UnauthenticatedError
from mlflow_sidecar.server.interceptors import abort_with_error

log = logging.getLogger(__name__)

_EXEMPT_PREFIX = "/grpc.health.v1.Health/"


class AuthInterceptor(grpc.ServerInterceptor):
    """Admits calls whose `authorization` metadata is `Bearer <token>` for a configured token.

    Tokens are compared in constant time, against every configured token, so neither the
    match nor its position leaks through timing. Tokens never reach the log.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("AuthInterceptor needs at least one token")
        self._tokens = tuple(t.encode() for t in tokens)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT_PREFIX):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        return _refusal(handler, handler_call_details.method, problem)

    def _problem(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            return "missing authorization metadata (expected 'Bearer <token>')"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "authorization metadata must be 'Bearer <token>'"
        presented = token.strip().encode()
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(presented, known)
        return None if matched else "invalid bearer token"


def _refusal(handler: grpc.RpcMethodHandler[Any, Any], method: str, problem: str) -> Any:
    def refuse(_request: Any, context: grpc.ServicerContext) -> NoReturn:
        # Logged here, in the call, where the access log has set its request id.
        log.warning("refused %s: %s", method, problem)
        # This handler replaces the call's own, so the error mapping never sees it: it
        # reports the refusal through the same mapping itself.
        abort_with_error(context, UnauthenticatedError(problem))

    shape = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[shape]
    return factory(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
