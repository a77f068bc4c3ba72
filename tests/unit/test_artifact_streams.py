"""Streamed artifact transfers against a small HTTP server standing in for MLflow's artifact
proxy. Uploads: the body arrives whole on commit, is cut short (never completed) on abort,
and a PUT that fails makes commit answer with the error. Downloads: bytes come as they arrive;
an answer without Content-Length streams with the listed size (regrouped into full chunks),
or is left to the file path when no size is known; one short of or beyond its size is
DATA_LOSS."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import grpc
import pytest
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

from mlflow_sidecar.core.errors import SidecarError
from mlflow_sidecar.server.mlflow_gateway.artifact_streams import StreamedUpload, open_download


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes, int]]] = []
    status: ClassVar[int] = 200
    download: ClassVar[bytes] = b""
    missing: ClassVar[int] = 0

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        received = b""
        while len(received) < length:
            block = self.rfile.read(min(65536, length - len(received)))
            if not block:
                break
            received += block
        self.bodies.append((self.path, received, length))
        if len(received) == length:
            self.send_response(self.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("/no-length.bin"):
            self.end_headers()  # HTTP/1.0: the body runs until the connection closes
            self.wfile.write(b"abc")
            return
        if self.path.endswith("/unsized.bin"):
            # As MLflow's server streams a file from an object store: no length, and
            # pieces of the sender's size.
            self.end_headers()
            for start in range(0, len(self.download), 1000):
                self.wfile.write(self.download[start : start + 1000])
                self.wfile.flush()
            return
        self.send_header("Content-Length", str(len(self.download) + self.missing))
        self.end_headers()
        self.wfile.write(self.download)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def repo() -> Iterator[HttpArtifactRepository]:
    _Recorder.bodies = []
    _Recorder.status = 200
    _Recorder.download = b""
    _Recorder.missing = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpArtifactRepository(f"http://127.0.0.1:{server.server_port}/root")
    server.shutdown()
    server.server_close()


def _upload(repo: HttpArtifactRepository, chunks: list[bytes], seen: list[str]) -> StreamedUpload:
    upload = StreamedUpload(
        repo, "ckpt", "model.pt", sum(map(len, chunks)), lambda outcome, _s: seen.append(outcome)
    )
    for chunk in chunks:
        upload.write(chunk)
    return upload


def test_commit_sends_the_whole_body(repo):
    chunks = [bytes([i]) * 70_000 for i in range(5)]
    seen: list[str] = []
    upload = _upload(repo, chunks, seen)
    assert upload.commit() is None
    assert _Recorder.bodies == [("/root/ckpt/model.pt", b"".join(chunks), 350_000)]
    assert seen == ["ok"]
    assert upload.abort() is False  # nothing to cut after a commit


def test_abort_never_completes_the_body(repo):
    chunks = [bytes([i]) * 70_000 for i in range(5)]
    seen: list[str] = []
    upload = _upload(repo, chunks, seen)
    assert upload.abort() is True
    deadline = time.monotonic() + 10
    while not _Recorder.bodies and time.monotonic() < deadline:
        time.sleep(0.01)  # the server notices the cut connection on its own thread
    _path, received, length = _Recorder.bodies[0]
    # The held-back chunk never left: the server saw a connection cut before the end.
    assert len(received) < length == 350_000
    assert seen == ["error"]


def test_a_refused_put_makes_commit_answer_with_the_error(repo):
    _Recorder.status = 403
    seen: list[str] = []
    upload = _upload(repo, [b"x" * 1000], seen)
    error = upload.commit()
    assert isinstance(error, SidecarError)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert seen == ["error"]


def test_a_download_streams_its_bytes_in_chunks(repo):
    _Recorder.download = bytes(range(256)) * 1000
    download = open_download(repo, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    assert download.size_bytes == len(_Recorder.download)
    chunks = list(download.chunks)
    assert max(map(len, chunks)) <= 64 * 1024
    assert b"".join(chunks) == _Recorder.download


def test_a_download_without_content_length_is_left_to_the_file_path(repo):
    assert open_download(repo, "ckpt/no-length.bin", 64 * 1024) is None


def test_a_download_cut_short_is_an_error_not_a_short_file(repo):
    _Recorder.download = b"x" * 1000
    _Recorder.missing = 10
    download = open_download(repo, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    with pytest.raises(SidecarError):
        b"".join(download.chunks)


def test_a_download_without_length_streams_with_the_listed_size_in_full_chunks(repo):
    _Recorder.download = bytes(range(256)) * 1000
    download = open_download(repo, "ckpt/unsized.bin", 64 * 1024, len(_Recorder.download))
    assert download is not None
    assert download.size_bytes == len(_Recorder.download)
    chunks = list(download.chunks)
    assert [len(c) for c in chunks[:-1]] == [64 * 1024] * (len(chunks) - 1)
    assert b"".join(chunks) == _Recorder.download


@pytest.mark.parametrize("listed", [255_999, 256_001])
def test_an_unsized_download_that_differs_from_its_listing_is_data_loss(repo, listed):
    _Recorder.download = bytes(range(256)) * 1000
    download = open_download(repo, "ckpt/unsized.bin", 64 * 1024, listed)
    assert download is not None
    with pytest.raises(SidecarError) as failed:
        b"".join(download.chunks)
    assert failed.value.code == grpc.StatusCode.DATA_LOSS
