"""`SidecarArtifactRepository`: a run's artifacts through the sidecar's streams.

Serves the artifact URIs the sidecar's tracking store hands out,
`sidecar://HOST:PORT/runs/<run id>/artifacts[/<path>]`. Every file travels in chunks and
is verified by size and sha256 at the other end (the typed client's upload and download).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import FileInfo as MlflowFileInfo
from mlflow.store.artifact.artifact_repo import ArtifactRepository

from mlflow_sidecar.mlflow_plugin import entities
from mlflow_sidecar.mlflow_plugin.connection import SidecarUri, connection_for
from mlflow_sidecar.mlflow_plugin.errors import translated, unsupported


def _run_and_base(uri: SidecarUri, artifact_uri: str) -> tuple[str, str]:
    """The run id and the path inside the run's artifacts that `artifact_uri` names."""
    parts = uri.path.split("/")
    if len(parts) < 3 or parts[0] != "runs" or parts[2] != "artifacts" or not parts[1]:
        raise ValueError(
            f"{artifact_uri!r} is not a sidecar artifact URI:"
            f" expected {uri.root}/runs/<run id>/artifacts[/<path>]"
        )
    return parts[1], "/".join(p for p in parts[3:] if p)


def _join(*parts: str | None) -> str:
    """`parts` joined into one relative path, empty parts left out."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class SidecarArtifactRepository(ArtifactRepository):
    """The artifacts of one run (or a directory of them) behind a sidecar."""

    def __init__(
        self, artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None
    ) -> None:
        super().__init__(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
        parsed = SidecarUri.parse(artifact_uri)
        self._run_id, self._base = _run_and_base(parsed, artifact_uri)
        self._tracking = connection_for(artifact_uri).tracking

    @translated
    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        name = os.path.basename(local_file)
        self._tracking.upload_artifact(
            self._run_id, local_file, _join(self._base, artifact_path, name)
        )

    @translated
    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.relative_to(root).as_posix()
            self._tracking.upload_artifact(
                self._run_id, path, _join(self._base, artifact_path, relative)
            )

    @translated
    def list_artifacts(self, path: str | None = None) -> list[MlflowFileInfo]:
        listed: list[MlflowFileInfo] = []
        token = ""
        prefix = len(self._base) + 1 if self._base else 0
        while True:
            page = self._tracking.list_artifacts(
                self._run_id, _join(self._base, path), page_token=token
            )
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
            fetched = self._tracking.download_artifact(
                self._run_id, _join(self._base, remote_file_path), tmp
            )
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
