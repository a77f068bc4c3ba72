"""File plumbing for streamed transfers, shared by the gRPC clients and the sidecar:
chunk sizes and framing, hashing, directory walks and the verifying writer.

Everything here works in bounded memory: files are hashed, read and written one
chunk at a time, never held whole.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mlflow_sidecar.core.domain import Progress
from mlflow_sidecar.core.errors import (
    DISK_FULL_RETRY_AFTER_S,
    DataLossError,
    ErrorReason,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES
from mlflow_sidecar.core.paths import check_relative_path


def read_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    """The bytes of `path`, `chunk_bytes` at a time."""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            yield chunk


def file_digest(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    for chunk in read_chunks(path, chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def report(progress: Progress | None, done: int, total: int) -> None:
    """Call the progress callback, if any."""
    if progress is not None:
        progress(done, total)


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file of a directory being uploaded: its relative POSIX path and where it lives."""

    relpath: str
    path: Path
    size_bytes: int


def collect_files(root: Path, *, field: str = "local_dir") -> list[LocalFile]:
    """Every regular file under `root`, sorted by relative path.

    Symlinks are followed only while they stay inside `root`; one that points outside
    (or dangles, or loops back to its own ancestor) is refused with InvalidArgumentError,
    so an upload can never carry files from elsewhere on the machine. Empty directories
    carry no files and are therefore not part of the result.
    """
    if not root.is_dir():
        raise InvalidArgumentError(field, f"{root} is not a directory")
    return _TreeWalk(root, field).run()


# A directory still to list: as seen through root, its relative prefix, and the
# resolved directories above it (to recognise a symlink that loops back).
_PendingDir = tuple[Path, str, frozenset[Path]]


class _TreeWalk:
    """The state of one `collect_files` walk, so each kind of entry has its own method."""

    def __init__(self, root: Path, field: str) -> None:
        self.root = root
        self.field = field
        self.real_root = root.resolve()
        self.found: list[LocalFile] = []
        self.pending: list[_PendingDir] = [(root, "", frozenset({self.real_root}))]

    def run(self) -> list[LocalFile]:
        while self.pending:
            directory, prefix, ancestors = self.pending.pop()
            with os.scandir(directory) as entries:
                listing = sorted(entries, key=lambda e: e.name)
            for entry in listing:
                self._visit(entry, f"{prefix}{entry.name}", ancestors)
        return sorted(self.found, key=lambda f: f.relpath)

    def _visit(self, entry: os.DirEntry[str], relpath: str, ancestors: frozenset[Path]) -> None:
        path = Path(entry.path)
        if entry.is_symlink():
            self._visit_symlink(path, relpath, ancestors)
        elif entry.is_dir(follow_symlinks=False):
            self.pending.append((path, relpath + "/", ancestors | {path.resolve()}))
        elif entry.is_file(follow_symlinks=False):
            check_relative_path(self.field, relpath)
            self.found.append(LocalFile(relpath, path, entry.stat(follow_symlinks=False).st_size))
        else:
            raise InvalidArgumentError(self.field, f"{relpath!r} is not a regular file")

    def _visit_symlink(self, path: Path, relpath: str, ancestors: frozenset[Path]) -> None:
        # The link keeps its own path in the result; its target only decides whether the
        # link is allowed and whether it is walked as a directory or read as a file.
        target = path.resolve()
        if not target.is_relative_to(self.real_root):
            raise InvalidArgumentError(
                self.field, f"{relpath!r} is a symlink to {target}, outside {self.root}"
            )
        if target.is_dir():
            if target in ancestors:
                raise InvalidArgumentError(self.field, f"{relpath!r} is a symlink loop")
            self.pending.append((path, relpath + "/", ancestors | {target}))
        elif target.is_file():
            check_relative_path(self.field, relpath)
            self.found.append(LocalFile(relpath, path, target.stat().st_size))
        else:
            raise InvalidArgumentError(self.field, f"{relpath!r} is a dangling symlink")


class HashingWriter:
    """Writes one file whose size is announced up front, and checks it and the sha256.

    The digest is announced with the size, or (`sha256` None) handed to `finish()` once
    it arrives after the bytes. Bytes beyond the announced size are refused at once;
    `finish()` raises DataLossError when fewer bytes arrived or the digest differs. Use
    it as a context manager: leaving the block with an exception, or without `finish()`,
    deletes the file.
    """

    def __init__(
        self, path: Path | None, size_bytes: int, sha256: str | None, *, what: str
    ) -> None:
        """`path` None: the bytes go elsewhere; only their size and digest are checked."""
        self.path = path
        self.expected_size = size_bytes
        self.expected_sha256 = sha256
        self.what = what
        self.written = 0
        self._digest = hashlib.sha256()
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = path.open("xb")
        self._finished = False

    def write(self, data: bytes) -> None:
        """Append a chunk."""
        if self.written + len(data) > self.expected_size:
            raise DataLossError(
                f"{self.what}: received more than the {self.expected_size} bytes announced",
                reason=ErrorReason.DIGEST_MISMATCH,
            )
        if self._handle is not None and self.path is not None:
            try:
                self._handle.write(data)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    # The directory is not named: on the sidecar it is a path of its host.
                    raise ResourceExhaustedError(
                        f"the disk is full: {self.what} could not be written; retry later",
                        reason=ErrorReason.DISK_FULL,
                        retry_after_s=DISK_FULL_RETRY_AFTER_S,
                    ) from exc
                raise
        self._digest.update(data)
        self.written += len(data)

    def finish(self, sha256: str | None = None) -> None:
        """Close the file and verify its size and sha256 (DataLossError on mismatch).

        `sha256` is the digest that came after the bytes; it must agree with the one
        announced up front, if any."""
        if self._handle is not None:
            self._handle.close()
        if self.written != self.expected_size:
            raise DataLossError(
                f"{self.what}: received {self.written} of the {self.expected_size} bytes announced",
                reason=ErrorReason.DIGEST_MISMATCH,
            )
        expected = sha256 or self.expected_sha256
        if not expected:
            raise DataLossError(f"{self.what}: no sha256 arrived to verify the bytes against")
        if self.expected_sha256 and sha256 and sha256.lower() != self.expected_sha256.lower():
            raise DataLossError(
                f"{self.what}: the trailing sha256 {sha256} contradicts the announced"
                f" {self.expected_sha256}",
                reason=ErrorReason.DIGEST_MISMATCH,
            )
        actual = self._digest.hexdigest()
        if actual != expected.lower():
            raise DataLossError(
                f"{self.what}: sha256 {actual} does not match the announced {expected}",
                reason=ErrorReason.DIGEST_MISMATCH,
            )
        self._finished = True

    def discard(self) -> None:
        """Close and delete the file."""
        if self._handle is not None:
            self._handle.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Delete the file unless `finish()` verified it."""
        if not self._finished:
            self.discard()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None or not self._finished:
            self.discard()
