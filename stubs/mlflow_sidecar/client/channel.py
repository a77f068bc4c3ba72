"""The client channel: retry service config (UNAVAILABLE only), keepalive, message limits,
and its lifetime: a `SharedChannel` stays open while any stub made from it is alive, closes
when the last one is gone or on `close()`, and refuses calls after `close()` or in a forked
child with our own FailedPreconditionError instead of gRPC's raw ValueError or a hang."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from mlflow_sidecar.client.call_interceptor import CallInterceptor, with_metadata
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.core.errors import ClientErrorReason, FailedPreconditionError

CLIENT_CLOSED = ClientErrorReason.CLIENT_CLOSED
"""Reason of the error a call on a closed channel (or metric stream) raises."""

CHANNEL_USED_AFTER_FORK = ClientErrorReason.CHANNEL_USED_AFTER_FORK
"""Reason of the error a call in a forked child on its parent's channel raises."""

SERVICE_NAMES = (
    "mlflow_sidecar.v1.ExperimentTrackingService",
    "mlflow_sidecar.v1.ModelRegistryService",
)

SERVER_STREAMING_METHODS = (
    ("mlflow_sidecar.v1.ExperimentTrackingService", "DownloadArtifact"),
    ("mlflow_sidecar.v1.ExperimentTrackingService", "DownloadLoggedModelArtifact"),
    ("mlflow_sidecar.v1.ModelRegistryService", "DownloadModel"),
    ("mlflow_sidecar.v1.ModelRegistryService", "WatchModelAlias"),
)


def service_config(max_attempts: int = 5) -> str:
    """gRPC service config: retry UNAVAILABLE with exponential backoff, nothing else (gRFC A6).

    Every method is retried: each mutating RPC carries a `request_id` (the typed client
    keeps it across tries) or is idempotent, so a repeat has one effect. What these retries
    are for is the transport-level UNAVAILABLE of a sidecar briefly unreachable. An
    UNAVAILABLE the sidecar itself answers (MLflow stayed unreachable through its own
    `retry.max_tries`) carries `grpc-retry-pushback-ms: -1`, which grpc honours by not
    retrying: one client call costs at most `retry.max_tries` MLflow attempts.

    Server-streaming methods are not retried by gRPC: a download whose sidecar was killed
    before its first message was retried by grpc onto the restarted sidecar and then
    waited past its deadline, forever. The typed client sends a download again itself,
    and a watch reopens its stream."""
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
                },
                # A method's own entry wins over its service's: no retryPolicy, no retries.
                {
                    "name": [
                        {"service": service, "method": method}
                        for service, method in SERVER_STREAMING_METHODS
                    ]
                },
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
        # The sidecar runs next to the trainer: once it is back from a restart, reach it
        # within seconds, not after gRPC's default reconnect backoff of up to two minutes
        # (calls fail at once while the channel waits, eating a stream's reconnect window).
        ("grpc.max_reconnect_backoff_ms", 5_000),
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


class SharedChannel:
    """One channel to the sidecar, shared by the stubs and clients made from `channel`.

    Every stub made from `channel` holds this channel (through its interceptors), so the
    channel lives as long as any of them, whoever dropped the container that made it; it
    closes when the last is gone, or at once on `close()`. A call after `close()` raises
    FailedPreconditionError (reason CLIENT_CLOSED); a call from a forked child raises
    FailedPreconditionError (reason CHANNEL_USED_AFTER_FORK), as a gRPC channel belongs to
    the process that opened it."""

    def __init__(self, settings: ClientSettings) -> None:
        options = channel_options(settings.max_message_bytes, settings.max_attempts)
        if settings.tls:
            raw = grpc.secure_channel(settings.target, tls_credentials(settings), options=options)
        else:
            raw = grpc.insecure_channel(settings.target, options=options)
        self._raw = raw
        self.pid = os.getpid()
        self.closed = False
        interceptors: list[Any] = [_ChannelGuard(self)]
        if settings.token:
            interceptors.append(BearerTokenInterceptor(settings.token))
        tracing = _trace_context_interceptor()
        if tracing is not None:
            interceptors.append(tracing)
        self.channel: grpc.Channel = grpc.intercept_channel(raw, *interceptors)

    def close(self) -> None:
        """Close the channel: calls in progress are cancelled, later ones raise
        FailedPreconditionError (CLIENT_CLOSED). Closing again does nothing."""
        self.closed = True
        self._raw.close()

    def check_usable(self) -> None:
        """Raise FailedPreconditionError if the channel is closed or this is a forked child."""
        if self.closed:
            raise FailedPreconditionError(
                "the sidecar client is closed (close() or shutdown_resources() was called):"
                " make a new ClientContainer",
                reason=CLIENT_CLOSED,
            )
        if os.getpid() != self.pid:
            raise FailedPreconditionError(
                f"this sidecar channel was opened in process {self.pid}, not in this one"
                f" ({os.getpid()}): a channel does not survive fork, make a new"
                " ClientContainer in the child",
                reason=CHANNEL_USED_AFTER_FORK,
                metadata={"opened_in_pid": str(self.pid), "pid": str(os.getpid())},
            )


def _trace_context_interceptor() -> Any | None:
    """Trace context propagation when `opentelemetry-api` is installed, else None."""
    try:
        from mlflow_sidecar.client.trace_context import trace_context_interceptor
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("opentelemetry"):
            return None
        raise
    return trace_context_interceptor()


class _ChannelGuard(CallInterceptor):
    """Checks the channel before every call. Holding its `SharedChannel` is what keeps the
    channel open while a stub lives (stubs hold their interceptors)."""

    def __init__(self, owner: SharedChannel) -> None:
        self._owner = owner

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        self._owner.check_usable()
        outcome = continuation(details, request)
        if self._owner.closed:
            # Closed between the check and the call: gRPC reports a closed channel with
            # a ValueError (inside a failed outcome); say it our way.
            failed = isinstance(outcome, grpc.Future) and outcome.done()
            if failed and isinstance(outcome.exception(), ValueError):
                self._owner.check_usable()
        return outcome


class BearerTokenInterceptor(CallInterceptor):
    """Adds `authorization: Bearer <token>` to every call (plaintext channels included)."""

    def __init__(self, token: str) -> None:
        self._header: tuple[str, str | bytes] = ("authorization", f"Bearer {token}")

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(with_metadata(details, self._header), request)
