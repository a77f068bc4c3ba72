"""`GrpcModelRegistry`: the `ModelRegistry` port over the sidecar's gRPC API."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mlflow_sidecar.client.alias_watch import GrpcAliasWatch
from mlflow_sidecar.client.arguments import int64, string_map, strings
from mlflow_sidecar.client.directory_swap import replace_directory
from mlflow_sidecar.client.downloads import STAGING, claimed, sibling_path, sweep_stale
from mlflow_sidecar.client.grpc_tracking import check_chunk_bytes, invoke
from mlflow_sidecar.client.ports import AliasWatch, ModelRegistry, StrPath
from mlflow_sidecar.client.shared_cache import CacheEntryUnreadableError, copy_entry, entry_root
from mlflow_sidecar.client.streaming import invoke_client_stream, resent_on_unavailable
from mlflow_sidecar.client.unary_retry import Reconnect
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import (
    ModelVersion,
    Page,
    Progress,
    RegisteredModel,
    SyncedModel,
)
from mlflow_sidecar.core.errors import (
    DataLossError,
    InvalidArgumentError,
)
from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES, DEFAULT_PAGE_SIZE
from mlflow_sidecar.core.model_digest import directory_digest, model_digest
from mlflow_sidecar.core.paths import FileTree, check_stored_path
from mlflow_sidecar.core.transfer import (
    HashingWriter,
    LocalFile,
    collect_files,
    file_digest,
    read_chunks,
    report,
)
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc

# As many symlinks as Linux follows in one path before it calls it a loop (ELOOP).
_SYMLINK_HOPS = 40

log = logging.getLogger(__name__)


class GrpcModelRegistry(ModelRegistry):
    """The model registry through a sidecar; every call carries `timeout_s` as its deadline,
    model transfers `transfer_timeout_s`. Uploads go in chunks of `chunk_bytes`. Downloads
    ask for chunks of at most `download_chunk_bytes` (0: the sidecar's own).

    Every call that creates, renames or deletes carries a request id (a fresh UUID4 unless
    given), kept across the channel's retries, so that it takes effect once. A model
    upload or download that found the sidecar unreachable is sent again, up to
    `upload_attempts` times in all, an upload with the same request id: the sidecar
    answers a repeat of an upload that took effect with its version, before the files
    travel again. With `reconnect` (its channel's), each sending again first waits for the
    sidecar to be back, within `transfer_timeout_s`. A watch reconnects for up to
    `watch_reconnect_s` of failing in a row.

    With `shared_cache_dir` (where this process sees the sidecar's model cache directory,
    `<data_dir>/models`, through a shared volume), a cached version is copied from there
    and verified instead of streamed; when that copy fails (the entry is not there, or
    differs from its manifest), the version is streamed after all."""

    def __init__(
        self,
        stub: pb_grpc.ModelRegistryServiceStub,
        timeout_s: float = 30.0,
        *,
        transfer_timeout_s: float = 3600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        download_chunk_bytes: int = 0,
        upload_attempts: int = 3,
        reconnect: Reconnect | None = None,
        watch_reconnect_s: float = 60.0,
        shared_cache_dir: StrPath | None = None,
    ) -> None:
        self._stub = stub
        self._shared_cache = Path(shared_cache_dir) if shared_cache_dir else None
        self._timeout = timeout_s
        self._transfer_timeout = transfer_timeout_s
        self._chunk_bytes = check_chunk_bytes(chunk_bytes)
        # What the channel receives: the sidecar cuts a download's chunks to it (0: its own).
        self._download_chunk_bytes = download_chunk_bytes
        self._upload = resent_on_unavailable(
            self._upload_once, upload_attempts, reconnect, transfer_timeout_s, upload=True
        )
        # Downloads are sent again here, not by gRPC's retry policy (see channel.py).
        self._download = resent_on_unavailable(
            self._download_once, upload_attempts, reconnect, transfer_timeout_s
        )
        self._watch_reconnect_s = watch_reconnect_s

    @property
    def shared_cache_dir(self) -> Path | None:
        """Where this client reads the sidecar's model cache, or None (always streamed)."""
        return self._shared_cache

    def create_registered_model(
        self,
        name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> RegisteredModel:
        request = pb.CreateRegisteredModelRequest(
            name=name,
            description=description,
            tags=string_map("tags", tags or {}),
            get_if_exists=get_if_exists,
            request_id=request_id or uuid.uuid4().hex,
        )
        reply = invoke(self._stub.CreateRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def get_registered_model(self, name: str) -> RegisteredModel:
        request = pb.GetRegisteredModelRequest(name=name)
        reply = invoke(self._stub.GetRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def search_registered_models(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegisteredModel]:
        request = pb.SearchRegisteredModelsRequest(
            filter=filter_string,
            order_by=strings("order_by", order_by),
            page_size=page_size,
            page_token=page_token,
        )
        reply = invoke(self._stub.SearchRegisteredModels, request, self._timeout)
        return Page(
            tuple(conv.registered_model_from_pb(m) for m in reply.registered_models),
            reply.next_page_token,
        )

    def update_registered_model(self, name: str, *, description: str) -> RegisteredModel:
        request = pb.UpdateRegisteredModelRequest(name=name, description=description)
        reply = invoke(self._stub.UpdateRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str = ""
    ) -> RegisteredModel:
        request = pb.RenameRegisteredModelRequest(
            name=name, new_name=new_name, request_id=request_id or uuid.uuid4().hex
        )
        reply = invoke(self._stub.RenameRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def delete_registered_model(self, name: str, *, request_id: str = "") -> None:
        invoke(
            self._stub.DeleteRegisteredModel,
            pb.DeleteRegisteredModelRequest(name=name, request_id=request_id or uuid.uuid4().hex),
            self._timeout,
        )

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        request = pb.SetRegisteredModelTagRequest(name=name, key=key, value=value)
        invoke(self._stub.SetRegisteredModelTag, request, self._timeout)

    def delete_registered_model_tag(self, name: str, key: str, *, request_id: str = "") -> None:
        request = pb.DeleteRegisteredModelTagRequest(
            name=name, key=key, request_id=request_id or uuid.uuid4().hex
        )
        invoke(self._stub.DeleteRegisteredModelTag, request, self._timeout)

    def create_model_version(
        self,
        name: str,
        *,
        source: str = "",
        run_id: str = "",
        artifact_path: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> ModelVersion:
        request = pb.CreateModelVersionRequest(
            name=name,
            source=source,
            run_id=run_id,
            artifact_path=artifact_path,
            description=description,
            tags=string_map("tags", tags or {}),
            request_id=request_id or uuid.uuid4().hex,
        )
        reply = invoke(self._stub.CreateModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_model_version(self, name: str, version: int) -> ModelVersion:
        request = pb.GetModelVersionRequest(name=name, version=int64("version", version))
        reply = invoke(self._stub.GetModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        request = pb.GetModelVersionByAliasRequest(name=name, alias=alias)
        reply = invoke(self._stub.GetModelVersionByAlias, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_latest_model_version(self, name: str) -> ModelVersion:
        request = pb.GetLatestModelVersionRequest(name=name)
        reply = invoke(self._stub.GetLatestModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def search_model_versions(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[ModelVersion]:
        request = pb.SearchModelVersionsRequest(
            filter=filter_string,
            order_by=strings("order_by", order_by),
            page_size=page_size,
            page_token=page_token,
        )
        reply = invoke(self._stub.SearchModelVersions, request, self._timeout)
        return Page(
            tuple(conv.model_version_from_pb(v) for v in reply.model_versions),
            reply.next_page_token,
        )

    def update_model_version(self, name: str, version: int, *, description: str) -> ModelVersion:
        request = pb.UpdateModelVersionRequest(
            name=name, version=int64("version", version), description=description
        )
        reply = invoke(self._stub.UpdateModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def delete_model_version(self, name: str, version: int, *, request_id: str = "") -> None:
        request = pb.DeleteModelVersionRequest(
            name=name, version=int64("version", version), request_id=request_id or uuid.uuid4().hex
        )
        invoke(self._stub.DeleteModelVersion, request, self._timeout)

    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        request = pb.SetModelVersionTagRequest(
            name=name, version=int64("version", version), key=key, value=value
        )
        invoke(self._stub.SetModelVersionTag, request, self._timeout)

    def delete_model_version_tag(
        self, name: str, version: int, key: str, *, request_id: str = ""
    ) -> None:
        request = pb.DeleteModelVersionTagRequest(
            name=name,
            version=int64("version", version),
            key=key,
            request_id=request_id or uuid.uuid4().hex,
        )
        invoke(self._stub.DeleteModelVersionTag, request, self._timeout)

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        request = pb.SetModelAliasRequest(name=name, alias=alias, version=int64("version", version))
        invoke(self._stub.SetModelAlias, request, self._timeout)

    def delete_model_alias(self, name: str, alias: str, *, request_id: str = "") -> None:
        request = pb.DeleteModelAliasRequest(
            name=name, alias=alias, request_id=request_id or uuid.uuid4().hex
        )
        invoke(self._stub.DeleteModelAlias, request, self._timeout)

    def watch(
        self,
        name: str,
        aliases: Sequence[str],
        *,
        last_seen_versions: Mapping[str, int] | None = None,
        last_seen_creation_times_ms: Mapping[str, int] | None = None,
    ) -> AliasWatch:
        return GrpcAliasWatch(
            self._stub,
            name,
            aliases,
            last_seen_versions=last_seen_versions,
            last_seen_creation_times_ms=last_seen_creation_times_ms,
            reconnect_s=self._watch_reconnect_s,
        )

    def upload_model(
        self,
        name: str,
        local_dir: StrPath,
        *,
        run_id: str = "",
        experiment_id: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
        progress: Progress | None = None,
        request_id: str = "",
    ) -> ModelVersion:
        files = collect_files(Path(local_dir))
        if not files:
            raise InvalidArgumentError("local_dir", f"{local_dir} contains no files")
        for local in files:
            check_stored_path("local_dir", local.relpath)
        header = pb.UploadModelHeader(
            name=name,
            run_id=run_id,
            experiment_id=experiment_id,
            description=description,
            tags=string_map("tags", tags or {}),
            aliases=strings("aliases", aliases),
            request_id=request_id or uuid.uuid4().hex,
        )
        version: ModelVersion = self._upload(header, files, progress)
        return version

    def _upload_once(
        self, header: pb.UploadModelHeader, files: Sequence[LocalFile], progress: Progress | None
    ) -> ModelVersion:
        # The stream announces each file's size and digest before its bytes: one read here.
        described = [(f, *file_digest(f.path, self._chunk_bytes)) for f in files]
        total = sum(size for _, size, _ in described)
        header.total_size_bytes = total
        chunk_bytes = self._chunk_bytes

        def requests() -> Iterator[pb.UploadModelRequest]:
            yield pb.UploadModelRequest(header=header)
            report(progress, 0, total)
            sent = 0
            for local, size, sha256 in described:
                announced = pb.UploadModelFile(path=local.relpath, size_bytes=size, sha256=sha256)
                yield pb.UploadModelRequest(file=announced)
                for chunk in read_chunks(local.path, chunk_bytes):
                    yield pb.UploadModelRequest(chunk=chunk)
                    sent += len(chunk)
                    report(progress, sent, total)

        reply = invoke_client_stream(self._stub.UploadModel, requests(), self._transfer_timeout)
        return conv.model_version_from_pb(reply.model_version)

    def download_model(
        self,
        name: str,
        dst_dir: StrPath,
        *,
        version: int | None = None,
        alias: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        return self.sync_model(name, dst_dir, version=version, alias=alias, progress=progress).path

    def sync_model(
        self,
        name: str,
        dst_dir: StrPath,
        *,
        version: int | None = None,
        alias: str | None = None,
        progress: Progress | None = None,
    ) -> SyncedModel:
        if version is not None and alias is None:
            request = pb.DownloadModelRequest(name=name, version=int64("version", version))
        elif alias is not None and version is None:
            request = pb.DownloadModelRequest(name=name, alias=alias)
        else:
            raise InvalidArgumentError("selector", "give exactly one of version or alias")
        given = Path(dst_dir)
        destination = _swapped_directory(dst_dir)
        if destination.exists() and not destination.is_dir():
            raise InvalidArgumentError("dst_dir", f"{given} is not a directory")
        request.if_none_match = _digest_held(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        request.accept_cache_entry = self._shared_cache is not None
        request.max_chunk_bytes = self._download_chunk_bytes
        try:
            answer = self._download(request, destination, progress)
        except CacheEntryUnreadableError as exc:
            log.warning(
                "could not read %s version %s from the shared model cache (%s): downloading"
                " it from the sidecar instead",
                name,
                version if version is not None else f"@{alias}",
                exc,
            )
            request.accept_cache_entry = False
            answer = self._download(request, destination, progress)
        return dataclasses.replace(answer, path=given)

    def _download_once(
        self, request: pb.DownloadModelRequest, destination: Path, progress: Progress | None
    ) -> SyncedModel:
        """One DownloadModel call into `destination`, swapped in once verified."""
        # A sibling of the destination: the same filesystem, so it can take its place.
        incoming = sibling_path(destination, STAGING)
        call = self._stub.DownloadModel(request, timeout=self._transfer_timeout)
        try:
            first = next(call, None)
            if first is not None and first.WhichOneof("payload") == "unchanged":
                return _unchanged(destination, request.if_none_match, first.unchanged)
            manifest = _manifest(first)
            sweep_stale(destination.parent)
            incoming.mkdir()
            with claimed(incoming):
                try:
                    self._receive(manifest, call, incoming, progress)
                    replace_directory(incoming, destination)
                finally:
                    shutil.rmtree(incoming, ignore_errors=True)
        finally:
            call.cancel()
        return SyncedModel(
            destination,
            conv.model_version_from_pb(manifest.model_version),
            manifest.digest or _digest_of(manifest.files),
            changed=True,
        )

    def _receive(
        self,
        manifest: pb.ModelManifest,
        call: Iterator[pb.DownloadModelResponse],
        incoming: Path,
        progress: Progress | None,
    ) -> None:
        second = next(call, None)
        if second is not None and second.WhichOneof("payload") == "cache_entry":
            self._copy_entry(manifest, second.cache_entry, incoming, progress)
            if next(call, None) is not None:
                raise DataLossError("the sidecar sent more after the cache entry")
        else:
            following = call if second is None else itertools.chain([second], call)
            _receive_files(manifest.files, following, incoming, progress)

    def _copy_entry(
        self,
        manifest: pb.ModelManifest,
        entry: pb.ModelCacheEntry,
        incoming: Path,
        progress: Progress | None,
    ) -> None:
        if self._shared_cache is None:
            raise DataLossError("the sidecar named a cache entry, which was not asked for")
        source = entry_root(self._shared_cache, entry.path)
        copy_entry(manifest.files, source, incoming, progress)


def _swapped_directory(dst_dir: StrPath) -> Path:
    """The directory a download into `dst_dir` replaces: `dst_dir` itself or, when it is a
    symlink, the directory the link names (the link stays and names the new copy).

    A name that is not a directory's own (`.`, `..`, the root) cannot be swapped: it is
    refused before anything is transferred."""
    named = os.fspath(dst_dir)
    path = Path(named)
    for _ in range(_SYMLINK_HOPS):
        if named.rstrip("/").rpartition("/")[2] in ("", ".", ".."):
            raise InvalidArgumentError(
                "dst_dir",
                f"{os.fspath(dst_dir)!r} does not end in a directory's name (it ends in '.',"
                " '..' or '/', or is a symlink to such a path): give the directory by its name",
            )
        if not path.is_symlink():
            return path
        named = os.readlink(path)
        path = path.parent / named
    raise InvalidArgumentError("dst_dir", f"{os.fspath(dst_dir)!r} is a loop of symlinks")


def _digest_held(destination: Path) -> str:
    """The digest of the model `destination` holds, or "" when it holds nothing that a
    digest can describe (absent, or with files the client would not upload)."""
    if not destination.is_dir():
        return ""
    try:
        return directory_digest(destination)
    except (InvalidArgumentError, OSError):
        return ""


def _digest_of(files: Sequence[pb.ModelFile]) -> str:
    return model_digest((entry.path, entry.sha256) for entry in files)


def _unchanged(destination: Path, sent: str, answer: pb.ModelUnchanged) -> SyncedModel:
    if not sent or answer.digest.lower() != sent:
        raise DataLossError("the sidecar answered unchanged to a digest it was not sent")
    return SyncedModel(
        destination, conv.model_version_from_pb(answer.model_version), sent, changed=False
    )


def _receive_files(
    files: Sequence[pb.ModelFile],
    responses: Iterator[pb.DownloadModelResponse],
    staging: Path,
    progress: Progress | None,
) -> None:
    """Write the chunks of a DownloadModel stream under `staging`, verifying every file."""
    total = sum(entry.size_bytes for entry in files)
    report(progress, 0, total)
    done = 0
    receiver = _ModelFiles(files, staging)
    try:
        for message in responses:
            done += receiver.write(message)
            report(progress, done, total)
        receiver.finish()
    finally:
        receiver.close()


def _manifest(first: pb.DownloadModelResponse | None) -> pb.ModelManifest:
    """The manifest, once every path is known to stay in the destination and the digest
    agrees with the files."""
    if first is None or first.WhichOneof("payload") != "manifest":
        raise DataLossError("the sidecar sent no manifest")
    manifest = first.manifest
    _manifest_files(manifest.files)
    if manifest.digest and manifest.digest != _digest_of(manifest.files):
        raise DataLossError("the manifest's digest does not match its files")
    return manifest


def _manifest_files(files: Sequence[pb.ModelFile]) -> None:
    """Refuse a manifest with a path that could escape the destination."""
    tree = FileTree()
    for index, entry in enumerate(files):
        try:
            tree.add(f"manifest.files[{index}].path", entry.path)
        except InvalidArgumentError as exc:
            # The sidecar sent a path that could escape the destination: refuse it.
            raise DataLossError(f"unsafe manifest: {exc.message}") from None


class _ModelFiles:
    """The files of a manifest, written under `staging` in its order as their chunks come.

    Only one file is open at a time: a chunk for a later file finishes (and so verifies)
    every file before it, including empty ones, which get no chunks."""

    def __init__(self, files: Sequence[pb.ModelFile], staging: Path) -> None:
        self._files = files
        self._staging = staging
        self._current = -1
        self._writer: HashingWriter | None = None

    def write(self, message: pb.DownloadModelResponse) -> int:
        """Write one chunk message into its file; returns the bytes it carried."""
        kind = message.WhichOneof("payload")
        if kind != "chunk":
            raise DataLossError(f"the sidecar sent a {kind or 'empty message'} among the chunks")
        index = message.chunk.file_index
        if not self._current <= index < len(self._files):
            raise DataLossError(f"chunk for file {index} arrived out of order")
        while self._current < index:
            self._advance()
        assert self._writer is not None
        self._writer.write(message.chunk.data)
        return len(message.chunk.data)

    def finish(self) -> None:
        """Verify the last files; the stream has ended."""
        # Empty files at the end get no chunks; open and finish them too.
        while self._current < len(self._files) - 1:
            self._advance()
        if self._writer is not None:
            self._writer.finish()

    def close(self) -> None:
        # A file left unfinished is deleted by its writer (see HashingWriter).
        if self._writer is not None:
            self._writer.close()

    def _advance(self) -> None:
        # Finish the file being written, then open the next one of the manifest.
        if self._writer is not None:
            self._writer.finish()
        self._current += 1
        entry = self._files[self._current]
        self._writer = HashingWriter(
            self._staging.joinpath(*entry.path.split("/")),
            entry.size_bytes,
            entry.sha256,
            what=entry.path,
        )
