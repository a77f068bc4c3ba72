"""Reading files whose size is known in advance, as no more than that.

A model cache entry's files are described by a manifest (sizes, sha256s), and a file that
does not match is read as damaged. Reading one must end however it was damaged: a file
swapped for a symlink to `/dev/zero`, a FIFO or a device has a size on disk that says
nothing about what a read returns (`/dev/zero` never ends, a FIFO waits for a writer).
So these files are opened only when they are regular files themselves (not through a
symlink) and read no further than the size they should have, plus one byte to tell a
file that grew.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES

# Without O_NONBLOCK, opening a FIFO waits for a writer before the type can be checked;
# a regular file reads the same either way.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_BINARY", 0)
)
# One sendfile call moves at most this much (Linux moves at most 2 GiB - 4 KiB at once).
_SENDFILE_BYTES = 1 << 30


def open_regular_file(path: Path) -> BinaryIO:
    """`path` opened for reading; OSError when it is not a regular file itself (a
    symlink, a directory, a device, a FIFO, a socket) or cannot be opened."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symlink, not a regular file", str(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_at_most(handle: BinaryIO, limit: int, chunk_bytes: int) -> Iterator[bytes]:
    """The bytes of `handle`, `chunk_bytes` at a time, stopping after `limit` bytes."""
    left = limit
    while left > 0:
        chunk = handle.read(min(chunk_bytes, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def regular_file_chunks(path: Path, size_bytes: int, chunk_bytes: int) -> Iterator[bytes]:
    """The first `size_bytes` bytes of the regular file `path` (fewer if it is shorter),
    `chunk_bytes` at a time; OSError when it is not a regular file."""
    with open_regular_file(path) as handle:
        yield from read_at_most(handle, size_bytes, chunk_bytes)


def bounded_digest(
    path: Path, size_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, str]:
    """(size, hex sha256) of the regular file `path` that should hold `size_bytes` bytes,
    reading at most one byte more: a size of `size_bytes + 1` says it holds more (not
    how much). OSError when it is not a regular file."""
    digest = hashlib.sha256()
    size = 0
    for chunk in regular_file_chunks(path, size_bytes + 1, chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def copy_at_most(source: BinaryIO, target: BinaryIO, limit: int) -> int:
    """Copy up to `limit` bytes from the start of `source` to `target`, in the kernel where
    it can (sendfile: the bytes do not pass through Python); the bytes copied."""
    sendfile = getattr(os, "sendfile", None)
    copied = 0
    if sendfile is not None:
        try:
            while copied < limit:
                sent = sendfile(
                    target.fileno(), source.fileno(), copied, min(limit - copied, _SENDFILE_BYTES)
                )
                if sent == 0:
                    return copied
                copied += sent
            return copied
        except OSError as exc:
            # Systems whose sendfile writes only to sockets (macOS) or not between these
            # files: copy through Python instead.
            if copied or exc.errno not in (errno.EINVAL, errno.ENOTSOCK, errno.ENOSYS):
                raise
    for chunk in read_at_most(source, limit - copied, DEFAULT_CHUNK_BYTES):
        target.write(chunk)
        copied += len(chunk)
    return copied
