"""Artifact rules shared by the tracking and registry services."""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from mlflow_sidecar.core.domain import FileInfo
from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.server.artifact_writers import ArtifactWriters, run_files
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.staging import Staging


def check_upload_size(field: str, size_bytes: int, max_upload_bytes: int | None) -> int:
    """A size that is not negative (INVALID_ARGUMENT) and within the limit (RESOURCE_EXHAUSTED).

    `max_upload_bytes` None means no limit."""
    if size_bytes < 0:
        raise InvalidArgumentError(field, f"must not be negative, got {size_bytes}")
    if max_upload_bytes is not None and size_bytes > max_upload_bytes:
        raise ResourceExhaustedError(
            f"{field}: {size_bytes} bytes is over the sidecar's upload limit of"
            f" {max_upload_bytes} bytes (artifacts.max_upload_bytes)",
            reason=ErrorReason.UPLOAD_TOO_LARGE,
            field=field,
        )
    return size_bytes


def store_file(
    gateway: MlflowPort,
    staging: Staging,
    run_id: str,
    source: Path,
    target: str,
    *,
    writers: ArtifactWriters,
) -> None:
    """Store the local file `source` as the run's artifact file `target` (a checked path),
    as the only writer of that path in this sidecar until the store's outcome is known."""
    directory, _, name = target.rpartition("/")
    if source.name == name:
        with writers.writing(run_files(run_id), target):
            gateway.log_artifact(run_id, source, directory)
        return
    # MLflow names a stored file after the local one: hand it a link (or copy) named right.
    with staging.directory("rename") as scratch:
        named = scratch / name
        try:
            os.link(source, named)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(source, named)
        with writers.writing(run_files(run_id), target):
            gateway.log_artifact(run_id, named, directory)


def artifact_file(gateway: MlflowPort, run_id: str, artifact_path: str) -> FileInfo:
    """The listing entry of one artifact file: NOT_FOUND when it is missing,
    INVALID_ARGUMENT when it is a directory."""
    check_relative_path("artifact_path", artifact_path)
    parent = artifact_path.rpartition("/")[0]
    listed = gateway.list_artifacts(run_id, parent)
    entry = next((e for e in listed if e.path == artifact_path), None)
    if entry is None:
        raise NotFoundError(
            f"run {run_id} has no artifact {artifact_path!r}", reason=ErrorReason.ARTIFACT_NOT_FOUND
        )
    if entry.is_dir:
        raise InvalidArgumentError(
            "artifact_path",
            f"{artifact_path!r} is a directory; list it and download its files one by one",
        )
    return entry


def check_room_for_file(
    listing: Callable[[str], Sequence[FileInfo]], owner: str, artifact_path: str
) -> None:
    """FAILED_PRECONDITION when the artifacts of `owner` (`run_files(...)`,
    `logged_model_files(...)`), listed a directory at a time by `listing`, leave no room
    for a file at `artifact_path` (a checked path): a directory has that path, or a file
    has the path of one of its directories. MLflow's server would fail the PUT with a bare
    HTTP 500 only once it has every byte, which reads as MLflow unavailable.

    Walks up only as far as a directory that exists: one listing for a file into one."""
    path = artifact_path
    while path:
        parent = path.rpartition("/")[0]
        listed = listing(parent)
        entry = next((e for e in listed if e.path == path), None)
        if entry is not None and entry.is_dir == (path == artifact_path):
            kind, needed = ("directory", "a file") if entry.is_dir else ("file", "a directory")
            raise FailedPreconditionError(
                f"{owner} has a {kind} at {path!r}, where the upload of"
                f" {artifact_path!r} needs {needed}"
            )
        if entry is not None or listed:
            return
        path = parent


def encode_listing_token(owner: str, path: str, after: str) -> str:
    """An opaque page token: whose artifacts (`owner`: a run or logged model id), the
    listed directory and the last path of the previous page.

    Keyset, not offset: artifacts added between two pages neither repeat nor vanish.
    """
    position = {"owner": owner, "path": path, "after": after}
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_listing_token(token: str, owner: str, path: str) -> str:
    """The last path of the previous page, from a token of `encode_listing_token`."""
    if not token:
        return ""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        decoded = None
    if (
        not isinstance(decoded, dict)
        or decoded.get("owner") != owner
        or decoded.get("path") != path
        or not isinstance(decoded.get("after"), str)
    ):
        raise InvalidArgumentError(
            "page_token",
            "is not a token of a previous ListArtifacts of this run and path",
            reason=ErrorReason.INVALID_PAGE_TOKEN,
        )
    after: str = decoded["after"]
    return after
