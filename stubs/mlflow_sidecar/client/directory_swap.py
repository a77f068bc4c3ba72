"""Putting a complete directory in place of another in one step.

On Linux, `renameat2(RENAME_EXCHANGE)` (called through ctypes) swaps the two names
atomically, so the destination path names the old or the new directory at every moment,
never nothing and never a mix. Where it is missing (another system, an old C library, a
filesystem without it), the old directory is renamed aside and the new one renamed into
its place: two renames, between which the path briefly names nothing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from mlflow_sidecar.client.downloads import ASIDE, sibling_path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errnos that mean "this system or filesystem cannot exchange": fall back to two renames.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

_Renameat2 = Callable[[int, bytes, int, bytes, int], int]

# Every rename of a swap goes through here (a test watches the destination between them).
_rename = os.rename


@functools.cache
def _renameat2() -> _Renameat2 | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28, or not glibc
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap the names of two existing paths atomically. False when the system cannot (and
    nothing changed); OSError for any other failure."""
    function = _renameat2()
    if function is None:
        return False
    if (
        function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        == 0
    ):
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_directory(new: Path, destination: Path, *, atomic: bool = True) -> None:
    """Make `destination` name the directory `new` (a sibling on the same filesystem) and
    remove what it named before; `new` is gone afterwards. `atomic` False skips the
    exchange (the fallback, for tests). On failure `destination` is as it was."""
    try:
        # An absent or empty destination is simply replaced.
        _rename(new, destination)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if atomic and exchange(new, destination):
        discard(new)  # it holds the old copy now
        return
    # The aside copy is never swept (see downloads._SIBLING): it may still have to come back.
    aside = sibling_path(destination, ASIDE)
    _rename(destination, aside)
    try:
        _rename(new, destination)
    except BaseException:
        _rename(aside, destination)
        raise
    discard(aside)


def discard(old: Path) -> None:
    """Remove the copy that was replaced. A reader that opened it before the swap sees it
    emptied; one that opens the destination afterwards gets the new copy."""
    shutil.rmtree(old, ignore_errors=True)
