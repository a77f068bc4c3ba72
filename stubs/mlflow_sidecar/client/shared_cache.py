"""Reading a model version from the sidecar's model cache through a shared volume.

A sidecar and its inference container can share the sidecar's data dir (a Kubernetes
`emptyDir` mounted in both, read-only on the client's side). A download then asks with
`accept_cache_entry`; for a cached version the sidecar answers with the manifest and the
entry's place in its cache instead of the bytes, and the client copies the files from
there (in the kernel: the bytes do not pass through Python) and verifies each copy against
the manifest's size and sha256. The sidecar does not hash the entry for such an answer:
this check is the one that counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlflow_sidecar.core.domain import Progress
from mlflow_sidecar.core.errors import DataLossError, InvalidArgumentError
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.core.regular_files import copy_at_most, open_regular_file
from mlflow_sidecar.core.transfer import file_digest, report
from mlflow_sidecar.v1 import registry_pb2 as pb


class CacheEntryUnreadableError(Exception):
    """The entry named by the sidecar could not be copied as the manifest describes it
    (not mounted here, evicted or replaced meanwhile, damaged): download the bytes."""


def entry_root(shared_dir: Path, entry_path: str) -> Path:
    """Where the entry `entry_path` lies under `shared_dir`, refusing a path that could
    lead out of it (DataLossError: the sidecar named no place in its cache)."""
    try:
        check_relative_path("cache_entry.path", entry_path)
    except InvalidArgumentError as exc:
        raise DataLossError(f"the sidecar named an unsafe cache entry: {exc.message}") from None
    return shared_dir.joinpath(*entry_path.split("/"))


def copy_entry(
    files: Sequence[pb.ModelFile],
    source: Path,
    staging: Path,
    progress: Progress | None,
) -> None:
    """Copy the manifest's `files` from the entry at `source` into `staging`, then verify
    each copy; CacheEntryUnreadableError (and the copy that failed removed) when a file is
    missing, unreadable, not a regular file or differs from the manifest (a file longer
    than its size is copied only one byte past it)."""
    total = sum(entry.size_bytes for entry in files)
    report(progress, 0, total)
    done = 0
    for entry in files:
        local = source.joinpath(*entry.path.split("/"))
        target = staging.joinpath(*entry.path.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Only a regular file, and no more than one byte past its size: a file swapped
            # for a symlink to /dev/zero would otherwise be copied until the disk is full.
            # The kernel copies (sendfile): the bytes do not pass through Python. The copy
            # is what gets verified, so a source changing meanwhile is caught.
            with open_regular_file(local) as original, target.open("wb") as copy:
                copy_at_most(original, copy, entry.size_bytes + 1)
            size, sha256 = file_digest(target)
        except OSError as exc:
            target.unlink(missing_ok=True)
            raise CacheEntryUnreadableError(f"{local}: {exc.strerror or exc}") from exc
        if size > entry.size_bytes:
            target.unlink()
            raise CacheEntryUnreadableError(
                f"{local}: longer than the manifest's {entry.size_bytes} bytes"
            )
        if (size, sha256) != (entry.size_bytes, entry.sha256.lower()):
            target.unlink()
            raise CacheEntryUnreadableError(
                f"{local}: {size} bytes with sha256 {sha256} do not match the manifest's"
                f" {entry.size_bytes} bytes with sha256 {entry.sha256}"
            )
        done += entry.size_bytes
        report(progress, done, total)
