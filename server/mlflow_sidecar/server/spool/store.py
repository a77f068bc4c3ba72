"""`SpoolStore`: a SQLite database (WAL) of undelivered metric points and dead letters.

Chunk ids are rowids: each new row gets the largest id + 1, and requeued dead letters get ids
below every pending row's, so ids grow in acceptance order among the rows that are still
pending (an emptied table may start over, harmlessly; ids may be negative).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import Metric
from mlflow_sidecar.core.errors import (
    DISK_FULL_RETRY_AFTER_S,
    ErrorReason,
    FailedPreconditionError,
    ResourceExhaustedError,
)
from mlflow_sidecar.server.database_file import DatabaseFileError, refuse_emptied
from mlflow_sidecar.server.disk_full import disk_full_error, is_disk_full
from mlflow_sidecar.server.metric_batch import MetricBatch, RunColumns

log = logging.getLogger(__name__)

# Points are stored in chunks: the points of one run from one message, at most
# `chunk_points` of them (the delivery batch size), as packed columns. One row per chunk
# instead of one per point keeps acceptance cheap; chunks are never split, so a chunk is
# delivered or dead-lettered whole.
CHUNK_POINTS = 1000
PAGE_BYTES = 64 * 1024
# How far ahead a run's next batches are looked for: a stream that outruns its sender
# spools each series as dozens of chunks in a row, and the run's other series come after.
# Mixed chunks carry their keys (up to 1000), so the key text read is bounded too.
_PLAN_CHUNKS = 1000
_PLAN_KEY_CHARS = 256 * 1024
# Groups of dead letters (a run and a reason) that `status` lists, the latest first.
STATUS_GROUPS = 100
# What a full spool tells its callers to wait before sending again (google.rpc.RetryInfo):
# about the time the deliverer takes to move a few batches to a healthy MLflow.
SPOOL_FULL_RETRY_AFTER_S = 1.0
# A chunk's keys, one per point, joined by a separator keys cannot contain (validation
# allows no control characters); a chunk of one key (a series) stores it once.
_KEY_SEPARATOR = "\n"

# Migrations by schema version (`PRAGMA user_version`): migration N brings a spool of
# version N-1 to N. Version 0 is a new file, or a spool from before versions were kept,
# which may hold any of version 1's tables and any of version 2's columns already, so the
# first two are written to be safe on those.
_VERSION_1 = """
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    keys TEXT NOT NULL,
    vals BLOB NOT NULL,
    timestamps BLOB NOT NULL,
    steps BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_run ON chunks (run_id, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    count INTEGER NOT NULL,
    keys TEXT NOT NULL,
    vals BLOB NOT NULL,
    timestamps BLOB NOT NULL,
    steps BLOB NOT NULL,
    accepted_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_run ON dead_letters (run_id);
CREATE TABLE IF NOT EXISTS ended_runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    ended_ms INTEGER NOT NULL
);
"""
# Columns added to ended_runs after its first release (version 2).
# `last_chunk`: the run's chunks up to this id came before the end and are delivered, later
# ones are dead-lettered; `end_time_ms`: the end time MLflow gets; `applied`: 0 while the
# run waits for its last points before it is ended in MLflow.
_ENDED_RUNS_COLUMNS = {
    "last_chunk": "INTEGER NOT NULL DEFAULT 0",
    "end_time_ms": "INTEGER NOT NULL DEFAULT 0",
    "applied": "INTEGER NOT NULL DEFAULT 1",
}


class SpoolVersionError(RuntimeError):
    """The spool was written by a newer sidecar; the message is one line for people."""


def _migrate_to_1(db: sqlite3.Connection) -> None:
    # Statement by statement: executescript would commit the migration's transaction.
    for statement in _VERSION_1.split(";"):
        if statement.strip():
            db.execute(statement)


def _migrate_to_2(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(ended_runs)")}
    for column, declaration in _ENDED_RUNS_COLUMNS.items():
        if column not in columns:
            db.execute(f"ALTER TABLE ended_runs ADD COLUMN {column} {declaration}")


def _migrate_to_3(db: sqlite3.Connection) -> None:
    # `held`: why an end not applied waits for `requeue` instead of the deliverer (its
    # run's points were dead-lettered, or MLflow refused the end); "" for every other end.
    # Checked first: a spool whose user_version reads 0 may have it already.
    columns = {row[1] for row in db.execute("PRAGMA table_info(ended_runs)")}
    if "held" not in columns:
        db.execute("ALTER TABLE ended_runs ADD COLUMN held TEXT NOT NULL DEFAULT ''")


_MIGRATIONS = (_migrate_to_1, _migrate_to_2, _migrate_to_3)
SCHEMA_VERSION = len(_MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path, *, upgrade: bool = True) -> int:
    """Bring the spool to `SCHEMA_VERSION`, each step in its own transaction; returns the
    version it had. A spool newer than this code is refused, untouched; so is an older
    one without `upgrade` (a command that only reads it must not change it under the
    older sidecar that may be serving it)."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise SpoolVersionError(
            f"the spool {path} has schema version {found}, newer than this sidecar's"
            f" {SCHEMA_VERSION}: run a sidecar at least as new as the one that wrote it"
        )
    if found < SCHEMA_VERSION and not upgrade:
        raise SpoolVersionError(
            f"the spool {path} has schema version {found}, older than this mlflow-sidecar's"
            f" {SCHEMA_VERSION}, and reading it here would upgrade it, after which the"
            " sidecar that wrote it could not open it: use the mlflow-sidecar of that"
            " sidecar, or start this version's serve, which upgrades the spool"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[version - 1](db)
            db.execute(f"PRAGMA user_version={version}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return found


def run_ended_error(end: RunEnd) -> FailedPreconditionError:
    """FAILED_PRECONDITION, reason RUN_ENDED, for points of a run ended through the sidecar."""
    return FailedPreconditionError(
        f"run {end.run_id} was ended ({end.status}) through the sidecar; it takes no more"
        " metric points",
        reason=ErrorReason.RUN_ENDED,
        metadata={"run_id": end.run_id, "status": end.status},
    )


@dataclass(frozen=True, slots=True)
class RunEnd:
    """An end recorded through the sidecar: what MLflow is told once the run's points
    accepted before it are delivered.

    `held` is why an end not applied is kept with the run's dead letters rather than
    applied (MLflow refused the run's points or the end itself); `requeue` brings it back,
    to be applied after the requeued points. "" for an end that is not held."""

    run_id: str
    status: str
    end_time_ms: int
    last_chunk: int
    applied: bool
    held: str = ""

    @property
    def waiting(self) -> bool:
        """True while the deliverer is to apply the end: not applied, not held."""
        return not self.applied and not self.held


def _rows(run: RunColumns, accepted_ms: int, chunk_points: int) -> list[tuple[object, ...]]:
    """A run's points as spool rows: chunks of at most `chunk_points`, in batch order,
    numbers as native machine numbers (as `array` reads them back)."""
    total = len(run.values)
    parts = [slice(i, i + chunk_points) for i in range(0, total, chunk_points)]
    return [
        (
            run.run_id,
            len(run.values[part]),
            run.keys if isinstance(run.keys, str) else _keys_text(run.keys[part]),
            run.values[part].tobytes(),
            run.timestamps_ms[part].tobytes(),
            run.steps[part].tobytes(),
            accepted_ms,
        )
        for part in parts
    ]


def _ids(batch: SpooledBatch) -> str:
    """A batch's chunk ids as a JSON array, for SQLite's `json_each`."""
    return json.dumps(batch.chunk_ids)


def _keys_text(keys: list[str]) -> str:
    if keys.count(keys[0]) == len(keys):
        return keys[0]
    return _KEY_SEPARATOR.join(keys)


class DamagedRowError(ValueError):
    """A spool row whose columns do not hold the points it counts (its file was damaged);
    the message says which column and names the row's keys."""


def _keys_named(keys: object) -> str:
    """A row's keys for a message: the first few, and how many there are."""
    if not isinstance(keys, str):
        return "unreadable keys"
    names = list(dict.fromkeys(keys.split(_KEY_SEPARATOR)))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"key {shown}" if len(names) == 1 else f"keys {shown}"


def _unpack(count: int, keys: str, vals: bytes, timestamps: bytes, steps: bytes) -> list[Metric]:
    """A row's `count` points; DamagedRowError when its columns do not hold them."""
    columns = {"values": vals, "timestamps": timestamps, "steps": steps}
    for name, column in columns.items():
        if not isinstance(column, bytes) or len(column) != 8 * count:
            size = f"{len(column)} bytes" if isinstance(column, bytes) else "not bytes"
            raise DamagedRowError(
                f"its {name} column holds {size}, not the {8 * count} of its {count} points"
                f" ({_keys_named(keys)})"
            )
    names = keys.split(_KEY_SEPARATOR) if isinstance(keys, str) else []
    if len(names) not in (1, count):
        raise DamagedRowError(
            f"it holds {len(names)} keys for {count} points ({_keys_named(keys)})"
        )
    values, times, numbers = array("d"), array("q"), array("q")
    values.frombytes(vals)
    times.frombytes(timestamps)
    numbers.frombytes(steps)
    if len(names) == 1:
        names *= count
    return [
        Metric(key, value, ts, step)
        for key, value, ts, step in zip(names, values, times, numbers, strict=True)
    ]


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """Undelivered points of one run, whole chunks in acceptance order; `chunk_ids` name
    them for deletion."""

    run_id: str
    chunk_ids: tuple[int, ...]
    metrics: tuple[Metric, ...]


def _chunk_keys(keys: str) -> frozenset[str]:
    return frozenset(keys.split(_KEY_SEPARATOR))


def plan_batches(chunks: Sequence[tuple[int, int, str]], limit: int, most: int) -> list[list[int]]:
    """Which chunks (id, points, keys), given oldest first, make up to `most` batches that
    can go to MLflow at once without reordering any series (a run and key).

    No two batches share a key, and a chunk joins a batch only if every earlier chunk with
    one of its keys is in that same batch: so a series' points arrive in the order they
    were accepted, whichever batch MLflow takes first. A batch holds at most `limit`
    points unless its first chunk alone is larger."""
    named = [(chunk_id, count, _chunk_keys(keys)) for chunk_id, count, keys in chunks]
    taken: set[int] = set()
    busy: set[str] = set()  # keys of the batches planned so far
    batches: list[list[int]] = []
    while len(batches) < most:
        batch: list[int] = []
        batch_keys: set[str] = set()
        blocked = set(busy)
        size = 0
        for chunk_id, count, names in named:
            if chunk_id in taken:
                continue
            if not names.isdisjoint(blocked) or (batch and size + count > limit):
                # Left out: later chunks of these series must wait for this one.
                blocked |= names
                continue
            batch.append(chunk_id)
            batch_keys |= names
            size += count
            if size >= limit:
                break
        if not batch:
            break
        taken.update(batch)
        busy |= batch_keys
        batches.append(batch)
    return batches


@dataclass(frozen=True, slots=True)
class Requeued:
    """What `requeue` moved back: dead-lettered points, and held run ends."""

    points: int
    ends: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered point, why it was not delivered, and when (ms) it was given up."""

    run_id: str
    metric: Metric
    reason: str
    dead_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetterGroup:
    """Dead-lettered points of one run that share a reason."""

    run_id: str
    reason: str
    points: int
    last_dead_ms: int


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """Depth of the spool and what it could not deliver."""

    pending_points: int
    pending_runs: int
    max_points: int
    oldest_accepted_ms: int | None
    dead_letter_points: int
    dead_letters: tuple[DeadLetterGroup, ...]
    held_ends: tuple[RunEnd, ...] = ()
    # Groups (a run and a reason) of dead letters in all: `dead_letters` lists the latest
    # `STATUS_GROUPS` of them.
    dead_letter_groups: int = 0

    @property
    def unlisted_groups(self) -> int:
        """Groups of dead letters that `dead_letters` leaves out."""
        return max(0, self.dead_letter_groups - len(self.dead_letters))

    @property
    def oldest_age_s(self) -> float:
        """Age of the oldest undelivered point, 0 when none is pending."""
        if self.oldest_accepted_ms is None:
            return 0.0
        return max(0.0, (now_ms() - self.oldest_accepted_ms) / 1000)


def _check_writable(db: sqlite3.Connection) -> None:
    """Raise sqlite3.OperationalError when the database cannot be written (a file, or its
    write-ahead log, this user may only read): found at start, not by the first point."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.execute("BEGIN IMMEDIATE")
    try:
        # SQLite opens a file it may not write read-only, and says so only at a write.
        db.execute(f"PRAGMA user_version={version}")
    finally:
        db.execute("ROLLBACK")


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


class SpoolStore:
    """Thread-safe access to the spool database; one connection guarded by a lock.

    Counts per run are kept in memory (loaded at open) so the hot paths never scan.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_points: int,
        synchronous: str = "NORMAL",
        chunk_points: int = CHUNK_POINTS,
        min_free_bytes: int = 0,
        upgrade: bool = True,
    ) -> None:
        """`min_free_bytes`: free space on the spool's filesystem that `append` leaves:
        deleting delivered points writes too (to the WAL, which a checkpoint then copies
        into the database file), and a spool that filled the disk could never shrink.
        Without `upgrade` (commands that only read it) an older spool is refused rather
        than migrated, and the spool is not checked for being writable."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_points = max_points
        self._keep_free = min_free_bytes
        self._chunk_points = chunk_points
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per message.
        refuse_emptied(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise DatabaseFileError.of(path, exc) from exc
        try:
            self._open(path, synchronous, upgrade=upgrade)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise DatabaseFileError.of(path, exc) from exc
            raise
        # The file the database is: a spool removed or replaced behind the sidecar (its
        # data dir deleted) no longer takes points durably.
        self._identity = _file_identity(path)

    def _open(self, path: Path, synchronous: str, *, upgrade: bool) -> None:
        # A chunk is about 24 KiB: on SQLite's default 4 KiB pages it spills over a chain
        # of overflow pages, on 64 KiB pages it fits in one and an insert costs a quarter.
        # Only a new database takes it (an existing spool keeps its pages), so it comes
        # before WAL mode, which writes the first page.
        self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")
        self._db.execute("PRAGMA journal_mode=WAL")
        # Checkpoint at about 8 MiB of WAL, as SQLite's default does at 1000 pages of 4 KiB.
        self._db.execute(f"PRAGMA wal_autocheckpoint={8 * 1024 * 1024 // PAGE_BYTES}")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA busy_timeout=10000")
        # Sorts and statement journals in memory: the data dir is the one place the
        # sidecar needs to write (a read-only root filesystem has no usable /tmp).
        self._db.execute("PRAGMA temp_store=MEMORY")
        migrate(self._db, path, upgrade=upgrade)
        if upgrade:
            _check_writable(self._db)
        # An existing spool keeps the page size it was made with.
        self._page_bytes = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        self._pending: dict[str, int] = dict(
            self._db.execute("SELECT run_id, SUM(count) FROM chunks GROUP BY run_id").fetchall()
        )
        self._total = sum(self._pending.values())
        self._ended: dict[str, RunEnd] = {}
        self._load_ends()

    def _load_ends(self) -> None:
        self._ended = {
            row[0]: RunEnd(row[0], row[1], row[2], row[3], bool(row[4]), row[5])
            for row in self._db.execute(
                "SELECT run_id, status, end_time_ms, last_chunk, applied, held FROM ended_runs"
            )
        }

    def _check_still_on_disk(self) -> None:
        """FAILED_PRECONDITION when the spool's file is gone from its path or another file
        is there: points written now would be in a file no restart finds. What it held is
        still delivered (the database stays open); the sidecar needs a restart."""
        if _file_identity(self.path) == self._identity:
            return
        log.error(
            "the spool %s was removed or replaced while the sidecar serves (its data dir"
            " deleted?): no point is accepted until the sidecar is restarted; what it"
            " accepted before is still delivered",
            self.path,
        )
        raise FailedPreconditionError(
            "the sidecar's data dir was removed or replaced while it serves: points cannot"
            " be kept durably and are not accepted; restart the sidecar (its log says more)"
        )

    def _free_bytes(self) -> int:
        """Room for new points: free space on the filesystem, and (only when that is short
        of what the spool keeps free) the pages of delivered points the database reuses,
        which it does not give back to the filesystem."""
        free = shutil.disk_usage(self.path.parent).free
        if free >= self._keep_free:
            return free  # the common case: no query of the database per message
        pages = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return free + int(pages) * self._page_bytes

    def close(self) -> None:
        """Close the database (pending points stay on disk for the next start)."""
        with self._lock:
            self._db.close()

    def _write(self, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
        """Run `statement` for every row in one transaction: all of it or none."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(statement, rows)
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (SQLITE_FULL) may have rolled the transaction back already.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # -- accepting --------------------------------------------------------------------

    def append(self, batch: MetricBatch) -> int:
        """Commit all of a checked batch or none; ResourceExhaustedError when the spool is
        full."""
        if not len(batch):
            return 0
        accepted_ms = now_ms()
        runs = batch.by_run()
        rows = [row for run in runs for row in _rows(run, accepted_ms, self._chunk_points)]
        with self._lock:
            for run in runs:
                end = self._ended.get(run.run_id)
                if end is not None:
                    raise run_ended_error(end)
            if len(batch) > self.max_points:
                # No wait makes room for it: refused for good, not SPOOL_FULL.
                raise ResourceExhaustedError(
                    f"this message has {len(batch)} points, more than the spool holds"
                    f" (spool.max_points={self.max_points}): send at most {self.max_points}"
                    " points per message",
                    reason=ErrorReason.TOO_MANY_POINTS,
                    metadata={"points": str(len(batch)), "max_points": str(self.max_points)},
                )
            if self._total + len(batch) > self.max_points:
                raise ResourceExhaustedError(
                    f"metric spool is full ({self._total} of {self.max_points} points pending);"
                    f" {len(batch)} points of this message were not accepted, retry later",
                    reason=ErrorReason.SPOOL_FULL,
                    retry_after_s=DISK_FULL_RETRY_AFTER_S,
                )
            self._check_still_on_disk()
            free = self._free_bytes() if self._keep_free else 0
            if free < self._keep_free:
                raise disk_full_error(
                    f"{len(batch)} points of this message were not accepted: {free} bytes are"
                    f" free, and {self._keep_free} stay free for delivery (spool.min_free_bytes)"
                )
            try:
                self._write(
                    "INSERT INTO chunks"
                    " (run_id, count, keys, vals, timestamps, steps, accepted_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    raise disk_full_error(
                        f"{len(batch)} points of this message were not accepted"
                    ) from exc
                raise
            for run in runs:
                self._pending[run.run_id] = self._pending.get(run.run_id, 0) + len(run.values)
            self._total += len(batch)
        return len(batch)

    # -- delivering -------------------------------------------------------------------

    def runs_with_pending(self) -> list[str]:
        """Runs that have undelivered points."""
        with self._lock:
            return list(self._pending)

    def oldest(self, run_id: str, limit: int, *, through: int = 2**63 - 1) -> SpooledBatch | None:
        """The oldest undelivered points of a run, in the order they were accepted: whole
        chunks, at most `limit` points unless the first chunk alone is larger; only chunks
        up to id `through` when it is given."""
        batches = self.next_batches(run_id, limit, through=through)
        return batches[0] if batches else None

    def next_batches(
        self, run_id: str, limit: int, *, through: int = 2**63 - 1, most: int = 1
    ) -> list[SpooledBatch]:
        """Up to `most` batches of a run's oldest undelivered points that may go to MLflow
        at once, each series' points still in acceptance order (see `plan_batches`); the
        first holds the run's oldest chunk. Only chunks up to id `through` when given.

        A chunk the spool cannot read back (a damaged file) is dead-lettered on the way,
        logged at ERROR, and never sent."""
        while True:
            batches, damaged = self._read_batches(run_id, limit, through, most)
            if not damaged:
                return batches
            # Planned again without them: an empty answer must still mean "nothing
            # pending up to `through`", which the deliverer acts on.
            for chunk_id, why in damaged.items():
                reason = (
                    f"DAMAGED_SPOOL_ROW: the spool row {chunk_id} of run {run_id} is damaged"
                    f" and cannot be read back: {why}"
                )
                self.dead_letter(run_id, reason, SpooledBatch(run_id, (chunk_id,), ()))
                log.error(
                    "dead-lettered spool row %d of run %s, which the spool cannot read back"
                    " (its file was damaged): %s; it is not sent to MLflow, and"
                    " mlflow-sidecar spool status lists it",
                    chunk_id,
                    run_id,
                    why,
                )

    def _read_batches(
        self, run_id: str, limit: int, through: int, most: int
    ) -> tuple[list[SpooledBatch], dict[int, str]]:
        """`next_batches`' plan and points, and the chunks of it that cannot be read back
        (id -> what is wrong), when there are any."""
        limit = max(1, limit)
        with self._lock:
            # Ids, sizes and keys first, read only as far as the batches can reach; the
            # points of the chosen chunks after. A deep backlog is not read to send a batch.
            rows = self._db.execute(
                "SELECT id, count, keys FROM chunks WHERE run_id = ? AND id <= ? ORDER BY id",
                (run_id, through),
            )
            chunks: list[tuple[int, int, str]] = []
            keys_read = points = 0
            for row in rows:
                chunks.append(row)
                keys_read += len(row[2])
                points += row[1]
                # One batch needs no look past its own points: the busy case, every worker
                # holding a run of its own, reads no more than it sends.
                if most == 1 and points >= limit:
                    break
                if len(chunks) >= _PLAN_CHUNKS or keys_read >= _PLAN_KEY_CHARS:
                    break
            rows.close()
            plan = plan_batches(chunks, limit, most)
            chosen = [chunk_id for batch in plan for chunk_id in batch]
            if not chosen:
                return [], {}
            found = {
                row[0]: row[1:]
                for row in self._db.execute(
                    "SELECT id, count, keys, vals, timestamps, steps FROM chunks"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(chosen),),
                )
            }
        read: dict[int, list[Metric]] = {}
        damaged: dict[int, str] = {}
        for chunk_id, row in found.items():
            try:
                read[chunk_id] = _unpack(*row)
            except DamagedRowError as exc:
                damaged[chunk_id] = str(exc)
        if damaged:
            return [], damaged
        batches = [
            SpooledBatch(
                run_id,
                tuple(batch),
                tuple(metric for chunk_id in batch for metric in read[chunk_id]),
            )
            for batch in plan
        ]
        return batches, {}

    def delete(self, batch: SpooledBatch) -> None:
        """Forget a batch MLflow confirmed."""
        with self._lock:
            try:
                self._db.execute(
                    "DELETE FROM chunks WHERE run_id = ?"
                    " AND id IN (SELECT value FROM json_each(?))",
                    (batch.run_id, _ids(batch)),
                )
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    raise disk_full_error("a delivered batch could not be deleted") from exc
                raise
            self._forget(batch.run_id, len(batch.metrics))
            if self._total == 0 and self._keep_free:
                self._give_back_wal()

    def _give_back_wal(self) -> None:
        """Under the lock, with nothing pending: on a filesystem short of space, empty the
        WAL into the database and truncate it, so that its space counts as free again (the
        database keeps the pages of delivered points for new ones, which `_free_bytes`
        counts). Not otherwise: a spool that empties every round would fsync each time."""
        if shutil.disk_usage(self.path.parent).free >= 2 * self._keep_free:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a reader in the way, or no room: the next drain tries
            log.info("the spool's WAL was not truncated: %s", exc)

    def dead_letter(
        self,
        run_id: str,
        reason: str,
        batch: SpooledBatch | None = None,
        *,
        hold_end: bool = False,
    ) -> int:
        """Move a batch (or every pending point of the run) to the dead-letter table.

        With `hold_end`, an end of the run not applied yet goes with them in the same
        transaction: it is held (see `RunEnd.held`) until `requeue` brings both back."""
        # The batch's chunk ids as a JSON array; "" for every chunk of the run.
        chosen = {"run": run_id, "ids": "" if batch is None else _ids(batch)}
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved = self._db.execute(
                    "SELECT COALESCE(SUM(count), 0) FROM chunks WHERE run_id = :run"
                    " AND (:ids = '' OR id IN (SELECT value FROM json_each(:ids)))",
                    chosen,
                ).fetchone()[0]
                self._db.execute(
                    "INSERT INTO dead_letters (run_id, count, keys, vals, timestamps, steps,"
                    " accepted_ms, reason, dead_ms)"
                    " SELECT run_id, count, keys, vals, timestamps, steps, accepted_ms,"
                    " :reason, :dead_ms FROM chunks WHERE run_id = :run"
                    " AND (:ids = '' OR id IN (SELECT value FROM json_each(:ids))) ORDER BY id",
                    {**chosen, "reason": reason, "dead_ms": now_ms()},
                )
                self._db.execute(
                    "DELETE FROM chunks WHERE run_id = :run"
                    " AND (:ids = '' OR id IN (SELECT value FROM json_each(:ids)))",
                    chosen,
                )
                if hold_end:
                    self._hold(run_id, reason)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._forget(run_id, int(moved))
            if hold_end:
                self._load_ends()
        return int(moved)

    def hold_end(self, run_id: str, reason: str) -> None:
        """MLflow refused the run's end for good: keep it, not applied, with the run's dead
        letters until `requeue` brings it back."""
        with self._lock:
            self._hold(run_id, reason)
            self._load_ends()

    def _hold(self, run_id: str, reason: str) -> None:
        """Under the lock: hold the run's end, if one is recorded and not applied."""
        self._db.execute(
            "UPDATE ended_runs SET held = ? WHERE run_id = ? AND applied = 0", (reason, run_id)
        )

    def _forget(self, run_id: str, count: int) -> None:
        left = self._pending.get(run_id, 0) - count
        if left > 0:
            self._pending[run_id] = left
        else:
            self._pending.pop(run_id, None)
        self._total -= count

    # -- ended runs -------------------------------------------------------------------

    def record_end(self, run_id: str, status: str, end_time_ms: int, *, applied: bool) -> int:
        """Record durably that a run was ended through the sidecar; returns how many of its
        points, accepted before now, are still to be delivered.

        Those points are delivered; points for it that arrive later are dead-lettered.
        `applied` says whether MLflow has ended the run already; if not, the deliverer ends
        it once the points before the end are delivered."""
        with self._lock:
            last = self._db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM chunks WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            end = RunEnd(run_id, status, end_time_ms, int(last), applied)
            self._db.execute(
                "INSERT OR REPLACE INTO ended_runs"
                " (run_id, status, ended_ms, end_time_ms, last_chunk, applied)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, status, now_ms(), end_time_ms, end.last_chunk, int(applied)),
            )
            self._ended[run_id] = end
            return self._pending.get(run_id, 0)

    def restore_end(self, end: RunEnd) -> None:
        """Record `end` again exactly as it was (its chunks, whether MLflow applied it,
        why it is held): a later `record_end` that did not take effect is undone."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO ended_runs"
                " (run_id, status, ended_ms, end_time_ms, last_chunk, applied, held)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    end.run_id,
                    end.status,
                    now_ms(),
                    end.end_time_ms,
                    end.last_chunk,
                    int(end.applied),
                    end.held,
                ),
            )
            self._ended[end.run_id] = end

    def cancel_end(self, run_id: str) -> bool:
        """Forget a recorded end (the run was resumed): its points are accepted again, and
        an end MLflow has not applied yet never is. True if an end was recorded."""
        with self._lock:
            self._db.execute("DELETE FROM ended_runs WHERE run_id = ?", (run_id,))
            return self._ended.pop(run_id, None) is not None

    def end_applied(self, run_id: str, applied: RunEnd | None = None) -> None:
        """MLflow has ended the run as recorded; with `applied`, only if that end is still
        the run's record: one recorded after it (another EndRun) is not applied yet."""
        with self._lock:
            end = self._ended.get(run_id)
            if applied is not None and not _same_end(end, applied):
                return
            self._db.execute(
                "UPDATE ended_runs SET applied = 1, held = '' WHERE run_id = ?", (run_id,)
            )
            if end is not None:
                self._ended[run_id] = RunEnd(
                    end.run_id, end.status, end.end_time_ms, end.last_chunk, True
                )

    def run_end(self, run_id: str) -> RunEnd | None:
        """How a run was ended through the sidecar, or None."""
        with self._lock:
            return self._ended.get(run_id)

    def ends_to_apply(self) -> list[RunEnd]:
        """Recorded ends that the deliverer is to apply: not applied, not held."""
        with self._lock:
            return [end for end in self._ended.values() if end.waiting]

    def held_ends(self) -> list[RunEnd]:
        """Recorded ends MLflow refused, kept with their runs' dead letters."""
        with self._lock:
            return [end for end in self._ended.values() if end.held]

    def pending_through(self, run_id: str, last_chunk: int) -> bool:
        """True while points of a run accepted up to chunk `last_chunk` are undelivered."""
        with self._lock:
            if run_id not in self._pending:
                return False
            row = self._db.execute(
                "SELECT 1 FROM chunks WHERE run_id = ? AND id <= ? LIMIT 1", (run_id, last_chunk)
            ).fetchone()
        return row is not None

    # -- dead letters -----------------------------------------------------------------

    def requeue(self, run_id: str = "") -> Requeued:
        """Move the dead letters of one run (or of all runs) back to the pending chunks, in
        the order they were accepted, and the held ends back to the deliverer; returns how
        many points and ends moved.

        A run ended through the sidecar takes its requeued points as if they had come
        before its end, so they are delivered rather than dead-lettered again; an end held
        with them is applied after them."""
        # One run, or every run when `run_id` is "".
        chosen = (run_id, run_id)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved = dict(
                    self._db.execute(
                        "SELECT run_id, SUM(count) FROM dead_letters"
                        " WHERE (? = '' OR run_id = ?) GROUP BY run_id",
                        chosen,
                    ).fetchall()
                )
                # Ids below every pending chunk's: the requeued points were accepted
                # before those, so ids keep acceptance order (each series is delivered in
                # it, and the oldest pending point is the one of the lowest id).
                rows = self._db.execute(
                    "SELECT COUNT(*) FROM dead_letters WHERE (? = '' OR run_id = ?)", chosen
                ).fetchone()[0]
                below = self._db.execute("SELECT COALESCE(MIN(id), 1) FROM chunks").fetchone()[0]
                self._db.execute(
                    "INSERT INTO chunks (id, run_id, count, keys, vals, timestamps, steps,"
                    " accepted_ms) SELECT ? + ROW_NUMBER() OVER (ORDER BY accepted_ms, id),"
                    " run_id, count, keys, vals, timestamps, steps, accepted_ms"
                    " FROM dead_letters WHERE (? = '' OR run_id = ?) ORDER BY accepted_ms, id",
                    (int(below) - int(rows) - 1, *chosen),
                )
                self._db.execute("DELETE FROM dead_letters WHERE (? = '' OR run_id = ?)", chosen)
                # Requeued points count as before the run's end, so they are delivered.
                self._db.execute(
                    "UPDATE ended_runs SET last_chunk = (SELECT COALESCE(MAX(id), 0) FROM chunks"
                    " WHERE chunks.run_id = ended_runs.run_id)"
                    " WHERE (? = '' OR run_id = ?) AND run_id IN (SELECT run_id FROM chunks)",
                    chosen,
                )
                ends = self._db.execute(
                    "UPDATE ended_runs SET held = '' WHERE held != '' AND (? = '' OR run_id = ?)",
                    chosen,
                ).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            for run, count in moved.items():
                self._pending[run] = self._pending.get(run, 0) + int(count)
                self._total += int(count)
            self._load_ends()
        return Requeued(sum(int(count) for count in moved.values()), ends)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead-lettered point, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, count, keys, vals, timestamps, steps, reason, dead_ms"
                " FROM dead_letters ORDER BY id"
            ).fetchall()
        letters: list[DeadLetter] = []
        for run_id, count, keys, vals, timestamps, steps, reason, dead_ms in rows:
            try:
                metrics = _unpack(count, keys, vals, timestamps, steps)
            except DamagedRowError:
                continue  # its points cannot be read: counted, and listed by `status`
            letters.extend(DeadLetter(run_id, metric, reason, dead_ms) for metric in metrics)
        return letters

    # -- reading ----------------------------------------------------------------------

    def pending(self, run_id: str = "") -> int:
        """Undelivered points of one run, or of all runs."""
        with self._lock:
            return self._pending.get(run_id, 0) if run_id else self._total

    def dead_letter_count(self, run_id: str = "") -> int:
        """Dead-lettered points of one run, or of all runs."""
        with self._lock:
            if run_id:
                row = self._db.execute(
                    "SELECT COALESCE(SUM(count), 0) FROM dead_letters WHERE run_id = ?", (run_id,)
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT COALESCE(SUM(count), 0) FROM dead_letters"
                ).fetchone()
        return int(row[0])

    def gauges(self) -> tuple[int, float, int, int]:
        """(pending points, oldest pending age in seconds, dead-letter points, held run
        ends), for metrics."""
        status = self.status()
        return (
            status.pending_points,
            status.oldest_age_s,
            status.dead_letter_points,
            len(status.held_ends),
        )

    def status(self) -> SpoolStatus:
        """Depth, oldest age and dead letters."""
        with self._lock:
            oldest = self._db.execute(
                "SELECT accepted_ms FROM chunks ORDER BY id LIMIT 1"
            ).fetchone()
            groups = self._db.execute(
                "SELECT run_id, reason, SUM(count), MAX(dead_ms), COUNT(*) OVER ()"
                " FROM dead_letters GROUP BY run_id, reason ORDER BY MAX(dead_ms) DESC"
                " LIMIT ?",
                (STATUS_GROUPS,),
            ).fetchall()
            dead_total = self._db.execute(
                "SELECT COALESCE(SUM(count), 0) FROM dead_letters"
            ).fetchone()[0]
            return SpoolStatus(
                pending_points=self._total,
                pending_runs=len(self._pending),
                max_points=self.max_points,
                oldest_accepted_ms=oldest[0] if oldest else None,
                dead_letter_points=int(dead_total),
                dead_letters=tuple(DeadLetterGroup(r, why, n, t) for r, why, n, t, _ in groups),
                held_ends=tuple(end for end in self._ended.values() if end.held),
                dead_letter_groups=int(groups[0][4]) if groups else 0,
            )


def _same_end(recorded: RunEnd | None, other: RunEnd) -> bool:
    """Whether `recorded` is the end `other` was read as (whether applied or held aside)."""
    return recorded is not None and (
        recorded.status,
        recorded.end_time_ms,
        recorded.last_chunk,
    ) == (other.status, other.end_time_ms, other.last_chunk)
