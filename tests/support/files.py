"""Files for transfer tests: random content written in chunks, digests, directory trees."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1024 * 1024


def random_file(path: Path, size: int, chunk: int = MIB) -> Path:
    """Write `size` random bytes to `path`, one chunk at a time (never all in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        left = size
        while left:
            step = min(chunk, left)
            handle.write(os.urandom(step))
            left -= step
    return path


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def tree_digests(root: Path, *, ignore: frozenset[str] = frozenset()) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every regular file under `root` (following symlinks)."""
    found: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(root, followlinks=True):
        for name in names:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel not in ignore:
                found[rel] = sha256_of(full)
    return found


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; returns its last value.

    For effects that finish on another thread after the caller has its answer (e.g. the
    server cleaning up after a client cancelled). Tests assert the returned value.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
