"""`ModelCache`: model versions kept on disk so that a download needs no MLflow.

Layout under the cache's root (`<data_dir>/models`): one directory per entry,
`entry-<key slug>-<random>/`, holding `files/` (the model) and `manifest.json` (paths,
sizes, sha256s, digest). An entry is assembled under a `.incoming-*` name, its manifest
written last, and renamed into place: a directory named `entry-*` with a readable manifest
is complete, whatever crashed when. Entries never change in place: one found damaged is
dropped and fetched again into a new directory, so a download still reading the old one
reads what it verified.

Every hit is verified against the manifest (sizes and sha256s) before it is used (only
the sizes when the reader verifies the sha256s itself: a client reading the entry through
a shared volume); a file that is not a regular file (a symlink, a device) is damage, and
none is read past its recorded size, so a damaged entry cannot be read forever; the
data is not fsynced on the way in because that check catches what a power loss leaves.
The manifest's mtime records the entry's last use, so least-recently-used eviction
survives restarts. Failures of the cache's own writes (a full disk) never fail a
download: the version is then sent without being cached.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES
from mlflow_sidecar.core.regular_files import bounded_digest, open_regular_file
from mlflow_sidecar.server.model_cache.lease import ModelLease
from mlflow_sidecar.server.model_cache.manifest import CacheKey, Manifest, ManifestFile
from mlflow_sidecar.server.observability import SidecarMetrics

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FILES_DIR = "files"
_ENTRY_PREFIX = "entry-"
_INCOMING_PREFIX = ".incoming-"


class CacheDisk:
    """The cache's writes to its directory, in one place (a test double meets a full disk
    here without filling one)."""

    def make_dir(self, path: Path) -> None:
        """Create one directory."""
        path.mkdir()

    def make_dirs(self, path: Path) -> None:
        """Create a directory and its missing parents (nothing when it exists)."""
        path.mkdir(parents=True, exist_ok=True)

    def move(self, source: Path, target: Path) -> None:
        """Rename; from another filesystem (a fetched version staged in `<data_dir>/tmp`
        while `<data_dir>/models` is a volume of its own), copy and delete instead."""
        shutil.move(source, target)

    def write_manifest(self, path: Path, data: bytes) -> None:
        """Write an entry's manifest: the last step before the entry is renamed into place."""
        path.write_bytes(data)

    def touch(self, path: Path) -> None:
        """Record a use of the entry whose manifest is `path`."""
        os.utime(path)

    def remove(self, path: Path) -> None:
        """Delete a directory tree, whatever is left of it."""
        shutil.rmtree(path, ignore_errors=True)


@dataclass(eq=False)
class _Entry:
    directory: Path
    manifest: Manifest
    last_used: float
    pins: int = 0
    # False once evicted or found damaged: the directory goes with the last unpin.
    indexed: bool = True

    @property
    def size_bytes(self) -> int:
        return self.manifest.size_bytes


# Digests of versions not kept that the cache remembers (a few KB).
UNCACHED_DIGESTS = 256


