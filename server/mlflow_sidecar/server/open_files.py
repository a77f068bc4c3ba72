"""A process at its open-file limit (EMFILE, or the system's ENFILE), wherever a handler meets
it, becomes RESOURCE_EXHAUSTED with reason TOO_MANY_OPEN_FILES and a retry hint: the caller
keeps its data and tries again once calls in progress have closed their files, and the
operator learns which limit to raise, instead of an INTERNAL to look up in the log."""

from __future__ import annotations

import errno
import logging
import resource

from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError

# Long enough for the calls in progress to end and close what they hold.
OPEN_FILES_RETRY_AFTER_S = 1.0

log = logging.getLogger(__name__)


def is_out_of_files(exc: BaseException) -> bool:
    """True for an OSError (or one it was raised from) saying no file can be opened: the
    process's limit (EMFILE) or the system's (ENFILE)."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chain of causes, as deep as a library wraps an OSError
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def open_files_error(method: str) -> ResourceExhaustedError:
    """RESOURCE_EXHAUSTED, reason TOO_MANY_OPEN_FILES, naming the process's limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.error(
        "%s could not open a file: the sidecar's process is at its limit of %d open files"
        " (RLIMIT_NOFILE, `ulimit -n`), or the system's; raise it, or lower"
        " server.max_streaming_rpcs",
        method,
        soft,
    )
    return ResourceExhaustedError(
        f"the sidecar is at its limit of {soft} open files (ulimit -n) and could not open"
        " one for this call; retry later",
        reason=ErrorReason.TOO_MANY_OPEN_FILES,
        retry_after_s=OPEN_FILES_RETRY_AFTER_S,
        metadata={"open_files_limit": str(soft)},
    )
