"""`IdempotencyInterceptor`: every unary RPC whose request has a `request_id` answers a
repeat of a call that succeeded with that call's answer, from the request ledger.

One mechanism for every such RPC, the way the error mapping is one mechanism: the
services stay free of ledger bookkeeping, and a new RPC with a `request_id` field is
covered by being declared. Streamed uploads carry their request id in a header, which
only their service reads; it consults the ledger itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from mlflow_sidecar.server.idempotency.ledger import (
    RequestLedger,
    check_request_id,
    fingerprint,
    older_fingerprints,
)
from mlflow_sidecar.server.interceptors import Behavior, CallType, WrappedHandlers

_FIELD = "request_id"


def _answer_class(method: str) -> type[Message] | None:
    """The response class of `/package.Service/Method` when it is a unary call whose
    request has a request id; None for every other method."""
    service_name, _, method_name = method.lstrip("/").rpartition("/")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return None
    found = service.methods_by_name.get(method_name)
    if (
        found is None
        or found.client_streaming
        or found.server_streaming
        or _FIELD not in found.input_type.fields_by_name
    ):
        return None
    return message_factory.GetMessageClass(found.output_type)


class IdempotencyInterceptor(grpc.ServerInterceptor):
    """Consults the ledger around unary calls that carry a request id."""

    def __init__(self, ledger: RequestLedger) -> None:
        self._ledger = ledger
        self._handlers = WrappedHandlers(self._wrap)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return self._handlers.get(continuation(handler_call_details), handler_call_details.method)

    def _wrap(self, behavior: Behavior, _call_type: CallType, method: str) -> Behavior:
        answer_class = _answer_class(method)
        if answer_class is None:
            return behavior
        ledger = self._ledger

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = check_request_id(_FIELD, getattr(request, _FIELD))
            if not request_id:
                return behavior(request, context)
            raw = ledger.once(
                method,
                request_id,
                fingerprint(request),
                lambda: cast(Message, behavior(request, context)).SerializeToString(),
                also=older_fingerprints(request),
            )
            return answer_class.FromString(raw)

        return unary
