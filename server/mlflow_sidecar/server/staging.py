"""`Staging`: the on-disk scratch space of transfers in flight, under `<data_dir>/tmp`.

Uploads for stores that take files, not streams (the embedded store, a bucket written
directly), and model uploads, are written here while they arrive (never held in memory)
and handed over once verified; artifacts for MLflow's HTTP artifact proxy skip it.
Downloads that MLflow cannot stream land here before they go out. Every transfer gets its
own directory and removes it when it ends, however it ends. A full disk met while a
transfer writes here is RESOURCE_EXHAUSTED (reason DISK_FULL), not INTERNAL; the directory
removed while the sidecar runs is created again, and one the sidecar cannot write to is
FAILED_PRECONDITION saying so.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message

from mlflow_sidecar.core.errors import FailedPreconditionError
from mlflow_sidecar.server.config import AppConfig
from mlflow_sidecar.server.disk_full import disk_full_as_resource_exhausted, is_disk_full
from mlflow_sidecar.server.observability import SidecarMetrics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_PREFIX = "transfer-"


class Staging:
    """Per-transfer scratch directories plus the transfer limits from the config."""

    def __init__(self, config: AppConfig, metrics: SidecarMetrics | None = None) -> None:
        self._metrics = metrics
        self.root = config.staging_dir
        self.chunk_bytes = config.artifacts.chunk_bytes
        self.max_upload_bytes = config.artifacts.max_upload_bytes
        self.max_message_bytes = config.server.max_message_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        # A killed sidecar cannot clean up after itself; its transfers are dead anyway.
        for leftover in self.root.glob(f"{_PREFIX}*"):
            log.info("removing the leftover transfer directory %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)

    def count(self, direction: str, size_bytes: int) -> None:
        """Add a finished transfer's bytes to `mlflow_sidecar_stream_bytes_total`."""
        if self._metrics is not None:
            self._metrics.stream_bytes.labels(direction).inc(size_bytes)

    def counted(self, direction: str, messages: Iterator[M]) -> Iterator[M]:
        """Pass download messages through, counting the file bytes they carry as they go
        out (not the messages' framing: the series counts artifact bytes, as uploads do)."""
        for message in messages:
            self.count(direction, _file_bytes(message))
            yield message

    @contextlib.contextmanager
    def directory(self, purpose: str) -> Iterator[Path]:
        """A fresh, private directory for one transfer, removed with its contents on exit."""
        with disk_full_as_resource_exhausted(f"no room to stage the {purpose}"):
            path = self._make(purpose)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def _make(self, purpose: str) -> Path:
        prefix = f"{_PREFIX}{purpose}-"
        try:
            try:
                return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
            except FileNotFoundError:
                # Removed while the sidecar runs (a cleaner of tmp directories): no
                # transfer could stage again until a restart. Only the staging directory is
                # made again: a data dir removed as a whole stays gone, so that no second
                # sidecar takes a new one for its own while this one still serves.
                log.warning("the staging directory %s was gone: creating it again", self.root)
                try:
                    self.root.mkdir(exist_ok=True)
                except FileNotFoundError:
                    raise FailedPreconditionError(
                        "the sidecar's data dir was removed while it serves: nothing can be"
                        " staged; restart the sidecar"
                    ) from None
                return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise FailedPreconditionError(
                f"the sidecar cannot stage the {purpose} in {self.root}"
                f" ({exc.strerror or exc}): make it a directory the sidecar can write to"
            ) from exc

    def remove(self, path: Path) -> None:
        """Remove a transfer directory now (it may be gone already)."""
        shutil.rmtree(path, ignore_errors=True)

    def in_flight(self) -> list[Path]:
        """The transfer directories that exist right now."""
        return sorted(self.root.glob(f"{_PREFIX}*"))


def _file_bytes(message: Any) -> int:
    """The bytes of a file a download message carries: an artifact chunk's, or a model
    chunk's data; 0 for headers, manifests and trailers."""
    if message.WhichOneof("payload") != "chunk":
        return 0
    chunk = message.chunk
    return len(chunk if isinstance(chunk, bytes) else chunk.data)
