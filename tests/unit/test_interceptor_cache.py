"""Interceptors wrap each method's handler once and reuse it while the handler underneath
stays the same object; a handler made for one call is wrapped afresh."""

from __future__ import annotations

import grpc
import pytest

from mlflow_sidecar.server.interceptors import AccessLogInterceptor, ErrorMappingInterceptor


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _handler() -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


@pytest.mark.parametrize("make", [AccessLogInterceptor, ErrorMappingInterceptor])
def test_a_method_handler_is_wrapped_once_and_rewrapped_when_it_changes(make):
    interceptor = make()
    handler, other = _handler(), _handler()
    first = interceptor.intercept_service(lambda _d: handler, _Details("/s/M"))
    again = interceptor.intercept_service(lambda _d: handler, _Details("/s/M"))
    assert again is first
    assert first.unary_unary is not handler.unary_unary
    fresh = interceptor.intercept_service(lambda _d: other, _Details("/s/M"))
    assert fresh is not first
    assert interceptor.intercept_service(lambda _d: None, _Details("/s/Unknown")) is None
