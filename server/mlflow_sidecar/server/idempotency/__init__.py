"""One call, one effect: the request ledger and the interceptor that consults it."""

from mlflow_sidecar.server.idempotency.interceptor import IdempotencyInterceptor
from mlflow_sidecar.server.idempotency.ledger import (
    CLIENT_REQUEST_ID_TAG,
    REQUEST_ID_TAG,
    RequestLedger,
    check_request_id,
    fingerprint,
    older_fingerprints,
    request_id_reused,
)

__all__ = [
    "CLIENT_REQUEST_ID_TAG",
    "REQUEST_ID_TAG",
    "IdempotencyInterceptor",
    "RequestLedger",
    "check_request_id",
    "fingerprint",
    "older_fingerprints",
    "request_id_reused",
]