class ModelCache:
    """Verified model versions by `CacheKey`, within `max_bytes` (0: no caching)."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        metrics: SidecarMetrics | None = None,
        disk: CacheDisk | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._chunk_bytes = chunk_bytes
        self._metrics = metrics or SidecarMetrics()
        self._disk = disk or CacheDisk()
        self._lock = threading.Lock()
        self._entries: dict[CacheKey, _Entry] = {}
        # Versions fetched and sent but not kept, most recent last: a key names content
        # that does not change (see CacheKey), so its digest answers an if_none_match.
        self._uncached_digests: OrderedDict[CacheKey, str] = OrderedDict()
        # Bytes of every entry directory on disk (dropped ones included until deleted),
        # and of entries being put in.
        self._held = 0
        self._reserved = 0
        if self.enabled:
            self._load()
        elif root.exists():
            log.info("the model cache is off (model_cache.max_bytes: 0): removing %s", root)
            shutil.rmtree(root, ignore_errors=True)

    @property
    def enabled(self) -> bool:
        """False when `model_cache.max_bytes` is 0."""
        return self.max_bytes > 0

    @property
    def held_bytes(self) -> int:
        """Bytes of model files in the cache's directory."""
        with self._lock:
            return self._held

    def _load(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            paths = sorted(self.root.iterdir())
        except OSError as exc:
            # A failure of the cache's own like any other: it must not keep the sidecar
            # from serving. Each version is sent uncached until the directory can be made.
            log.warning(
                "the model cache directory %s cannot be used (%s): versions are sent"
                " uncached until it can be created",
                self.root,
                exc.strerror or exc,
            )
            return
        for path in paths:
            if path.name.startswith(_INCOMING_PREFIX):
                log.info("removing the unfinished model cache entry %s", path)
                self._disk.remove(path)
            elif path.name.startswith(_ENTRY_PREFIX):
                self._load_entry(path)
        with self._lock:
            self._held = sum(e.size_bytes for e in self._entries.values())
            victims = self._victims(0)
        self._delete(victims or [])
        self._publish()

    def _load_entry(self, path: Path) -> None:
        manifest_path = path / MANIFEST_NAME
        try:
            manifest = Manifest.from_json(_read_manifest(manifest_path))
            last_used = manifest_path.stat().st_mtime
        except (OSError, ValueError) as exc:
            log.info(
                "removing the model cache entry %s: its manifest is unreadable (%s)", path, exc
            )
            self._disk.remove(path)
            return
        older = self._entries.get(manifest.key)
        if older is not None and older.last_used > last_used:
            self._disk.remove(path)
            return
        if older is not None:
            self._disk.remove(older.directory)
        self._entries[manifest.key] = _Entry(path, manifest, last_used)

    def digest_of(self, key: CacheKey) -> str | None:
        """The digest of a cached version (its files unread), or of one fetched but not
        kept (see `put`); None when neither. Counts nothing: the download counts its hit
        once it is answered from here (`count_hit`), or its lookup counts it (`acquire`)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return self._uncached_digests.get(key)
            entry.last_used = time.time()
        self._touch(entry)
        return entry.manifest.digest

    def count_hit(self) -> None:
        """Count a download answered from the cache without its files (its digest)."""
        self._metrics.model_cache_hits.inc()

    def acquire(
        self, key: CacheKey, *, count_miss: bool = True, hash_files: bool = True
    ) -> ModelLease | None:
        """A lease on the cached files of `key`, verified against their manifest, or None
        (not cached, or found damaged: then dropped). `count_miss` False: a second look
        by the same download, already counted. `hash_files` False: only the sizes are
        checked, for a reader that checks the sha256s as it reads."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pins += 1
        if entry is None:
            if count_miss and self.enabled:
                self._metrics.model_cache_misses.inc()
            return None
        problem = self._problem(entry, hash_files=hash_files)
        if problem is not None:
            log.warning(
                "model cache entry of %s version %d is damaged (%s): fetching it again",
                key.name,
                key.version,
                problem,
            )
            self._metrics.model_cache_corrupt.inc()
            with self._lock:
                self._unindex(entry)
            self._unpin(entry)
            if count_miss:
                self._metrics.model_cache_misses.inc()
            return None
        with self._lock:
            entry.last_used = time.time()
        self._touch(entry)
        self._metrics.model_cache_hits.inc()
        return self._lease(entry)

    def put(self, manifest: Manifest, files: Path) -> ModelLease | None:
        """Move the verified model directory `files` (described by `manifest`; renamed, or
        copied from another filesystem) into the cache and lease it; None when it is not cached (the
        cache is off, the version is larger than the bound, every other entry is in use,
        or the disk refused): then `files` stays where it is, and the version's digest is
        remembered (`digest_of`), so that a client holding its content is answered
        without another fetch."""
        lease = self._put(manifest, files)
        if lease is None:
            with self._lock:
                self._uncached_digests[manifest.key] = manifest.digest
                self._uncached_digests.move_to_end(manifest.key)
                while len(self._uncached_digests) > UNCACHED_DIGESTS:
                    self._uncached_digests.popitem(last=False)
        return lease

    def _put(self, manifest: Manifest, files: Path) -> ModelLease | None:
        size = manifest.size_bytes
        if not self.enabled:
            return None
        if size > self.max_bytes:
            log.info(
                "%s version %d (%d bytes) is larger than model_cache.max_bytes (%d): not cached",
                manifest.key.name,
                manifest.key.version,
                size,
                self.max_bytes,
            )
            return None
        with self._lock:
            victims = None if manifest.key in self._entries else self._victims(size)
            if victims is not None:
                self._reserved += size
        if victims is None:
            return None
        self._delete(victims)
        try:
            directory = self._assemble(manifest, files)
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            log.warning(
                "could not cache %s version %d (%s): sending it uncached",
                manifest.key.name,
                manifest.key.version,
                "the disk is full" if full else exc,
            )
            with self._lock:
                self._reserved -= size
            return None
        entry = _Entry(directory, manifest, time.time(), pins=1)
        with self._lock:
            self._reserved -= size
            self._entries[manifest.key] = entry
            self._held += size
        self._publish()
        return self._lease(entry)

    def _assemble(self, manifest: Manifest, files: Path) -> Path:
        """Build the entry beside the others and rename it into place; on failure, put
        `files` back and leave nothing behind."""
        incoming = self.root / f"{_INCOMING_PREFIX}{uuid.uuid4().hex}"
        final = self.root / f"{_ENTRY_PREFIX}{manifest.key.slug()}-{uuid.uuid4().hex[:8]}"
        if not self.root.is_dir():
            # Removed while the sidecar runs: without it nothing could be cached again
            # until a restart. The entries it held are found missing when next asked for.
            log.warning("the model cache directory %s was gone: creating it again", self.root)
            self._disk.make_dirs(self.root)
        self._disk.make_dir(incoming)
        moved = False
        try:
            self._disk.move(files, incoming / FILES_DIR)
            moved = True
            self._disk.write_manifest(incoming / MANIFEST_NAME, manifest.to_json())
            self._disk.move(incoming, final)
        except OSError:
            if moved:
                self._disk.move(incoming / FILES_DIR, files)
            self._disk.remove(incoming)
            raise
        return final

    def _problem(self, entry: _Entry, *, hash_files: bool = True) -> str | None:
        """Why the entry's files differ from its manifest (sizes, and sha256s unless not
        `hash_files`), or None when they match."""
        try:
            stored = Manifest.from_json(_read_manifest(entry.directory / MANIFEST_NAME))
        except (OSError, ValueError) as exc:
            return f"manifest unreadable: {exc}"
        if stored != entry.manifest:
            return "manifest changed"
        files = entry.directory / FILES_DIR
        for expected in entry.manifest.files:
            path = files.joinpath(*expected.path.split("/"))
            try:
                problem = self._file_problem(path, expected, hash_files=hash_files)
            except OSError as exc:
                problem = exc.strerror or str(exc)
            if problem is not None:
                return f"{expected.path}: {problem}"
        return None

    def _file_problem(self, path: Path, expected: ManifestFile, *, hash_files: bool) -> str | None:
        """How one file differs from its manifest line, or None."""
        # Not through a symlink: what a symlink names (/dev/zero, a FIFO) may never end,
        # whatever size it shows.
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size != expected.size_bytes:
            return "size differs"
        if not hash_files:
            return None
        size, sha256 = bounded_digest(path, expected.size_bytes, self._chunk_bytes)
        if size != expected.size_bytes:
            return "size differs"
        return "sha256 differs" if sha256 != expected.sha256 else None

    def _lease(self, entry: _Entry) -> ModelLease:
        return ModelLease(
            entry.directory / FILES_DIR,
            entry.manifest,
            lambda: self._pin(entry),
            lambda: self._unpin(entry),
            cache_entry=f"{entry.directory.name}/{FILES_DIR}",
        )

    def _pin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins += 1

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            gone = entry.pins == 0 and not entry.indexed
        if gone:
            self._delete([entry])

    def _unindex(self, entry: _Entry) -> None:
        """Drop an entry from the index (under the lock); its directory is deleted once
        no download reads it."""
        if entry.indexed:
            entry.indexed = False
            del self._entries[entry.manifest.key]

    def _victims(self, size: int) -> list[_Entry] | None:
        """Under the lock: unindex least recently used entries nobody reads until `size`
        more bytes fit the bound; None (and nothing unindexed) when they cannot."""
        excess = self._held + self._reserved + size - self.max_bytes
        chosen: list[_Entry] = []
        idle = sorted((e for e in self._entries.values() if e.pins == 0), key=lambda e: e.last_used)
        for entry in idle:
            if excess <= 0:
                break
            chosen.append(entry)
            excess -= entry.size_bytes
        if excess > 0:
            return None
        for entry in chosen:
            self._unindex(entry)
            self._metrics.model_cache_evictions.inc()
        return chosen

    def _delete(self, entries: list[_Entry]) -> None:
        """Delete unindexed, unpinned entries' directories."""
        for entry in entries:
            self._disk.remove(entry.directory)
            with self._lock:
                self._held -= entry.size_bytes
        if entries:
            self._publish()

    def _touch(self, entry: _Entry) -> None:
        try:
            self._disk.touch(entry.directory / MANIFEST_NAME)
        except OSError as exc:
            # Only the order of eviction after a restart depends on it.
            log.debug("could not record the use of %s: %s", entry.directory, exc)

    def _publish(self) -> None:
        self._metrics.model_cache_bytes.set(self.held_bytes)


def _read_manifest(path: Path) -> bytes:
    """An entry's manifest, read only when it is a regular file (a regular file ends)."""
    with open_regular_file(path) as handle:
        return handle.read()
