"""Streamed transfers: the messages of an upload -> verified bytes, passed on as they
arrive and staged in a directory when their destination takes files, and the bytes of a
file or a staged model directory -> the messages of a download.

Everything a caller sends is checked before it is written: the header first (paths,
sizes against the limit, digests), then every chunk against the size announced for it.
Bytes go to disk chunk by chunk; nothing here holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

import grpc

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import (
    CancelledError,
    DataLossError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from mlflow_sidecar.core.limits import CHUNK_FRAMING_BYTES, MIN_REQUESTED_CHUNK_BYTES
from mlflow_sidecar.core.paths import FileTree, check_stored_path, is_sha256
from mlflow_sidecar.core.regular_files import regular_file_chunks
from mlflow_sidecar.core.transfer import HashingWriter
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.answer_bulk import leave_out_bulk
from mlflow_sidecar.server.idempotency import check_request_id
from mlflow_sidecar.server.idempotency.uploads import UploadOnce
from mlflow_sidecar.server.model_cache import ModelLease
from mlflow_sidecar.server.services.artifacts import check_upload_size
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

T = TypeVar("T")


class UploadSink(Protocol):
    """Where an artifact goes: its chunks while they arrive, then the verified upload."""

    @property
    def needs_file(self) -> bool:
        """True when the bytes must also be staged in a file for `store()`."""

    def write(self, chunk: bytes) -> None:
        """Take a chunk that has been checked (and staged, if `needs_file`)."""

    def store(self, verified_file: Path | None) -> None:
        """Keep the upload: every byte arrived and matched the announced sha256. The
        staged file, when `needs_file`."""

    def abort(self) -> None:
        """The upload failed: keep nothing of it. A no-op after `store()`."""


@dataclass(frozen=True, slots=True)
class StagedArtifact:
    """An uploaded file, verified; its bytes went to `sink` as they arrived, and to the
    staging file `local_path` when the sink needs one."""

    run_id: str
    artifact_path: str
    local_path: Path | None
    size_bytes: int
    sha256: str
    sink: UploadSink


@dataclass(frozen=True, slots=True)
class StagedModel:
    """An uploaded model directory, every file verified, waiting in the staging directory."""

    name: str
    run_id: str
    experiment_id: str
    description: str
    root: Path
    size_bytes: int
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    request_id: str = ""


def _messages(requests: Iterator[T]) -> Iterator[T]:
    # gRPC raises a bare RpcError from the request iterator when the client goes away.
    try:
        yield from requests
    except grpc.RpcError as exc:
        raise CancelledError("the client cancelled the upload") from exc


def _sha256(field_name: str, value: str) -> str:
    digest = value.lower()
    if not is_sha256(digest):
        raise InvalidArgumentError(field_name, "must be the 64 hex digits of a sha256")
    return digest


def _within_limit(received: int, incoming: int, limit: int) -> None:
    if received + incoming > limit:
        raise ResourceExhaustedError(
            f"received more than the sidecar's upload limit of {limit} bytes"
            " (artifacts.max_upload_bytes)",
            reason=ErrorReason.UPLOAD_TOO_LARGE,
        )


class _Repeat:
    """The sink of a repeated upload: its first upload took effect, nothing is stored."""

    needs_file = False

    def write(self, chunk: bytes) -> None:
        """Nothing: the bytes are only checked."""

    def store(self, verified_file: Path | None) -> None:
        """Nothing: the first upload stored them."""

    def abort(self) -> None:
        """Nothing to undo."""


class _Once:
    """A sink that holds its request id while the upload runs (a repeat racing it waits,
    then finds it recorded) and records what `store()` stored under that id."""

    def __init__(self, sink: UploadSink, held: ExitStack) -> None:
        self._sink = sink
        self._held = held
        self.record: Callable[[], None] | None = None

    @property
    def needs_file(self) -> bool:
        """As the sink it wraps."""
        return self._sink.needs_file

    def write(self, chunk: bytes) -> None:
        """To the sink it wraps."""
        self._sink.write(chunk)

    def store(self, verified_file: Path | None) -> None:
        """Store, record, and let the request id go."""
        try:
            self._sink.store(verified_file)
            if self.record is not None:
                self.record()
        finally:
            self._held.close()

    def abort(self) -> None:
        """Abort, and let the request id go (a no-op after `store()`)."""
        try:
            self._sink.abort()
        finally:
            self._held.close()


def receive_artifact(
    requests: Iterator[pb.UploadArtifactRequest],
    into: Path,
    staging: Staging,
    begin: Callable[[str, str, int], UploadSink],
    once: UploadOnce | None = None,
) -> StagedArtifact:
    """Write an UploadArtifact stream into the directory `into`, verify it, and pass every
    chunk on to the sink `begin(run_id, artifact_path, size_bytes)` returns.

    `begin` runs after the header is checked and before any chunk is read, so an unknown
    run fails before the bytes travel. The sink is aborted when the upload fails here.
    With `once`, a repeat of a request id whose upload took effect stores nothing; its
    bytes must be the first upload's (else REQUEST_ID_REUSED).
    """
    messages = _messages(requests)
    first = next(messages, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgumentError("header", "the first message must carry the header")
    header = first.header
    check.run_id("header.run_id", header.run_id)
    request_id = check_request_id("header.request_id", header.request_id)
    path = check_stored_path("header.artifact_path", header.artifact_path)
    announced = _sha256("header.sha256", header.sha256) if header.sha256 else None
    check_upload_size("header.size_bytes", header.size_bytes, staging.max_upload_bytes)
    held = ExitStack()
    try:
        if once is not None and request_id:
            held.enter_context(once.held(request_id))
        earlier = once.first(request_id, header.run_id, path, header.size_bytes) if once else None
        inner = _Repeat() if earlier else begin(header.run_id, path, header.size_bytes)
    except BaseException:
        held.close()
        raise
    sink = _Once(inner, held)
    # MLflow names the stored file after the local one, so the staged file gets its name.
    local = into / PurePosixPath(path).name if sink.needs_file else None
    try:
        with HashingWriter(local, header.size_bytes, announced, what=path) as writer:
            trailed = _receive_chunks(messages, writer, sink, staging.max_upload_bytes)
            if announced is None and trailed is None:
                raise InvalidArgumentError(
                    "trailer.sha256",
                    "an upload whose header has no sha256 must end with a trailer carrying it",
                )
            writer.finish(trailed)
            sha256 = trailed or announced or ""
        if once is not None and earlier is not None:
            once.check_same_bytes(request_id, earlier, sha256)
    except BaseException:
        sink.abort()
        raise
    if once is not None and request_id and earlier is None:
        run_id, size = header.run_id, header.size_bytes
        sink.record = lambda: once.record(request_id, run_id, path, size, sha256)
    return StagedArtifact(header.run_id, path, local, header.size_bytes, sha256, sink)


def _receive_chunks(
    messages: Iterator[pb.UploadArtifactRequest],
    writer: HashingWriter,
    sink: UploadSink,
    limit: int,
) -> str | None:
    """Write the chunks to `writer` and `sink`; the trailer's sha256, if one came last."""
    trailed: str | None = None
    for message in messages:
        kind = message.WhichOneof("payload")
        if trailed is not None:
            raise InvalidArgumentError("trailer", "the trailer must be the last message")
        if kind == "chunk":
            _within_limit(writer.written, len(message.chunk), limit)
            writer.write(message.chunk)
            sink.write(message.chunk)
        elif kind == "trailer":
            trailed = _sha256("trailer.sha256", message.trailer.sha256)
        else:
            raise _out_of_place(kind, "a chunk or the trailer")
    return trailed


