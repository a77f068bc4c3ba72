"""Downloads are sent again by the typed client, never retried inside gRPC: grpc's retry
of a server-streaming call whose sidecar was killed before its first message could wait
past the call's deadline, forever. Client streams keep gRPC's retry policy. An UNAVAILABLE
the sidecar answers itself, after its own MLflow retries, is sent again by neither."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from mlflow_sidecar.client.channel import channel_options
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.errors import ErrorReason, UnavailableError
from mlflow_sidecar.server.interceptors import abort_with_error
from mlflow_sidecar.v1 import registry_pb2_grpc, tracking_pb2_grpc

ATTEMPTS = 3
PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"


class _Unavailable:
    """Every method of both services answers UNAVAILABLE, recording each call's metadata:
    as grpc does for a server on its way down, or, `as_sidecar`, as the sidecar does once
    MLflow stayed unreachable through its retries."""

    def __init__(self, *, as_sidecar: bool = False) -> None:
        self.calls: dict[str, list[dict[str, str]]] = {}
        self._as_sidecar = as_sidecar
        self._lock = threading.Lock()

    def handler(self, method: str, streaming: bool) -> grpc.RpcMethodHandler[Any, Any]:
        def behave(request: bytes, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.calls.setdefault(method, []).append(dict(context.invocation_metadata()))
            if self._as_sidecar:
                abort_with_error(
                    context,
                    UnavailableError(
                        "MLflow is unavailable", reason=ErrorReason.MLFLOW_UNAVAILABLE
                    ),
                )
            context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is restarting")

        def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            behave(request, context)
            yield b""

        def upload(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            for _ in requests:
                pass
            return behave(b"", context)

        if method.startswith("Upload"):
            return grpc.stream_unary_rpc_method_handler(upload)
        if streaming:
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(behave)


def _serve(fake: _Unavailable) -> tuple[grpc.Server, grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    for service, methods in (
        (
            "mlflow_sidecar.v1.ModelRegistryService",
            {"DownloadModel": True, "GetModelVersion": False, "UploadModel": False},
        ),
        (
            "mlflow_sidecar.v1.ExperimentTrackingService",
            {"DownloadArtifact": True, "UploadArtifact": False},
        ),
    ):
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    service, {m: fake.handler(m, s) for m, s in methods.items()}
                ),
            )
        )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=channel_options(8 * 1024 * 1024, ATTEMPTS)
    )
    return server, channel


@pytest.fixture()
def sidecar() -> Iterator[tuple[_Unavailable, grpc.Channel]]:
    fake = _Unavailable()
    server, channel = _serve(fake)
    yield fake, channel
    channel.close()
    server.stop(0)


@pytest.fixture()
def sidecar_without_mlflow() -> Iterator[tuple[_Unavailable, grpc.Channel]]:
    fake = _Unavailable(as_sidecar=True)
    server, channel = _serve(fake)
    yield fake, channel
    channel.close()
    server.stop(0)


def test_downloads_are_sent_again_by_the_client_not_by_grpc(sidecar, tmp_path) -> None:
    fake, channel = sidecar
    registry = GrpcModelRegistry(
        registry_pb2_grpc.ModelRegistryServiceStub(channel), upload_attempts=ATTEMPTS
    )
    tracking = GrpcExperimentTracking(
        tracking_pb2_grpc.ExperimentTrackingServiceStub(channel), upload_attempts=ATTEMPTS
    )
    with pytest.raises(UnavailableError):
        registry.download_model("m", tmp_path / "model", version=1)
    with pytest.raises(UnavailableError):
        tracking.download_artifact("r" * 32, "a.bin", tmp_path / "artifacts")
    for method in ("DownloadModel", "DownloadArtifact"):
        assert len(fake.calls[method]) == ATTEMPTS
        assert not any(PREVIOUS_ATTEMPTS in call for call in fake.calls[method])
    assert list(tmp_path.iterdir()) == []  # nothing left behind by any try

    # The check can tell: a client stream is retried by gRPC, which says so in its metadata.
    upload = channel.stream_unary("/mlflow_sidecar.v1.ExperimentTrackingService/UploadArtifact")
    with pytest.raises(grpc.RpcError):
        upload(iter([b""]), timeout=30)
    tries = fake.calls["UploadArtifact"]
    assert [call.get(PREVIOUS_ATTEMPTS) for call in tries] == [None, "1", "2"]


def test_an_unavailable_the_sidecar_answers_is_sent_once_but_an_upload_again(
    sidecar_without_mlflow, tmp_path
):
    fake, channel = sidecar_without_mlflow
    registry = GrpcModelRegistry(
        registry_pb2_grpc.ModelRegistryServiceStub(channel), upload_attempts=ATTEMPTS
    )
    tracking = GrpcExperimentTracking(
        tracking_pb2_grpc.ExperimentTrackingServiceStub(channel), upload_attempts=ATTEMPTS
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"w")
    transfers = {
        "DownloadModel": lambda: registry.download_model("m", tmp_path / "got", version=1),
        "UploadModel": lambda: registry.upload_model("m", model, experiment_id="1"),
        "DownloadArtifact": lambda: tracking.download_artifact("r" * 32, "a.bin", tmp_path),
        "UploadArtifact": lambda: tracking.upload_artifact("r" * 32, model / "w.bin"),
    }
    for method, transfer in transfers.items():
        with pytest.raises(UnavailableError) as err:
            transfer()
        assert err.value.reason == ErrorReason.MLFLOW_UNAVAILABLE
        # A download the sidecar retried MLflow for goes once; an upload, whose bytes the
        # sidecar cannot send to MLflow twice, is sent again whole.
        expected = ATTEMPTS if method.startswith("Upload") else 1
        assert len(fake.calls[method]) == expected, method
