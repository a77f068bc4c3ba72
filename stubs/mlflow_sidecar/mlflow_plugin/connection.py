"""One sidecar connection per target and process, shared by every store MLflow builds.

MLflow builds a store (and an artifact repository) for nearly every client it makes, so
the channel, the typed clients and the metric stream live here, keyed by the URI's
target and scheme, instead of in the stores.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mlflow_sidecar.client.channel import SharedChannel
from mlflow_sidecar.client.grpc_logged_models import GrpcLoggedModels
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.client.settings import ClientEnvSettings, ClientSettings
from mlflow_sidecar.core.errors import ErrorReason, FailedPreconditionError
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc

SCHEME = "sidecar"
TLS_SCHEME = "sidecar+tls"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SidecarUri:
    """A `sidecar://host:port[/path]` or `sidecar+tls://host:port[/path]` URI, split."""

    scheme: str
    target: str
    path: str

    @classmethod
    def parse(cls, uri: str) -> SidecarUri:
        """Split `uri`; ValueError names what is wrong with it."""
        parts = urlsplit(uri)
        if parts.scheme not in (SCHEME, TLS_SCHEME):
            raise ValueError(f"{uri!r} is not a {SCHEME}:// or {TLS_SCHEME}:// URI")
        if not parts.netloc:
            raise ValueError(f"{uri!r} names no sidecar: expected {parts.scheme}://HOST:PORT")
        if parts.query or parts.fragment:
            raise ValueError(f"{uri!r}: a sidecar URI takes no query or fragment")
        return cls(parts.scheme, parts.netloc, parts.path.strip("/"))

    @property
    def tls(self) -> bool:
        """Whether the scheme asks for TLS."""
        return self.scheme == TLS_SCHEME

    @property
    def root(self) -> str:
        """The URI of the sidecar itself, without a path."""
        return f"{self.scheme}://{self.target}"


def settings_for(uri: SidecarUri) -> ClientSettings:
    """The client's environment settings with the URI's target and TLS choice on top,
    checked together (a CA file from the environment goes with a `sidecar+tls://` URI).
    `MLFLOW_SIDECAR_CLIENT_TLS=true` with a plaintext `sidecar://` URI is a ValueError: the
    URI's choice would send every call, and the token, in the clear."""
    env = ClientEnvSettings()
    if env.tls and "tls" in env.model_fields_set and not uri.tls:
        raise ValueError(
            f"MLFLOW_SIDECAR_CLIENT_TLS=true, but the tracking URI {uri.root} asks for a"
            f" plaintext channel: use {TLS_SCHEME}://{uri.target}, or unset the variable"
        )
    values = env.model_dump()
    values.update(target=uri.target, tls=uri.tls)
    return ClientSettings(**values)


@dataclass
class SidecarConnection:
    """The channel, typed clients and (once a point is logged) the metric stream of one
    sidecar."""

    root: str
    settings: ClientSettings
    channel: SharedChannel
    tracking: GrpcExperimentTracking
    registry: GrpcModelRegistry
    models: GrpcLoggedModels
    _stream: MetricStream | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, uri: SidecarUri) -> SidecarConnection:
        """Open a channel to the sidecar `uri` names."""
        settings = settings_for(uri)
        channel = SharedChannel(settings)
        tracking = GrpcExperimentTracking(
            tracking_pb2_grpc.ExperimentTrackingServiceStub(channel.channel),
            settings.timeout_s,
            transfer_timeout_s=settings.transfer_timeout_s,
            chunk_bytes=settings.upload_chunk_bytes,
            download_chunk_bytes=settings.download_chunk_bytes,
            upload_attempts=settings.max_attempts,
            reconnect=channel.reconnect,
        )
        registry = GrpcModelRegistry(
            registry_pb2_grpc.ModelRegistryServiceStub(channel.channel),
            settings.timeout_s,
            transfer_timeout_s=settings.transfer_timeout_s,
            chunk_bytes=settings.upload_chunk_bytes,
            download_chunk_bytes=settings.download_chunk_bytes,
            upload_attempts=settings.max_attempts,
            reconnect=channel.reconnect,
        )
        models = GrpcLoggedModels(
            tracking_pb2_grpc.ExperimentTrackingServiceStub(channel.channel),
            settings.timeout_s,
            transfer_timeout_s=settings.transfer_timeout_s,
            chunk_bytes=settings.upload_chunk_bytes,
            download_chunk_bytes=settings.download_chunk_bytes,
            upload_attempts=settings.max_attempts,
            reconnect=channel.reconnect,
        )
        return cls(uri.root, settings, channel, tracking, registry, models)

    def stream(self) -> MetricStream:
        """The connection's metric stream, opened on first use."""
        stream = self._stream
        if stream is None:
            with self._lock:
                if self._stream is None:
                    self._stream = MetricStream(
                        tracking_pb2_grpc.ExperimentTrackingServiceStub(self.channel.channel),
                        max_message_bytes=self.settings.metric_message_bytes,
                        max_buffered_points=self.settings.stream_buffer_points,
                        when_full=self.settings.stream_when_full,
                        retry_budget_s=self.settings.stream_reconnect_s,
                    )
                stream = self._stream
        return stream

    def flush_stream(self, *, report_dropped: bool = False) -> None:
        """Hand every point logged so far to the sidecar's spool; raises the stream's error
        and, with `report_dropped`, the points it dropped of a run ended meanwhile."""
        stream = self._stream
        if stream is not None:
            stream.flush(report_dropped=report_dropped)

    def run_resumed(self, run_id: str) -> None:
        """The run was resumed: the stream takes its points again, if it refused them."""
        stream = self._stream
        if stream is not None:
            stream.resumed(run_id)

    def close(self) -> None:
        """Flush and close the stream, then the channel."""
        with self._lock:
            stream, self._stream = self._stream, None
        try:
            if stream is not None:
                stream.close()
        except FailedPreconditionError as exc:
            if exc.reason != ErrorReason.RUN_ENDED:
                raise
            # The stream logged the drop when it happened; the other runs' points are in.
            _log.warning("%s", exc.message)
        finally:
            self.channel.close()


_CONNECTIONS: dict[tuple[int, str], SidecarConnection] = {}
_CONNECTIONS_LOCK = threading.Lock()


def connection_for(uri: str) -> SidecarConnection:
    """The process's connection to the sidecar `uri` names (opened on first use)."""
    parsed = SidecarUri.parse(uri)
    key = (os.getpid(), parsed.root)
    with _CONNECTIONS_LOCK:
        connection = _CONNECTIONS.get(key)
        if connection is None:
            connection = _CONNECTIONS[key] = SidecarConnection.open(parsed)
        return connection


class ProcessConnection:
    """The connection to a sidecar of whichever process uses it: MLflow keeps its stores
    across a fork, and a channel does not survive one, so a forked child gets its own."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._pid = os.getpid()
        self._connection = connection_for(uri)

    def get(self) -> SidecarConnection:
        """This process's connection."""
        if self._pid != os.getpid():
            self._connection = connection_for(self._uri)
            self._pid = os.getpid()
        return self._connection


def close_all() -> None:
    """Close every connection of this process; points still buffered go to the spool first."""
    with _CONNECTIONS_LOCK:
        mine = [key for key in _CONNECTIONS if key[0] == os.getpid()]
        connections = [_CONNECTIONS.pop(key) for key in mine]
    for connection in connections:
        connection.close()


# A trainer that exits without ending its run still hands its buffered points to the spool.
atexit.register(close_all)
