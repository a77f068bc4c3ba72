"""Where the gRPC clients put a download while its bytes are still being verified, and how
the hidden siblings of a download that died (kill -9, power loss) are cleared away.

Every sibling is claimed for its whole life: its owner holds an exclusive `flock` on it.
A later download into the same directory removes the siblings whose lock it can take
(their owner is gone, since the kernel drops a dead process's locks) and that are older
than `STALE_AFTER_S`, which covers the instant between a sibling's creation and its lock.
A live download's sibling is never removed. On a filesystem without `flock` nothing is
claimed and nothing removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

# A sibling this much older than now, with nobody holding its lock, was left by a download
# that died. The age guards what a lock cannot show: a download that has not taken its
# lock yet, a client from before the lock, a filesystem whose locks other hosts do not see
# (NFS without lockd, FUSE); a staging directory's time changes only as entries are made
# at its top, so a live one of a large model looks old long before it is done.
STALE_AFTER_S = 3600.0

PARTIAL = ".partial"  # an artifact file being received
STAGING = ".download"  # a model directory being received
ASIDE = ".old"  # a model directory moved aside while its replacement is renamed in

# Never `.old`: where the swap is two renames, a process killed between them leaves the
# model only there, and removing it would lose the destination's one copy.
_SIBLING = re.compile(r"\.sidecar-[0-9a-f]{32}(\.partial|\.download)")

# When this process last swept a directory: a stale sibling needs STALE_AFTER_S to become
# one, so sweeping more often (every artifact of a run, say) would find nothing new.
_swept: dict[Path, float] = {}
_swept_lock = threading.Lock()


def sibling_path(final: Path, kind: str) -> Path:
    """A hidden sibling of `final` of one kind (PARTIAL, STAGING or ASIDE).

    The name does not repeat `final`'s, which may already be as long as names can be."""
    return final.with_name(f".sidecar-{uuid.uuid4().hex}{kind}")


def partial_path(final: Path) -> Path:
    """A hidden sibling of `final` to download into, renamed over `final` once verified."""
    return sibling_path(final, PARTIAL)


@contextlib.contextmanager
def claimed(path: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock on `path` (a file or directory that exists) for the block, so no
    other process's sweep removes it. `wait`: wait for a holder to let go."""
    try:
        fd = _open(path)
    except OSError:
        yield  # it cannot be opened to lock: nothing a sweep could lock either
        return
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: as above
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def sweep_stale(directory: Path) -> None:
    """Remove the siblings in `directory` left by downloads that died (see the module)."""
    now = time.monotonic()
    with _swept_lock:
        last = _swept.get(directory)
        if last is not None and now - last < STALE_AFTER_S:
            return
        _swept[directory] = now
    try:
        names = [entry.name for entry in os.scandir(directory) if _SIBLING.fullmatch(entry.name)]
    except OSError:
        return
    for name in names:
        _remove_if_abandoned(directory / name)


def forget_sweeps() -> None:
    """Let the next download into any directory sweep it again (for tests)."""
    with _swept_lock:
        _swept.clear()


def _open(path: Path) -> int:
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    if path.is_dir():
        return os.open(path, flags | os.O_RDONLY | os.O_DIRECTORY)
    # Some filesystems (NFS) lock only what is open for writing.
    return os.open(path, flags | os.O_RDWR)


def _remove_if_abandoned(path: Path) -> None:
    try:
        fd = _open(path)
    except OSError:
        return  # gone already, or not ours to open
    try:
        held = os.fstat(fd)
        if time.time() - held.st_mtime < STALE_AFTER_S:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # its download is alive (or there are no locks here to tell)
        try:
            now_named = os.lstat(path)
        except OSError:
            return
        # The name may have moved on to another inode since it was opened (a swap).
        if (now_named.st_dev, now_named.st_ino) != (held.st_dev, held.st_ino):
            return
        if stat.S_ISDIR(held.st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)
