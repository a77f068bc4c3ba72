"""Streamed artifact transfers against a small HTTP server standing in for MLflow's artifact
proxy. Uploads: the body arrives whole on commit, is cut short (never completed) on abort,
and a PUT that fails makes commit answer with the error; a PUT begun that MLflow kept
nothing of, cut or failed, is reported by abort (its directory may be left). Downloads:
bytes come as they arrive; an answer without Content-Length streams with the listed size
(regrouped into full chunks), or is left to the file path when no size is known; one short
of or beyond its size is DATA_LOSS. A download the server presigns is read from the object
store, not the proxy; an upload MLflow's client would send in presigned parts is not
streamed."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import ClassVar

import grpc
import pytest
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

from mlflow_sidecar.core.domain import FileInfo
from mlflow_sidecar.core.errors import DeadlineExceededError, ErrorReason, SidecarError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.artifact_writers import ArtifactWriters
from mlflow_sidecar.server.mlflow_gateway import artifact_streams
from mlflow_sidecar.server.mlflow_gateway.artifact_streams import (
    StreamedUpload,
    open_download,
    streams_upload,
)
from mlflow_sidecar.server.services.artifact_transfers import PendingUpload
from tests.support.processes import free_port

PRESIGN_PREFIX = "/api/2.0/mlflow-artifacts/presigned/root/"


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes, int]]] = []
    status: ClassVar[int] = 200
    download: ClassVar[bytes] = b""
    missing: ClassVar[int] = 0
    # GETs seen: (path, headers)
    gets: ClassVar[list[tuple[str, dict[str, str]]]] = []
    presign_status: ClassVar[int] = 200
    presigned_size: ClassVar[int | None] = None
    # Where the presigned URL points (None: this server) and what the "store" answers.
    store_address: ClassVar[str | None] = None
    store_status: ClassVar[int] = 200
    # The store's connection breaks after half the body it announced.
    store_cut: ClassVar[bool] = False
    # What a PUT is answered with besides its status (a proxy's login page, say).
    put_answer: ClassVar[bytes] = b""

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
            self.send_header("Content-Length", str(len(self.put_answer)))
            self.end_headers()
            self.wfile.write(self.put_answer)

    def do_GET(self) -> None:
        self.gets.append((self.path, dict(self.headers)))
        if self.path.startswith(PRESIGN_PREFIX):
            self._presign(self.path.removeprefix(PRESIGN_PREFIX))
            return
        if self.path.startswith("/bucket/"):
            if self.store_status != 200:
                self.send_response(self.store_status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.store_cut:
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.download)))
                self.end_headers()
                self.wfile.write(self.download[: len(self.download) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            # As S3 answers a presigned GET; no length, so that the size must come from
            # the presign answer.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(self.download)
            return
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

    def _presign(self, path: str) -> None:
        if self.presign_status != 200:
            self.send_response(self.presign_status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = len(self.download) if self.presigned_size is None else self.presigned_size
        host, port = self.server.server_address[:2]
        address = self.store_address or f"{host}:{port}"
        body = json.dumps(
            {
                "url": f"http://{address}/bucket/{path}?X-Amz-Signature=s1",
                "headers": {"x-amz-server-side-encryption": "AES256"},
                "file_size": size,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def repo() -> Iterator[HttpArtifactRepository]:
    _Recorder.bodies = []
    _Recorder.status = 200
    _Recorder.download = b""
    _Recorder.missing = 0
    _Recorder.gets = []
    _Recorder.presign_status = 200
    _Recorder.presigned_size = None
    _Recorder.store_address = None
    _Recorder.store_status = 200
    _Recorder.store_cut = False
    _Recorder.put_answer = b""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpArtifactRepository(f"http://127.0.0.1:{server.server_port}/root")
    server.shutdown()
    server.server_close()


@pytest.fixture()
def proxy(repo, monkeypatch) -> MlflowArtifactsRepository:
    """MLflow's artifact proxy on the same server, presigning downloads (as a server in
    front of S3 says in its /server-info; here the setting MLflow's client reads first)."""
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "true")
    # MLflow's credentials, so that the test sees whether they went along.
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-secret")
    host = repo.artifact_uri.split("//")[1].split("/")[0]
    return MlflowArtifactsRepository(
        f"mlflow-artifacts://{host}/root", tracking_uri=f"http://{host}"
    )


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


