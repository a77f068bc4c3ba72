"""`StreamedUpload` against a small HTTP server: the body arrives whole on commit, is cut
short (never completed) on abort, and a PUT that fails makes commit answer False."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

from mlflow_sidecar.server.mlflow_gateway.artifact_streams import StreamedUpload


class _Recorder(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[tuple[str, bytes, int]]] = []
    status: ClassVar[int] = 200

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

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def repo() -> Iterator[HttpArtifactRepository]:
    _Recorder.bodies = []
    _Recorder.status = 200
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
    assert upload.commit() is True
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


def test_a_refused_put_makes_commit_answer_false(repo):
    _Recorder.status = 500
    seen: list[str] = []
    upload = _upload(repo, [b"x" * 1000], seen)
    assert upload.commit() is False
    assert seen == ["error"]