def _out_of_place(kind: str | None, expected: str) -> InvalidArgumentError:
    """The error for a message after the header that carries `kind` (None: nothing)."""
    if kind is None:
        return InvalidArgumentError(
            "payload", f"a message after the header carries nothing; it must carry {expected}"
        )
    return InvalidArgumentError(kind, "only the first message may carry a header")


# A ModelFile entry's field tag and length prefix in the manifest.
_ENTRY_FRAMING_BYTES = 4
# What a manifest holds beside its files: the version (source, run id, aliases; its
# description and tags are counted as the upload's header has them) and the digest.
_VERSION_RESERVE_BYTES = 8 * 1024


class _ModelTree:
    """The files of one model upload as they arrive, each checked before it is written."""

    def __init__(self, root: Path, limit: int, declared_total: int, manifest_budget: int) -> None:
        self.root = root
        self.limit = limit
        self.declared_total = declared_total
        # DownloadModel sends every file's path, size and sha256 in one message: a model
        # of more files than that holds could be stored but never downloaded.
        self.manifest_budget = manifest_budget
        self.manifest_bytes = 0
        self.tree = FileTree(stored=True)
        self.announced = 0
        self.received = 0
        self.writer: HashingWriter | None = None

    def start_file(self, announced: reg_pb.UploadModelFile) -> None:
        """Finish the previous file (it must be complete) and open the announced one."""
        if self.writer is not None:
            self.writer.finish()
        index = len(self.tree)
        # The field is the `file` of this stream's message; the path names which file.
        path = self.tree.add("file.path", announced.path)
        sha256 = _sha256("file.sha256", announced.sha256)
        size = announced.size_bytes
        if size < 0:
            raise InvalidArgumentError(
                "file.size_bytes", f"of {path!r} must not be negative, got {size}"
            )
        entry = reg_pb.ModelFile(path=path, size_bytes=size, sha256=sha256 or "0" * 64)
        self.manifest_bytes += entry.ByteSize() + _ENTRY_FRAMING_BYTES
        if self.manifest_bytes > self.manifest_budget:
            raise ResourceExhaustedError(
                f"file {path!r}: the model's {index + 1} files would not fit in one"
                f" DownloadModel manifest ({self.manifest_budget} bytes of"
                " server.max_message_bytes for its paths, sizes and sha256s), so it could"
                " never be downloaded: pack small files into archives, or raise"
                " server.max_message_bytes (and the clients' max_message_bytes)",
                reason=ErrorReason.UPLOAD_TOO_LARGE,
            )
        self.announced += size
        if self.announced > self.limit:
            raise ResourceExhaustedError(
                f"the files announced so far add up to {self.announced} bytes, over the"
                f" sidecar's upload limit of {self.limit} bytes (artifacts.max_upload_bytes)",
                reason=ErrorReason.UPLOAD_TOO_LARGE,
            )
        if self.declared_total and self.announced > self.declared_total:
            raise DataLossError(
                f"the files announced so far add up to {self.announced} bytes,"
                f" more than header.total_size_bytes ({self.declared_total})",
                reason=ErrorReason.DIGEST_MISMATCH,
            )
        target = self.root.joinpath(*path.split("/"))
        self.writer = HashingWriter(target, size, sha256, what=path)

    def write(self, chunk: bytes) -> None:
        """Append a chunk to the current file."""
        if self.writer is None:
            raise InvalidArgumentError("file", "a chunk arrived before any file")
        _within_limit(self.received, len(chunk), self.limit)
        self.writer.write(chunk)
        self.received += len(chunk)

    def finish(self) -> None:
        """Verify the last file and the total."""
        if self.writer is None:
            raise InvalidArgumentError("file", "the upload carries no files")
        self.writer.finish()
        if self.declared_total and self.received != self.declared_total:
            raise DataLossError(
                f"received {self.received} bytes in all,"
                f" header.total_size_bytes announced {self.declared_total}",
                reason=ErrorReason.DIGEST_MISMATCH,
            )

    def close(self) -> None:
        """Delete a file left incomplete."""
        if self.writer is not None:
            self.writer.close()