def _told(upload: StreamedUpload) -> SidecarError:
    pending = PendingUpload(
        None,  # type: ignore[arg-type]  # a streamed store needs neither gateway nor staging
        None,  # type: ignore[arg-type]
        "r",
        "ckpt/model.pt",
        upload,
        writers=ArtifactWriters(),
    )
    with pytest.raises(SidecarError) as failed:
        pending.store(None)
    return failed.value


def test_an_answer_lost_after_the_whole_body_says_the_file_may_be_stored(repo):
    # A proxy's 504 after MLflow had every byte: MLflow may well have stored it.
    _Recorder.status = 504
    upload = _upload(repo, [b"a" * 70_000, b"b" * 70_000], [])
    error = _told(upload)
    assert upload.maybe_stored
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "may or may not have stored it" in error.message
    assert "kept nothing" not in error.message
    assert upload.abort() is False  # its directory may hold the file by now


def test_a_login_page_in_place_of_mlflows_answer_is_a_failure_that_stored_nothing(repo):
    _Recorder.put_answer = b"<html><form action='/login'>Sign in</form></html>"
    upload = _upload(repo, [b"a" * 70_000, b"b" * 70_000], [])
    error = _told(upload)
    assert not upload.maybe_stored
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "not MLflow's artifact proxy" in error.message and "kept nothing" in error.message
    assert error.metadata == {"http_status": "200"}
    # MLflow's own answer (a JSON object) is success.
    _Recorder.put_answer = b"{}"
    assert _upload(repo, [b"c" * 10], []).commit() is None


def test_abort_never_completes_the_body(repo):
    # More chunks than the queue holds: the PUT has begun.
    chunks = [bytes([i]) * 70_000 for i in range(7)]
    seen: list[str] = []
    upload = _upload(repo, chunks, seen)
    assert upload.abort() is True
    deadline = time.monotonic() + 10
    while not _Recorder.bodies and time.monotonic() < deadline:
        time.sleep(0.01)  # the server notices the cut connection on its own thread
    _path, received, length = _Recorder.bodies[0]
    # The held-back chunk never left: the server saw a connection cut before the end.
    assert len(received) < length == 490_000
    assert seen == ["error"]


@pytest.mark.parametrize("chunks", [1, 5], ids=["its first", "as many as the queue holds"])
def test_an_upload_abandoned_within_its_first_chunks_never_reaches_mlflow(repo, chunks):
    # MLflow's server makes the file's directory when a PUT's handler begins, which can
    # be after the abort has looked for it: an upload refused within the chunks the queue
    # holds (a small file whose digest is wrong) must not have begun a PUT at all.
    seen: list[str] = []
    upload = _upload(repo, [b"x" * 1000] * chunks, seen)
    assert upload.abort() is False
    assert upload.failure() is None
    after = _upload(repo, [b"y" * 10], [])
    assert after.commit() is None
    assert _Recorder.bodies == [("/root/ckpt/model.pt", b"y" * 10, 10)]
    assert seen == []


def test_a_refused_put_makes_commit_answer_with_the_error(repo):
    _Recorder.status = 403
    seen: list[str] = []
    upload = _upload(repo, [b"x" * 1000], seen)
    error = upload.commit()
    assert isinstance(error, SidecarError)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert seen == ["error"]
    # MLflow kept nothing, but its server may have made the file's directory on the way.
    assert upload.abort() is True
    assert upload.abort() is False


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


