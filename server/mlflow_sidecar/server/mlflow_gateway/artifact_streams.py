"""Artifact bytes moved through MLflow's artifact proxy while they are still on the move.

An upload is PUT to MLflow while its chunks still arrive over gRPC, and a download is
passed on while it still arrives from MLflow, so the two legs of a transfer overlap
instead of running one after the other.

Uploads stay all-or-nothing: MLflow's server publishes a PUT only once the whole body
(Content-Length) has arrived, and a connection cut before that leaves nothing behind,
not even over an existing file. So the newest chunk is always held back; `commit()`
sends it once the caller has verified every byte, `abort()` cuts the connection instead.

Only MLflow's HTTP artifact proxy (`mlflow-artifacts:` / `http(s):` artifact URIs) is
streamed, and only the way MLflow's own client moves the same file: an upload that it
would send in presigned parts (multipart on, the file at least
`MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE`) goes through a file, and a download that the
server presigns (S3 and similar stores) is read from the object store directly instead
of through the server, which would fetch the whole file before sending its first byte.
Other stores go through a file.
"""

from __future__ import annotations

import contextvars
import json
import logging
import posixpath
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

from mlflow_sidecar.core.errors import (
    HTTP_STATUS_KEY,
    DataLossError,
    DeadlineExceededError,
    ErrorReason,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals
from mlflow_sidecar.server.mlflow_gateway.errors import to_domain_error
from mlflow_sidecar.server.mlflow_gateway.port import StreamedDownload
from mlflow_sidecar.server.mlflow_gateway.store_errors import store_unavailable
from mlflow_sidecar.server.redaction import redact

log = logging.getLogger(__name__)

# Chunks in flight between the gRPC stream and the HTTP body: the memory bound of an
# upload beyond the chunk held back.
_QUEUE_CHUNKS = 4
# How long a presigned GET waits to connect to the object store before the proxy takes
# over: a network policy that drops the sidecar's packets to the store would otherwise
# hold every download for MLflow's whole request timeout (120 s). MLflow's own chunked
# downloads use the same 10 s.
_STORE_CONNECT_TIMEOUT_S = 10.0
# How long an abort waits for the PUT to notice before leaving it to its own timeout.
_ABORT_JOIN_S = 10.0
# Beyond MLflow's request timeout, how long a complete PUT's answer is awaited: the
# request's own timeout ends it first unless MLflow trickles its answer.
_ANSWER_MARGIN_S = 10.0


_END = object()
_ABORT = object()

Observe = Callable[[str, float], None]


class _AbandonedError(Exception):
    """Raised inside the HTTP body so that the connection is cut before the last byte."""


def _endpoint(artifact_path: str) -> str:
    """The URL path of a file under the proxy's artifact root. Quoted, so that the server
    reads the name as given: `%`, `?` and `#` are URL syntax (MLflow's own client sends
    them as they are, and reaches another file)."""
    return quote(posixpath.join("/", artifact_path), safe="/")


def proxy_repository(artifact_uri: str, tracking_uri: str) -> Any | None:
    """The run's artifact repository when it is MLflow's HTTP artifact proxy, else None."""
    repo: Any = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    if type(repo) not in (HttpArtifactRepository, MlflowArtifactsRepository):
        return None
    return repo


def streams_upload(repo: Any, size_bytes: int) -> bool:
    """Whether an upload of this size to the proxy `repo` is one PUT that can be streamed;
    a file MLflow would send in presigned parts is not."""
    return size_bytes > 0 and not mlflow_internals.uploads_in_parts(repo, size_bytes)


class _SizedBody:
    """An iterable HTTP body of known length: requests sends Content-Length, not chunked."""

    def __init__(self, chunks: Iterator[bytes], size_bytes: int) -> None:
        self._chunks = chunks
        self._size = size_bytes

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


def _check_proxy_answer(response: Any, endpoint: str) -> None:
    """UnavailableError unless the answer to a PUT is MLflow's artifact proxy's own (a JSON
    object, or nothing, from the URL the PUT went to): a proxy in front of MLflow may
    answer 200 with a login page, or redirect the PUT to a GET of a page, and MLflow then
    stored nothing."""
    text = response.text.strip()
    if response.history or not (text == "" or _is_json_object(text)):
        status = response.history[0].status_code if response.history else response.status_code
        kind = response.headers.get("Content-Type") or "no content type"
        raise UnavailableError(
            f"the upload of {endpoint} was answered by something that is not MLflow's"
            f" artifact proxy (HTTP {status}, {kind}: a login page or a proxy in front of"
            " MLflow?); MLflow stored nothing: send it again",
            reason=ErrorReason.MLFLOW_UNAVAILABLE,
            metadata={HTTP_STATUS_KEY: str(status)},
        )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class StreamedUpload:
    """One artifact file PUT to MLflow while its bytes are still being received.

    Feed it with `write()` from one thread, then either `commit()` or `abort()`. A PUT
    that fails on the way makes `commit()` answer with the error; nothing is stored then,
    and the bytes have to be sent again.
    """

    def __init__(
        self, repo: Any, artifact_dir: str, file_name: str, size_bytes: int, observe: Observe
    ) -> None:
        paths = (artifact_dir, file_name) if artifact_dir else (file_name,)
        self._endpoint = _endpoint(posixpath.join(*paths))
        self._creds = mlflow_internals.host_creds(repo)
        self._headers = {"Content-Type": mlflow_internals.guess_mime_type(file_name)}
        self._size = size_bytes
        self._observe = observe
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_CHUNKS)
        self._held: bytes | None = None
        self._ended = threading.Event()
        self._error: Exception | None = None
        self._closed = False
        # Set by a commit that failed with MLflow known to have kept nothing: its server may
        # still have made the file's directory, for `abort()` to report.
        self._failed_begun = False
        # Set once the body's last byte has left: from then on MLflow may store the file
        # whatever becomes of its answer (unless the answer shows MLflow never had it).
        self.maybe_stored = False
        # Chunks passed on before the PUT begins. It begins once they are more than the
        # queue holds, or at `commit()`: MLflow's server makes the file's directory when a
        # PUT's handler begins, which may be after a cut PUT's abort has looked for it, so
        # an upload refused within its first chunks (a wrong digest of a small file, a
        # message out of place) must not have begun one. The memory bound stays the same.
        self._unsent: list[bytes] = []
        # In the call's context: the PUT's span belongs to the call's trace.
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._put,),
            name="artifact-put",
            daemon=True,
        )

    def _body(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                self.maybe_stored = True
                return
            if item is _ABORT:
                raise _AbandonedError("the upload was abandoned before its last byte")
            assert isinstance(item, bytes)
            yield item

    def _put(self) -> None:
        started = time.perf_counter()
        try:
            response = mlflow_internals.http_request(
                self._creds,
                self._endpoint,
                "PUT",
                # A body that is read once cannot be sent again: no retries here; a
                # failed PUT is redone from the file on disk.
                max_retries=0,
                extra_headers=self._headers,
                data=_SizedBody(self._body(), self._size),
            )
            mlflow_internals.raise_for_status(response)
            try:
                _check_proxy_answer(response, self._endpoint)
            except UnavailableError:
                self.maybe_stored = False  # a page in MLflow's place: it never had the file
                raise
        except Exception as exc:  # noqa: BLE001 - any failure means: store from disk
            self._error = exc
        finally:
            self._ended.set()
            self._observe("ok" if self._error is None else "error", time.perf_counter() - started)

    def _offer(self, item: object) -> None:
        if self._thread.ident is None:
            if isinstance(item, bytes) and len(self._unsent) < _QUEUE_CHUNKS:
                self._unsent.append(item)
                return
            self._thread.start()
            unsent, self._unsent = self._unsent, []
            for chunk in unsent:
                self._put_in_queue(chunk)
        self._put_in_queue(item)

    def _put_in_queue(self, item: object) -> None:
        # Never block on a PUT that has already ended: its bytes are no longer wanted.
        while not self._ended.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def failure(self) -> SidecarError | None:
        """What ended the PUT before `commit()`, if it has ended (MLflow went away)."""
        if self._ended.is_set() and self._error is not None:
            return to_domain_error(self._error)
        return None

    def write(self, chunk: bytes) -> None:
        """Pass on the chunk held so far and hold this one."""
        if self._held is not None:
            self._offer(self._held)
        self._held = chunk

    def commit(self) -> SidecarError | None:
        """Send the held chunk and wait for MLflow: None when MLflow stored the file, else
        what went wrong (MLflow then kept nothing).

        Once MLflow's server has the last byte it stores the file whatever becomes of this
        call, so its answer is waited for past the call's deadline (up to MLflow's request
        timeout and a margin): the caller then hears DEADLINE_EXCEEDED, but the outcome
        returned is what MLflow did. Only a PUT whose last bytes had not left yet when the
        deadline passed is cut (MLflow stores nothing): DeadlineExceededError."""
        self._closed = True
        if self._held is not None:
            self._offer(self._held)
            self._held = None
        self._offer(_END)
        self._thread.join(call_deadline.remaining())
        if self._thread.is_alive():
            if self._cut_unless_sent():
                self._failed_begun = True
                raise DeadlineExceededError(
                    f"deadline exceeded before the last bytes of the artifact {self._endpoint}"
                    " reached MLflow; nothing was stored: send it again with a longer deadline"
                )
            self._await_answer_past_deadline()
        if self._error is None:
            return None
        error = to_domain_error(self._error)
        # Unknown only when the whole body left and the answer failed: MLflow may store it.
        self._failed_begun = not (self.maybe_stored and isinstance(error, UnavailableError))
        return error

    def _cut_unless_sent(self) -> bool:
        """Cut the PUT if the end of its body is still queued (True); False when the body
        has left whole and only MLflow's answer is outstanding."""
        unsent = False
        while True:
            try:
                unsent = self._queue.get_nowait() is _END or unsent
            except queue.Empty:
                break
        if unsent:
            # Only this thread puts, and the queue is empty: there is room for the abort.
            self._queue.put_nowait(_ABORT)
            self._thread.join(_ABORT_JOIN_S)
        return unsent

    def _await_answer_past_deadline(self) -> None:
        """Wait for MLflow's answer to a complete PUT, bounded; DeadlineExceededError when
        it does not come (what MLflow's server does with the file is then unknown)."""
        bound_s = mlflow_internals.request_timeout_s() + _ANSWER_MARGIN_S
        log.warning(
            "the deadline of the upload of %s passed after MLflow had all of it; waiting up"
            " to %.0f s for MLflow's answer, so that no newer upload of the same path is"
            " overwritten by it",
            self._endpoint,
            bound_s,
        )
        self._thread.join(bound_s)
        if self._thread.is_alive():
            log.warning(
                "MLflow did not answer the upload of %s within %.0f s; it may still store it",
                self._endpoint,
                bound_s,
            )
            raise DeadlineExceededError(
                f"deadline exceeded while MLflow was storing the artifact {self._endpoint};"
                " it may still be stored: download it to see which bytes it holds"
            )

    def abort(self) -> bool:
        """Cut the PUT short so that MLflow stores nothing; a no-op after `commit()`.

        True when a PUT was begun and MLflow kept nothing of it, cut here or failed in
        `commit()` (MLflow may have created the file's directory); once only."""
        if self._closed:
            failed, self._failed_begun = self._failed_begun, False
            return failed
        self._closed = True
        self._held = None
        if self._thread.ident is None:
            self._unsent = []
            return False  # the PUT had not begun: MLflow never heard of the upload
        # Only this thread puts: once drained there is room for the abort.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put_nowait(_ABORT)
        self._thread.join(_ABORT_JOIN_S)
        return True


def open_download(
    repo: Any, artifact_path: str, chunk_bytes: int, size_hint: int = 0
) -> StreamedDownload | None:
    """Start a GET of one artifact file; the bytes are read as `chunks` is iterated, in
    pieces of `chunk_bytes` (the last one shorter). The GET goes to the object store when
    MLflow's server presigns the file, else to the server; when the object store cannot
    be read (unreachable from the sidecar, refusing the URL), to the server after all,
    with a WARNING that says why.

    The size is the answer's Content-Length, else the presigned size, else `size_hint`
    (the listed size): MLflow's server streams a file from S3 and other object stores
    without a length. With none, None: the header of a download announces the size, so
    such a file is fetched whole first. Bytes beyond or short of the size are DATA_LOSS."""
    # The bytes as stored, so that Content-Length counts what the chunks carry even
    # behind a proxy that would compress them.
    identity = {"Accept-Encoding": "identity"}
    response = None
    presigned = mlflow_internals.presigned_download(repo, artifact_path)
    if presigned is not None:
        response = _object_store_response(presigned, identity, artifact_path)
        if response is not None:
            size_hint = presigned.size_bytes or size_hint
    from_store = response is not None
    sender = "the artifact store" if from_store else "MLflow"
    if response is None:
        response = mlflow_internals.http_request(
            mlflow_internals.host_creds(repo),
            _endpoint(artifact_path),
            "GET",
            extra_headers=identity,
            stream=True,
        )
        mlflow_internals.raise_for_status(response)
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        size = int(length)
    elif size_hint > 0:
        size = size_hint
    else:
        response.close()
        return None

    def chunks() -> Iterator[bytes]:
        received = 0
        try:
            # A chunked answer comes in pieces of the sender's choosing: gathered into
            # chunk_bytes, so that the gRPC messages stay few and full.
            for chunk in _regrouped(response.iter_content(chunk_size=chunk_bytes), chunk_bytes):
                received += len(chunk)
                if received > size:
                    break
                yield chunk
        except Exception as exc:
            raise _read_error(exc, from_store) from exc
        finally:
            response.close()
        if received != size:
            raise DataLossError(
                f"{sender} sent {received} bytes of {artifact_path}, announced {size}",
                reason=ErrorReason.DIGEST_MISMATCH,
            )

    return StreamedDownload(size, chunks(), response.close)


def _read_error(exc: Exception, from_store: bool) -> SidecarError:
    """The error for a body that broke off. Read `from_store` (a presigned URL), a
    transient failure is the object store's: MLflow had answered already."""
    error = to_domain_error(exc)
    if from_store and error.reason == ErrorReason.MLFLOW_UNAVAILABLE:
        return store_unavailable(redact(str(exc)))
    return error


def _object_store_response(
    presigned: mlflow_internals.PresignedDownload, headers: dict[str, str], artifact_path: str
) -> Any | None:
    """The object store's answer to a presigned GET, or None (logged) when it has none to
    give: the proxy still serves the file, so a sidecar that cannot reach the store (a
    network policy that lets it reach MLflow only) keeps working, only slower."""
    response = None
    try:
        response = mlflow_internals.object_store_get(
            presigned.url, presigned.headers | headers, _STORE_CONNECT_TIMEOUT_S
        )
        mlflow_internals.raise_for_status(response)
    except Exception as exc:  # noqa: BLE001 - any failure: the proxy is the way left
        if response is not None:
            response.close()
        log.warning(
            "could not read %s from the object store through the URL MLflow's server"
            " presigned (%s); reading it through MLflow's artifact proxy instead"
            " (MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false skips the attempt)",
            artifact_path,
            _failure_without_url(exc),
        )
        return None
    return response


def _failure_without_url(exc: Exception) -> str:
    """What went wrong, without the URL: its query string is a credential."""
    answer = getattr(exc, "response", None)
    status = getattr(answer, "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    return type(exc).__name__


def _regrouped(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The bytes of `pieces` again, in pieces of `size` (the last one shorter)."""
    pending = bytearray()
    for piece in pieces:
        if not pending and len(piece) == size:
            yield piece
            continue
        pending += piece
        while len(pending) >= size:
            yield bytes(pending[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)
