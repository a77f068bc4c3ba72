"""Reading a model version from the sidecar's model cache through a shared volume.

A sidecar and its inference container can share the sidecar's data dir (a Kubernetes
`emptyDir` mounted in both, read-only on the client's side). A download then asks with
`accept_cache_entry`; for a cached version the sidecar answers with the manifest and the
entry's place in its cache instead of the bytes, and the client copies the files from
there, verifying each against the manifest's size and sha256 as it copies. The sidecar
does not hash the entry for such an answer: this check is the one that counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlflow_sidecar.core.domain import Progress
from mlflow_sidecar.core.errors import DataLossError, InvalidArgumentError
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.core.transfer import HashingWriter, read_chunks, report
from mlflow_sidecar.v1 import registry_pb2 as pb

# Larger than a gRPC chunk: a local copy has no message limit, and fewer Python-level
# steps per byte is what makes it fast.
COPY_BYTES = 4 * 1024 * 1024


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
    """Copy the manifest's `files` from the entry at `source` into `staging`, verifying
    each; CacheEntryUnreadableError (and nothing verified left in `staging` for that file) when
    one is missing, unreadable or differs from the manifest."""
    total = sum(entry.size_bytes for entry in files)
    report(progress, 0, total)
    done = 0
    for entry in files:
        local = source.joinpath(*entry.path.split("/"))
        target = staging.joinpath(*entry.path.split("/"))
        try:
            with HashingWriter(target, entry.size_bytes, entry.sha256, what=entry.path) as writer:
                for chunk in read_chunks(local, COPY_BYTES):
                    writer.write(chunk)
                    done += len(chunk)
                    report(progress, done, total)
                writer.finish()
        except DataLossError as exc:
            raise CacheEntryUnreadableError(f"{local}: {exc.message}") from exc
        except OSError as exc:
            raise CacheEntryUnreadableError(f"{local}: {exc.strerror or exc}") from exc
