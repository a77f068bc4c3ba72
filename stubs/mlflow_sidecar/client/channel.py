"""The client channel: retries (UNAVAILABLE only), reconnect backoff, keepalive, message limits,
and its lifetime: a `SharedChannel` stays open while any stub made from it is alive, closes
when the last one is gone or on `close()`, and refuses calls after `close()` or in a forked
child with our own FailedPreconditionError instead of gRPC's raw ValueError or a hang."""

from __future__ import annotations

import atexit
import json
import os
import weakref
from collections.abc import Callable
from typing import Any

import grpc

from mlflow_sidecar.client.call_interceptor import CallInterceptor, with_metadata
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.client.tls_files import read_pem
from mlflow_sidecar.client.unary_retry import Reconnect, UnaryRetry
from mlflow_sidecar.core.errors import ClientErrorReason, FailedPreconditionError

CLIENT_CLOSED = ClientErrorReason.CLIENT_CLOSED
"""Reason of the error a call on a closed channel (or metric stream) raises."""

CHANNEL_USED_AFTER_FORK = ClientErrorReason.CHANNEL_USED_AFTER_FORK
"""Reason of the error a call in a forked child on its parent's channel raises."""

# What gRPC's own retry policy retries: a client stream it can replay from its buffer.
# Unary calls are UnaryRetry's; server streams are sent again by the typed clients.
CLIENT_STREAMING_METHODS = (
    ("mlflow_sidecar.v1.ExperimentTrackingService", "StreamMetrics"),
    ("mlflow_sidecar.v1.ExperimentTrackingService", "UploadArtifact"),
    ("mlflow_sidecar.v1.ExperimentTrackingService", "UploadLoggedModelArtifact"),
    ("mlflow_sidecar.v1.ModelRegistryService", "UploadModel"),
)

RECONNECT_BACKOFF_MS = (100, 1_000)
"""The channel's first and largest pause between attempts to reconnect to the sidecar."""


def service_config(max_attempts: int = 5) -> str:
    """gRPC service config: retry UNAVAILABLE of client-streaming calls with exponential
    backoff, nothing else (gRFC A6).

    Unary calls are retried by `UnaryRetry` on every channel a `SharedChannel` makes, which
    waits for the channel to reconnect between tries: gRPC's policy retries at once after
    a short random pause, and spent every try of a call made while the channel was still
    in its reconnect backoff after a sidecar restart. An UNAVAILABLE the sidecar itself
    answers (MLflow stayed unreachable through its own `retry.max_tries`) carries
    `grpc-retry-pushback-ms: -1`, which both honour by not retrying: one client call costs
    at most `retry.max_tries` MLflow attempts. Every mutating RPC carries a `request_id`
    (the typed client keeps it across tries) or is idempotent, so a repeat has one effect.

    Server-streaming methods are not retried by gRPC: a download whose sidecar was killed
    before its first message was retried by grpc onto the restarted sidecar and then
    waited past its deadline, forever. The typed client sends a download again itself,
    and a watch reopens its stream."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [
                        {"service": service, "method": method}
                        for service, method in CLIENT_STREAMING_METHODS
                    ],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
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
    initial_ms, max_ms = RECONNECT_BACKOFF_MS
    return [
        *retries,
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # The sidecar runs next to the trainer: once it is back from a restart, reach it
        # within about a second, not after gRPC's default reconnect backoff of up to two
        # minutes: a call waits for the channel to reconnect, and a stream's reconnect
        # window runs meanwhile. A refused connection on loopback costs next to nothing.
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", max_ms),
    ]


def _read(settings: ClientSettings, setting: str) -> bytes | None:
    path: str = getattr(settings, setting)
    return read_pem(setting, path) if path else None


def tls_credentials(settings: ClientSettings) -> grpc.ChannelCredentials:
    """Server verification from `root_certificates_file` (or system roots); a client
    certificate for mTLS when `client_cert_file` and `client_key_file` are set. A file
    that cannot be read (since the settings were checked) is a ValueError naming it."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings, "root_certificates_file"),
        private_key=_read(settings, "client_key_file"),
        certificate_chain=_read(settings, "client_cert_file"),
    )


# Every channel not yet closed, so that the interpreter's exit closes what is left.
_OPEN: weakref.WeakSet[SharedChannel] = weakref.WeakSet()


def _close_at_exit() -> None:
    """Close this process's channels still open at interpreter exit.

    A channel that waited for the sidecar to reconnect keeps gRPC's connectivity poller
    running for a moment after the wait. Left to the garbage collection of interpreter
    shutdown, which is where a channel held by a module-level container ends, gRPC's close
    waits for that poller, a daemon thread Python no longer runs by then: the process hung
    after its last line. Here the poller still runs, and the close takes a moment."""
    for channel in list(_OPEN):
        # A forked child's copies belong to its parent.
        if channel.pid == os.getpid():
            channel.close()


# Registered on import, before anything that builds on the client (the MLflow plugin's
# exit hook flushes its streams through these channels), so it runs after them.
atexit.register(_close_at_exit)


class SharedChannel:
    """One channel to the sidecar, shared by the stubs and clients made from `channel`.

    Every stub made from `channel` holds this channel (through its interceptors), so the
    channel lives as long as any of them, whoever dropped the container that made it; it
    closes when the last is gone, or at once on `close()`. A call after `close()` raises
    FailedPreconditionError (reason CLIENT_CLOSED); a call from a forked child raises
    FailedPreconditionError (reason CHANNEL_USED_AFTER_FORK), as a gRPC channel belongs to
    the process that opened it. One still open at interpreter exit is closed then."""

    def __init__(self, settings: ClientSettings) -> None:
        options = channel_options(settings.max_message_bytes, settings.max_attempts)
        if settings.tls:
            raw = grpc.secure_channel(settings.target, tls_credentials(settings), options=options)
        else:
            raw = grpc.insecure_channel(settings.target, options=options)
        self._raw = raw
        self.pid = os.getpid()
        self.closed = False
        # The wait for the sidecar to come back, before a unary call's next try or a
        # transfer's next sending.
        self.reconnect = Reconnect(raw, self.check_usable)
        interceptors: list[Any] = [
            _ChannelGuard(self),
            # Inside the guard, outside the metadata: every try carries the token and
            # trace context again.
            UnaryRetry(
                self.reconnect,
                target=settings.target,
                max_attempts=settings.max_attempts,
                default_deadline_s=settings.timeout_s,
            ),
        ]
        if settings.token:
            interceptors.append(BearerTokenInterceptor(settings.token))
        tracing = _trace_context_interceptor()
        if tracing is not None:
            interceptors.append(tracing)
        self.channel: grpc.Channel = grpc.intercept_channel(raw, *interceptors)
        _OPEN.add(self)

    def close(self) -> None:
        """Close the channel: calls in progress are cancelled, later ones raise
        FailedPreconditionError (CLIENT_CLOSED). Closing again does nothing."""
        self.closed = True
        _OPEN.discard(self)
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
