"""`ArtifactTransfers`: the MLflow side of the streamed artifact RPCs.

Bytes are passed on while they move: an upload is fed to MLflow while it still arrives,
a download goes out while it still arrives from MLflow. A streamed upload needs no disk:
if MLflow fails on the way, nothing is stored and the caller gets UNAVAILABLE and sends
the file again (the typed client does so by itself). Stores that do not stream (the
embedded store, a bucket written directly) get a complete, verified staging file.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.core.transfer import read_chunks
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.artifact_writers import ArtifactWriters, run_files
from mlflow_sidecar.server.keyed_locks import LockWaitExpiredError
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.mlflow_gateway.port import ArtifactUpload, StreamedDownload
from mlflow_sidecar.server.services.artifacts import (
    artifact_file,
    check_room_for_file,
    store_file,
)
from mlflow_sidecar.server.staging import Staging

log = logging.getLogger(__name__)

# How long an abandoned upload waits for MLflow's server to make its file's directory
# (to remove it, empty), and the pauses between its looks.
_DIRECTORY_WAIT_S = 2.0
_DIRECTORY_FIRST_PAUSE_S = 0.02
_DIRECTORY_MAX_PAUSE_S = 0.25


class PendingUpload:
    """One artifact upload in progress: fed chunk by chunk, then stored or abandoned."""

    def __init__(
        self,
        gateway: MlflowPort,
        staging: Staging,
        run_id: str,
        artifact_path: str,
        stream: ArtifactUpload | None,
        *,
        writers: ArtifactWriters,
    ) -> None:
        self._gateway = gateway
        self._staging = staging
        self._writers = writers
        self.run_id = run_id
        self.artifact_path = artifact_path
        self._stream = stream
        # Until its outcome is known, a PUT's directories are not another upload's to remove.
        self._under_way = ExitStack()
        if stream is not None:
            self._under_way.enter_context(writers.under_way(run_files(run_id), artifact_path))

    @property
    def needs_file(self) -> bool:
        """True when the bytes must be staged: the store takes files, not streams."""
        return self._stream is None

    def write(self, chunk: bytes) -> None:
        """Pass a received chunk on towards MLflow (when the store streams). Raises as soon
        as the PUT has failed, so that the caller hears it before sending the rest."""
        if self._stream is not None:
            self._stream.write(chunk)
            error = self._stream.failure()
            if error is not None:
                raise self._send_again(error)

    def store(self, verified_file: Path | None) -> None:
        """Make the verified upload the run's artifact: finish the PUT, or store the file.

        Returns or fails once the store's outcome is known, past the call's deadline if
        need be (DEADLINE_EXCEEDED then), holding the path so that no newer upload of it
        can be overtaken by this one."""
        if self._stream is None:
            if verified_file is None:
                raise ValueError("a store that takes files needs the staged file")
            store_file(
                self._gateway,
                self._staging,
                self.run_id,
                verified_file,
                self.artifact_path,
                writers=self._writers,
            )
            return
        # MLflow's server stores nothing before the last byte, which commit() sends: the
        # bytes so far may have travelled alongside another upload of this path.
        try:
            with self._writers.writing(run_files(self.run_id), self.artifact_path):
                error = self._stream.commit()
        finally:
            self._under_way.close()
        if error is not None:
            raise self._send_again(error)

    def _send_again(self, error: SidecarError) -> SidecarError:
        if not isinstance(error, UnavailableError):
            return error
        if self._stream is not None and self._stream.maybe_stored:
            # MLflow had every byte: only its answer failed, so it may have stored the file.
            told = (
                f"MLflow's answer to the upload of {self.artifact_path} failed after it had"
                " every byte, so it may or may not have stored it: send it again (the same"
                " bytes then replace it)"
            )
        else:
            told = f"MLflow failed while {self.artifact_path} was on its way and kept nothing;"
            told += " send it again"
        return UnavailableError(
            f"{told} ({error.message})", reason=error.reason, metadata=error.metadata
        )

    def abort(self) -> None:
        """Abandon the upload; MLflow keeps nothing of it. A no-op after `store()`."""
        if self._stream is None:
            return
        cut = self._stream.abort()
        self._under_way.close()
        if cut:
            self._remove_empty_directories()

    def _remove_empty_directories(self) -> None:
        # MLflow's server creates the file's directory when the PUT begins and leaves it
        # when the PUT is cut. An empty directory means nothing to an artifact store (a
        # bucket cannot even hold one), so the ones left empty are removed, deepest first.
        with call_deadline.cleanup_scope():
            self._remove_empty_directories_within()

    def _remove_empty_directories_within(self) -> None:
        directory = self.artifact_path.rpartition("/")[0]
        try:
            if directory:
                self._await_directory(directory)
            while directory:
                if not self._remove_if_empty(directory):
                    return
                directory = directory.rpartition("/")[0]
        except (SidecarError, LockWaitExpiredError) as exc:
            log.warning(
                "could not remove the empty directory %r of an abandoned upload to run %s: %s",
                directory,
                self.run_id,
                exc.message if isinstance(exc, SidecarError) else exc,
            )

    def _await_directory(self, directory: str) -> None:
        """Wait, at most `_DIRECTORY_WAIT_S`, for the file's directory to be listed: MLflow's
        server makes it when the cut PUT's handler begins, which may be well after the
        cut (its bytes wait in the connection's buffers). A store without directories (a
        bucket) never lists one, and the wait runs out."""
        parent = directory.rpartition("/")[0]
        waited_until = time.monotonic() + _DIRECTORY_WAIT_S
        pause = _DIRECTORY_FIRST_PAUSE_S
        while not any(
            e.path == directory for e in self._gateway.list_artifacts(self.run_id, parent)
        ):
            left = waited_until - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(pause, left))
            pause = min(pause * 2, _DIRECTORY_MAX_PAUSE_S)

    def _remove_if_empty(self, directory: str) -> bool:
        """Remove `directory` if it is empty; whether it was. One that another upload of
        this sidecar is writing into is left: its file in progress is not listed."""
        with self._writers.clearing(run_files(self.run_id), directory) as unused:
            if not unused:
                return False
            parent = directory.rpartition("/")[0]
            listed = self._gateway.list_artifacts(self.run_id, parent)
            entry = next((e for e in listed if e.path == directory), None)
            if entry is None or not entry.is_dir:
                return False
            if self._gateway.list_artifacts(self.run_id, directory):
                return False
            self._gateway.delete_artifacts(self.run_id, directory)
            return True


class ArtifactTransfers:
    """Starts streamed uploads and downloads of single artifact files."""

    def __init__(
        self, gateway: MlflowPort, staging: Staging, writers: ArtifactWriters | None = None
    ) -> None:
        """`writers`: the one instance shared by every service that stores artifacts."""
        self._gateway = gateway
        self._staging = staging
        self._writers = ArtifactWriters() if writers is None else writers

    def begin_upload(self, run_id: str, artifact_path: str, size_bytes: int) -> PendingUpload:
        """Check the run (it exists and is not deleted) and that the path is free for a
        file before any byte travels, and start the PUT. `artifact_path` is a checked
        relative path."""
        run = self._gateway.get_run(run_id)
        if run.info.lifecycle_stage is domain.LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
            )
        check_room_for_file(
            lambda path: self._gateway.list_artifacts(run_id, path),
            run_files(run_id),
            artifact_path,
        )
        directory, _, name = artifact_path.rpartition("/")
        stream = self._gateway.start_artifact_upload(
            run.info.artifact_uri, directory, name, size_bytes
        )
        return PendingUpload(
            self._gateway, self._staging, run_id, artifact_path, stream, writers=self._writers
        )

    def open_download(self, run_id: str, artifact_path: str, scratch: Path) -> StreamedDownload:
        """The bytes of one artifact file, streamed from MLflow when its store allows,
        else downloaded into `scratch` first."""
        check.run_id("run_id", run_id)
        listed = artifact_file(self._gateway, run_id, artifact_path)
        run = self._gateway.get_run(run_id)
        chunk_bytes = self._staging.chunk_bytes
        streamed = self._gateway.open_artifact_download(
            run.info.artifact_uri, artifact_path, chunk_bytes, listed.size_bytes
        )
        if streamed is not None:
            return streamed
        local = self._gateway.download_artifact(run_id, artifact_path, scratch)
        return StreamedDownload(local.stat().st_size, read_chunks(local, chunk_bytes), _no_op)


def _no_op() -> None:
    """Nothing to release: the scratch directory goes with the call."""