def test_a_download_the_server_presigns_comes_from_the_object_store_not_the_proxy(proxy):
    _Recorder.download = bytes(range(256)) * 1000
    download = open_download(proxy, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    assert download.size_bytes == len(_Recorder.download)
    assert b"".join(download.chunks) == _Recorder.download
    paths = [path for path, _headers in _Recorder.gets]
    assert paths == [PRESIGN_PREFIX + "ckpt/model.pt", "/bucket/ckpt/model.pt?X-Amz-Signature=s1"]
    presign_headers, object_headers = (headers for _path, headers in _Recorder.gets)
    assert presign_headers["Authorization"] == "Bearer mlflow-secret"
    # The URL carries its own signature: MLflow's token stays with MLflow.
    assert "Authorization" not in object_headers
    assert object_headers["x-amz-server-side-encryption"] == "AES256"


@pytest.mark.parametrize("announced", [255_999, 256_001])
def test_a_presigned_download_that_differs_from_its_announced_size_is_data_loss(proxy, announced):
    _Recorder.download = bytes(range(256)) * 1000
    _Recorder.presigned_size = announced
    download = open_download(proxy, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    with pytest.raises(SidecarError) as failed:
        b"".join(download.chunks)
    assert failed.value.code == grpc.StatusCode.DATA_LOSS


def test_a_presigned_download_whose_store_connection_breaks_names_the_store_not_mlflow(proxy):
    _Recorder.download = bytes(range(256)) * 1000
    _Recorder.store_cut = True
    download = open_download(proxy, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    with pytest.raises(SidecarError) as failed:
        b"".join(download.chunks)
    # MLflow answered (it presigned the URL); the object store broke off.
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    assert failed.value.reason == ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    assert failed.value.message.startswith("the artifact store is unavailable")
    assert "MLflow" not in failed.value.message


@pytest.mark.parametrize("status", [404, 501])
def test_a_server_that_cannot_presign_is_read_through_the_proxy(proxy, status):
    _Recorder.download = b"weights" * 1000
    _Recorder.presign_status = status
    download = open_download(proxy, "ckpt/model.pt", 64 * 1024)
    assert download is not None
    assert b"".join(download.chunks) == _Recorder.download
    paths = [path for path, _headers in _Recorder.gets]
    assert paths == [
        PRESIGN_PREFIX + "ckpt/model.pt",
        "/api/2.0/mlflow-artifacts/artifacts/root/ckpt/model.pt",
    ]


@pytest.fixture()
def silent_store(monkeypatch) -> Iterator[str]:
    """An address whose connections are never answered, as behind a network policy that
    drops packets: a listener with a full backlog, whose SYNs the kernel drops."""
    monkeypatch.setattr(artifact_streams, "_STORE_CONNECT_TIMEOUT_S", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    for filler in fillers:
        filler.close()
    listener.close()


@pytest.mark.parametrize("store", ["unreachable", "silent", "refusing"])
def test_an_object_store_the_sidecar_cannot_read_leaves_the_download_to_the_proxy(
    proxy, store, caplog, request
):
    _Recorder.download = b"weights" * 1000
    if store == "unreachable":
        _Recorder.store_address = f"127.0.0.1:{free_port()}"  # nothing listens there
    elif store == "silent":
        _Recorder.store_address = request.getfixturevalue("silent_store")
    else:
        _Recorder.store_status = 403
    started = time.monotonic()
    download = open_download(proxy, "ckpt/model.pt", 64 * 1024)
    # Not a speed check: without the connect bound a silent store holds the download for
    # MLflow's whole request timeout (120 s) before the proxy is tried.
    assert time.monotonic() - started < 30
    assert download is not None
    assert b"".join(download.chunks) == _Recorder.download
    paths = [path for path, _headers in _Recorder.gets if not path.startswith("/bucket/")]
    assert paths == [
        PRESIGN_PREFIX + "ckpt/model.pt",
        "/api/2.0/mlflow-artifacts/artifacts/root/ckpt/model.pt",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ckpt/model.pt" in warnings[0]
    expected = {"unreachable": "ConnectionError", "silent": "ConnectTimeout"}
    assert expected.get(store, "HTTP 403") in warnings[0]
    # The presigned URL's query string is a credential: it stays out of the log.
    assert "X-Amz-Signature" not in warnings[0]


def test_a_presign_refused_for_another_reason_is_that_error(proxy):
    _Recorder.presign_status = 403
    with pytest.raises(Exception) as failed:
        open_download(proxy, "ckpt/model.pt", 64 * 1024)
    assert "403" in str(failed.value)
    assert not any(path.startswith("/bucket/") for path, _h in _Recorder.gets)


def test_uploads_are_streamed_below_mlflows_multipart_size_and_staged_from_it(proxy, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "1000")
    assert [streams_upload(proxy, size) for size in (0, 1, 999, 1000, 10**9)] == [
        False,
        True,
        True,
        False,
        False,
    ]
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    assert streams_upload(proxy, 10**9) is True


class _HeldAnswer:
    """A fake PUT that reads its body as MLflow's server does and answers only once
    `answer` is set; with `read_first`, it reads one piece and waits for `read_on`."""

    def __init__(self, *, read_first: bool = False) -> None:
        self.read_first = read_first
        self.read_on = threading.Event()
        self.answer = threading.Event()
        self.received: list[bytes] = []
        self.whole = threading.Event()

    def __call__(self, *_args: object, data: Iterable[bytes], **_kwargs: object) -> object:
        for piece in data:
            self.received.append(piece)
            if self.read_first:
                self.read_on.wait(60)
        self.whole.set()
        self.answer.wait(60)
        return _Answered()


class _Answered:
    """MLflow's answer to a stored file: an empty JSON object from the URL asked."""

    text = "{}"
    history: ClassVar[list[object]] = []
    headers: ClassVar[dict[str, str]] = {"Content-Type": "application/json"}

    def raise_for_status(self) -> None:
        """MLflow stored the file."""


def _commit_in_thread(upload: StreamedUpload, deadline_s: float) -> tuple[threading.Thread, list]:
    outcome: list[object] = []

    def commit() -> None:
        with call_deadline.deadline_scope(deadline_s):
            try:
                outcome.append(upload.commit())
            except SidecarError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=commit)
    thread.start()
    return thread, outcome


def test_a_commit_waits_past_its_deadline_for_mlflows_answer_to_the_whole_body(
    repo, monkeypatch, caplog
):
    # MLflow's server stores a whole body whatever becomes of the call: the path is held
    # until it answers, so that no newer upload of it is overtaken.
    put = _HeldAnswer()
    monkeypatch.setattr(artifact_streams.mlflow_internals, "http_request", put)
    upload = _upload(repo, [b"a" * 1000, b"b" * 1000], [])
    with caplog.at_level(logging.WARNING, logger=artifact_streams.__name__):
        thread, outcome = _commit_in_thread(upload, 0.2)
        give_up = time.monotonic() + 60
        while not any("deadline" in r.getMessage() for r in caplog.records) and not outcome:
            assert time.monotonic() < give_up, "commit neither waited nor answered"
            time.sleep(0.01)
    assert put.whole.is_set()
    assert outcome == [], "commit gave up before MLflow answered the whole body"
    put.answer.set()
    thread.join(60)
    assert outcome == [None]


def test_a_commit_whose_last_bytes_had_not_left_by_its_deadline_cuts_the_put(repo, monkeypatch):
    put = _HeldAnswer(read_first=True)
    monkeypatch.setattr(artifact_streams.mlflow_internals, "http_request", put)
    monkeypatch.setattr(artifact_streams, "_ABORT_JOIN_S", 0.0)
    seen: list[str] = []
    upload = _upload(repo, [b"a" * 1000, b"b" * 1000], seen)
    thread, outcome = _commit_in_thread(upload, 0.2)
    thread.join(60)
    put.read_on.set()
    put.answer.set()
    give_up = time.monotonic() + 60
    while not seen:
        assert time.monotonic() < give_up, "the PUT never ended"
        time.sleep(0.01)
    # The body never came whole: MLflow's server stores nothing of a short one.
    assert put.received == [b"a" * 1000]
    assert not put.whole.is_set()
    assert seen == ["error"]
    [error] = outcome
    assert isinstance(error, DeadlineExceededError)
    assert "nothing was stored" in error.message
    assert upload.abort() is True  # the cut PUT may have left the file's directory


class _LateDirectory:
    """A gateway whose store makes the upload's directory only at its third listing, as
    MLflow's server does when a cut PUT's handler begins after the cut."""

    def __init__(self) -> None:
        self.listings = 0
        self.deleted: list[str] = []

    def list_artifacts(self, run_id: str, path: str) -> list[FileInfo]:
        if path == "":
            self.listings += 1
            made = self.listings >= 3 and not self.deleted
            return [FileInfo("ckpt", is_dir=True)] if made else []
        return []  # the directory holds nothing (a file in progress is not listed)

    def delete_artifacts(self, run_id: str, path: str) -> None:
        self.deleted.append(path)


class _Cut:
    def abort(self) -> bool:
        return True  # a PUT was begun and cut


def test_an_abandoned_upload_waits_for_its_directory_and_removes_it_once_made():
    gateway = _LateDirectory()
    pending = PendingUpload(
        gateway,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "r",
        "ckpt/model.pt",
        _Cut(),  # type: ignore[arg-type]
        writers=ArtifactWriters(),
    )
    pending.abort()
    assert gateway.deleted == ["ckpt"]
