"""A transfer that finds the sidecar unreachable is sent again once the sidecar is back, as
a unary call is retried: the typed client waits for its channel to reconnect first, within
the transfer's timeout, instead of spending its tries while the sidecar restarts."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import NotFoundError

# Connections the client's channel makes to the sidecar while it is down before the
# sidecar comes back: more than a client that does not wait makes before it gives up.
RECONNECTS = 8


class _Restarting:
    """A port on which a sidecar is on its way back: every connection is accepted and
    closed at once (the client's channel fails to connect), and counted."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen()
        self._socket.settimeout(0.1)
        self.port = int(self._socket.getsockname()[1])
        self.reconnected = threading.Event()
        self._stop = threading.Event()
        self._accepted = 0
        self._thread = threading.Thread(target=self._refuse)
        self._thread.start()

    def _refuse(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            connection.close()
            self._accepted += 1
            if self._accepted >= RECONNECTS:
                self.reconnected.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def _not_found(port: int) -> grpc.Server:
    """The sidecar back on `port`: DownloadModel answers NOT_FOUND."""

    def download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        yield b""

    handler = grpc.method_handlers_generic_handler(
        "mlflow_sidecar.v1.ModelRegistryService",
        {"DownloadModel": grpc.unary_stream_rpc_method_handler(download)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


@pytest.fixture()
def restarting() -> Iterator[_Restarting]:
    sidecar = _Restarting()
    yield sidecar
    sidecar.close()


def test_a_download_waits_for_a_restarting_sidecar(restarting: _Restarting, tmp_path: Path):
    container = ClientContainer()
    container.config.from_dict(
        {
            "target": f"127.0.0.1:{restarting.port}",
            "max_attempts": 2,
            "transfer_timeout_s": 60,
        }
    )
    registry = container.model_registry()
    outcome: list[BaseException] = []
    finished = threading.Event()

    def download() -> None:
        try:
            registry.download_model("m", tmp_path / "model", version=1)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            finished.set()

    downloading = threading.Thread(target=download)
    downloading.start()
    servers: list[Any] = []
    try:
        # The sidecar is back only once the download has found it down and its channel
        # has tried to reconnect many times over: a download that did not wait for it
        # has given up by then.
        while not finished.wait(0.05) and not restarting.reconnected.is_set():
            pass
        restarting.close()
        servers.append(_not_found(restarting.port))
        downloading.join()
    finally:
        for server in servers:
            server.stop(0)
        container.shutdown_resources()
    assert len(outcome) == 1 and isinstance(outcome[0], NotFoundError), outcome