def model_header(
    requests: Iterator[reg_pb.UploadModelRequest], staging: Staging
) -> tuple[reg_pb.UploadModelHeader, Iterator[reg_pb.UploadModelRequest]]:
    """The header of an UploadModel stream, checked against the size limit, and the
    stream's remaining messages."""
    messages = _messages(requests)
    first = next(messages, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise InvalidArgumentError("header", "the first message must carry the header")
    check_upload_size(
        "header.total_size_bytes", first.header.total_size_bytes, staging.max_upload_bytes
    )
    return first.header, messages


def receive_model(
    header: reg_pb.UploadModelHeader,
    messages: Iterator[reg_pb.UploadModelRequest],
    into: Path,
    staging: Staging,
) -> StagedModel:
    """Write the files of an UploadModel stream (after its `model_header`) as a directory
    tree under `into` and verify every file."""
    limit = staging.max_upload_bytes
    declared_total = header.total_size_bytes
    root = into / "model"
    root.mkdir()
    budget = staging.max_message_bytes - CHUNK_FRAMING_BYTES - _VERSION_RESERVE_BYTES
    files = _ModelTree(root, limit, declared_total, budget - header.ByteSize())
    try:
        for message in messages:
            kind = message.WhichOneof("payload")
            if kind == "file":
                files.start_file(message.file)
            elif kind == "chunk":
                files.write(message.chunk)
            else:
                raise _out_of_place(kind, "a file or a chunk")
        files.finish()
    finally:
        files.close()
    return StagedModel(
        name=header.name,
        run_id=header.run_id,
        experiment_id=header.experiment_id,
        description=header.description,
        root=root,
        size_bytes=files.received,
        tags=dict(header.tags),
        aliases=tuple(header.aliases),
        request_id=header.request_id,
    )


def download_chunk_bytes(max_chunk_bytes: int, staging: Staging) -> int:
    """The chunk size of one download: the sidecar's, or the smaller one its request asks
    for (`max_chunk_bytes`: what the client can receive)."""
    if max_chunk_bytes == 0:
        return staging.chunk_bytes
    if max_chunk_bytes < MIN_REQUESTED_CHUNK_BYTES:
        raise InvalidArgumentError(
            "max_chunk_bytes",
            f"must be 0 (the sidecar's artifacts.chunk_bytes) or at least"
            f" {MIN_REQUESTED_CHUNK_BYTES}, got {max_chunk_bytes}",
        )
    return min(staging.chunk_bytes, max_chunk_bytes)


def _at_most(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """`chunks` cut into pieces of at most `size` bytes (whole when they fit)."""
    for chunk in chunks:
        if len(chunk) <= size:
            yield chunk
            continue
        view = memoryview(chunk)
        for start in range(0, len(chunk), size):
            yield bytes(view[start : start + size])


def artifact_messages(
    artifact_path: str, size_bytes: int, chunks: Iterator[bytes], chunk_bytes: int
) -> Iterator[pb.DownloadArtifactResponse]:
    """A DownloadArtifact stream: the header (size), the chunks as they come (each at most
    `chunk_bytes`), then the trailer with the sha256 of every byte sent."""
    yield pb.DownloadArtifactResponse(
        header=pb.DownloadArtifactHeader(artifact_path=artifact_path, size_bytes=size_bytes)
    )
    digest = hashlib.sha256()
    for chunk in _at_most(chunks, chunk_bytes):
        digest.update(chunk)
        yield pb.DownloadArtifactResponse(chunk=chunk)
    yield pb.DownloadArtifactResponse(trailer=pb.DownloadArtifactTrailer(sha256=digest.hexdigest()))


def unchanged_message(
    version: ModelVersion, digest: str, staging: Staging
) -> reg_pb.DownloadModelResponse:
    """The one answer to a DownloadModel whose `if_none_match` matched."""
    unchanged = reg_pb.ModelUnchanged(
        model_version=conv.model_version_to_pb(version), digest=digest
    )
    leave_out_bulk(unchanged, staging.max_message_bytes - CHUNK_FRAMING_BYTES)
    return reg_pb.DownloadModelResponse(unchanged=unchanged)


def model_messages(
    version: ModelVersion,
    model: ModelLease,
    staging: Staging,
    *,
    cache_entry: str | None = None,
    chunk_bytes: int | None = None,
) -> Iterator[reg_pb.DownloadModelResponse]:
    """A DownloadModel stream of leased model files: the manifest (with the sha256s and
    digest they were verified against), then chunks in order (of `chunk_bytes`, else the
    sidecar's), or only the `cache_entry` the client reads them from. A manifest too large
    with the whole version carries the version without its tags (then aliases, then
    description)."""
    files = model.manifest.files
    entries = [
        reg_pb.ModelFile(path=f.path, size_bytes=f.size_bytes, sha256=f.sha256) for f in files
    ]
    manifest = reg_pb.ModelManifest(
        model_version=conv.model_version_to_pb(version), files=entries, digest=model.manifest.digest
    )
    limit = staging.max_message_bytes - CHUNK_FRAMING_BYTES
    leave_out_bulk(manifest, limit)
    if manifest.ByteSize() > limit:
        # Not a limit a retry gets past: the version needs a larger message limit.
        listed = reg_pb.ModelManifest(files=entries).ByteSize()
        raise FailedPreconditionError(
            f"the manifest's list of {len(entries)} files takes {listed} bytes and does not"
            f" fit one message of {staging.max_message_bytes} bytes"
            " (server.max_message_bytes): raise it (and the client's max_message_bytes) to"
            " download this version"
        )
    yield reg_pb.DownloadModelResponse(manifest=manifest)
    if cache_entry is not None:
        yield reg_pb.DownloadModelResponse(cache_entry=reg_pb.ModelCacheEntry(path=cache_entry))
        return
    for index, entry in enumerate(files):
        local = model.root.joinpath(*entry.path.split("/"))
        # No more than the manifest says, and only from a regular file: a file swapped
        # since it was verified (for a symlink to /dev/zero) must not be sent forever.
        for chunk in regular_file_chunks(
            local, entry.size_bytes, chunk_bytes or staging.chunk_bytes
        ):
            yield reg_pb.DownloadModelResponse(
                chunk=reg_pb.ModelChunk(file_index=index, data=chunk)
            )
