"""The client channel: retry service config (UNAVAILABLE only), keepalive, message limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc

from mlflow_sidecar.client.settings import ClientSettings

SERVICE_NAMES = (
    "mlflow_sidecar.v1.ExperimentTrackingService",
    "mlflow_sidecar.v1.ModelRegistryService",
)


def service_config(max_attempts: int = 5) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff, nothing else (gRFC A6).

    Every method is retried: each mutating RPC carries a `request_id` (the typed client
    keeps it across tries) or is idempotent, so a repeat has one effect. What these retries
    are for is the transport-level UNAVAILABLE of a sidecar briefly unreachable. An
    UNAVAILABLE the sidecar itself answers (MLflow stayed unreachable through its own
    `retry.max_tries`) carries `grpc-retry-pushback-ms: -1`, which grpc honours by not
    retrying: one client call costs at most `retry.max_tries` MLflow attempts."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": name} for name in SERVICE_NAMES],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def channel_options(max_message_bytes: int, max_attempts: int) -> list[tuple[str, int | str]]:
    """Channel arguments shared by every sidecar channel; `max_attempts` 1 turns retries off
    (gRPC's retry policy itself needs at least 2)."""
    retries: list[tuple[str, int | str]] = (
        [("grpc.service_config", service_config(max_attempts)), ("grpc.enable_retries", 1)]
        if max_attempts >= 2
        else [("grpc.enable_retries", 0)]
    )
    return [
        *retries,
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def tls_credentials(settings: ClientSettings) -> grpc.ChannelCredentials:
    """Server verification from `root_certificates_file` (or system roots); a client
    certificate for mTLS when `client_cert_file` and `client_key_file` are set."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.root_certificates_file),
        private_key=_read(settings.client_key_file),
        certificate_chain=_read(settings.client_cert_file),
    )


def open_channel(settings: ClientSettings) -> Iterator[grpc.Channel]:
    """Yield a channel to the sidecar and close it afterwards (a dependency-injector Resource)."""
    options = channel_options(settings.max_message_bytes, settings.max_attempts)
    if settings.tls:
        channel = grpc.secure_channel(settings.target, tls_credentials(settings), options=options)
    else:
        channel = grpc.insecure_channel(settings.target, options=options)
    try:
        if settings.token:
            yield grpc.intercept_channel(channel, BearerTokenInterceptor(settings.token))
        else:
            yield channel
    finally:
        channel.close()


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(
        self, base: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call (plaintext channels included)."""

    def __init__(self, token: str) -> None:
        self._header: tuple[str, str | bytes] = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _ClientCallDetails:
        return _ClientCallDetails(details, (*(details.metadata or ()), self._header))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)
