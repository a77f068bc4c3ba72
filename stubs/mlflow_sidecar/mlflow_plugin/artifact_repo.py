"""`SidecarArtifactRepository`: a run's artifacts, or a logged model's files, through the
sidecar's streams.

Serves the artifact URIs the sidecar's tracking store hands out,
`sidecar://HOST:PORT/runs/<run id>/artifacts[/<path>]` and
`sidecar://HOST:PORT/models/<model id>/artifacts[/<path>]`. Every file travels in chunks and
is verified by size and sha256 at the other end (the typed client's upload and download).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

from mlflow.entities import FileInfo as MlflowFileInfo
from mlflow.store.artifact.artifact_repo import ArtifactRepository, verify_artifact_path

from mlflow_sidecar.client.grpc_logged_models import GrpcLoggedModels
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.domain import FileInfo, Page
from mlflow_sidecar.mlflow_plugin import entities
from mlflow_sidecar.mlflow_plugin.connection import ProcessConnection, SidecarUri
from mlflow_sidecar.mlflow_plugin.errors import translated, unsupported


class _Files(Protocol):
    """The files of one run or one logged model, as the typed client moves them."""

    def upload(self, local: str | Path, path: str) -> None: ...

    def list(self, path: str, page_token: str) -> Page[FileInfo]: ...

    def download(self, path: str, dst_dir: str) -> Path: ...


class _RunFiles:
    def __init__(self, connection: ProcessConnection, run_id: str) -> None:
        self._connection, self._run_id = connection, run_id

    @property
    def _tracking(self) -> GrpcExperimentTracking:
        return self._connection.get().tracking

    def upload(self, local: str | Path, path: str) -> None:
        self._tracking.upload_artifact(self._run_id, local, path)

    def list(self, path: str, page_token: str) -> Page[FileInfo]:
        return self._tracking.list_artifacts(self._run_id, path, page_token=page_token)

    def download(self, path: str, dst_dir: str) -> Path:
        return self._tracking.download_artifact(self._run_id, path, dst_dir)


class _ModelFiles:
    def __init__(self, connection: ProcessConnection, model_id: str) -> None:
        self._connection, self._model_id = connection, model_id

    @property
    def _models(self) -> GrpcLoggedModels:
        return self._connection.get().models

    def upload(self, local: str | Path, path: str) -> None:
        self._models.upload_artifact(self._model_id, local, path)

    def list(self, path: str, page_token: str) -> Page[FileInfo]:
        return self._models.list_artifacts(self._model_id, path, page_token=page_token)

    def download(self, path: str, dst_dir: str) -> Path:
        return self._models.download_artifact(self._model_id, path, dst_dir)


def _files_and_base(artifact_uri: str) -> tuple[_Files, str]:
    """Whose files `artifact_uri` names (a run's or a logged model's) and the path inside."""
    uri = SidecarUri.parse(artifact_uri)
    parts = uri.path.split("/")
    if (
        len(parts) < 3
        or parts[0] not in ("runs", "models")
        or parts[2] != "artifacts"
        or not parts[1]
    ):
        raise ValueError(
            f"{artifact_uri!r} is not a sidecar artifact URI: expected"
            f" {uri.root}/runs/<run id>/artifacts[/<path>] or"
            f" {uri.root}/models/<model id>/artifacts[/<path>]"
        )
    connection = ProcessConnection(artifact_uri)
    base = "/".join(p for p in parts[3:] if p)
    if parts[0] == "runs":
        return _RunFiles(connection, parts[1]), base
    return _ModelFiles(connection, parts[1]), base


def _join(*parts: str | None) -> str:
    """`parts` joined into one relative path, empty parts left out."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class SidecarArtifactRepository(ArtifactRepository):
    """The artifacts of one run (or a directory of them) behind a sidecar."""

    def __init__(
        self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
    ) -> None:
        super().__init__(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
        self._files, self._base = _files_and_base(artifact_uri)

    @translated
    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        # MLflow's own repositories refuse a directory that is not what it names ("/",
        # "a/../b"); joined here, "/" would go unnoticed and the file land at the root.
        verify_artifact_path(artifact_path)
        if not os.path.isfile(local_file):
            # As MLflow's own repositories fail to open it: callers catch that OSError.
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), local_file)
        name = os.path.basename(local_file)
        self._files.upload(local_file, _join(self._base, artifact_path, name))

    @translated
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        verify_artifact_path(artifact_path)
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            self._files.upload(path, _join(self._base, artifact_path, relative))

    @translated
    def list_artifacts(self, path: str | None = None) -> list[MlflowFileInfo]:
        listed: list[MlflowFileInfo] = []
        token = ""
        prefix = len(self._base) + 1 if self._base else 0
        while True:
            page = self._files.list(_join(self._base, path), token)
            # MLflow expects paths relative to the repository's root.
            listed.extend(entities.file_info(f, f.path[prefix:]) for f in page.items)
            token = page.next_page_token
            if not token:
                return listed

    @translated
    def _download_file(self, remote_file_path: str, local_path: str) -> None:
        destination = Path(local_path)
        # Downloaded into a private directory beside the destination: the file appears
        # only once verified, and a rename within one file system is atomic.
        with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".sidecar-") as tmp:
            fetched = self._files.download(_join(self._base, remote_file_path), tmp)
            shutil.move(fetched, destination)

    def delete_artifacts(self, artifact_path: str | None = None) -> None:
        raise unsupported("Deleting artifacts")

    def create_multipart_upload(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("A multipart upload")

    def complete_multipart_upload(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("A multipart upload")

    def abort_multipart_upload(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("A multipart upload")

    def get_download_presigned_url(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("A presigned download URL")

    def create_presigned_upload_url(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("A presigned upload URL")

    def log_artifact_from_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("Logging an artifact from a stream")

    async def log_artifact_from_async_stream(self, *args: Any, **kwargs: Any) -> Any:
        raise unsupported("Logging an artifact from a stream")
