"""`RequestLedger`: the first outcome of every call that carries a `request_id`, on disk.

A client keeps a call's request id across its retries (AIP-155). The first call that
succeeds records its answer here, keyed by method and request id, with a fingerprint of
the request; a repeat with the same fingerprint gets that answer again without touching
MLflow, also after a sidecar restart. A repeat with another fingerprint is a client bug
and is refused. Calls that fail are not recorded: their retry runs again, and the MLflow
gateway resolves what an interrupted first attempt may have done (the entities it creates
carry the request id as the tag `REQUEST_ID_TAG`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from google.protobuf.message import Message

from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_REQUEST_ID_LENGTH
from mlflow_sidecar.server.database_file import DatabaseFileError, refuse_emptied
from mlflow_sidecar.server.disk_full import is_disk_full
from mlflow_sidecar.server.keyed_locks import KeyedLocks

log = logging.getLogger(__name__)

# The tag by which an entity the sidecar created names the request that created it.
REQUEST_ID_TAG = "mlflow_sidecar.request_id"
# The tag by which sidecars before the request ledger named the StartRun that made a run
# (its client_request_id): a repeat of that call after an upgrade still finds that run.
CLIENT_REQUEST_ID_TAG = "mlflow_sidecar.client_request_id"
# Set on a registered model just before the sidecar renames it, to recognise its own rename.
RENAME_REQUEST_ID_TAG = "mlflow_sidecar.rename_request_id"
# Set on a run the sidecar removed as a second run of one request id: the id of the run
# the request answered with. A lookup by request id passes over such a run.
DUPLICATE_OF_TAG = "mlflow_sidecar.duplicate_of"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]+\Z")
# Earlier names of `request_id` that requests still carry: StartRun's client_request_id.
_OLD_NAMES = ("client_request_id",)
# Old entries are dropped every this many recorded answers (and at open).
_PRUNE_EVERY = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    answer BLOB NOT NULL,
    recorded_ms INTEGER NOT NULL,
    PRIMARY KEY (method, request_id)
);
CREATE INDEX IF NOT EXISTS answers_by_age ON answers (recorded_ms);
CREATE TABLE IF NOT EXISTS first_seen (
    method TEXT NOT NULL,
    request_id TEXT NOT NULL,
    seen_ms INTEGER NOT NULL,
    PRIMARY KEY (method, request_id)
);
CREATE INDEX IF NOT EXISTS first_seen_by_age ON first_seen (seen_ms);
"""


def check_request_id(field: str, value: str) -> str:
    """A request id as the contract allows it: empty, or up to 200 of [A-Za-z0-9_.:-].

    The characters are restricted because the id travels into MLflow filter strings."""
    if not value:
        return value
    if len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgumentError(
            field,
            f"must be at most {MAX_REQUEST_ID_LENGTH} characters, got {len(value)}",
            reason=ErrorReason.INVALID_REQUEST_ID,
        )
    if not _REQUEST_ID_RE.match(value):
        raise InvalidArgumentError(
            field,
            "may only contain letters, digits and _ . : - (a UUID4 is typical)",
            reason=ErrorReason.INVALID_REQUEST_ID,
        )
    return value


def request_id_reused(field: str, request_id: str, rpc: str) -> InvalidArgumentError:
    """The refusal of a request id that an earlier, different `rpc` request used."""
    return InvalidArgumentError(
        field,
        f"{request_id!r} was already used for a different {rpc} request; use a new request"
        " id for a new call",
        reason=ErrorReason.REQUEST_ID_REUSED,
    )


def fingerprint(
    request: Message, *, without: str = "request_id", keep_old_names: bool = False
) -> str:
    """sha256 of a request's deterministic encoding, its request id field cleared, and so
    an older name of that field (`_OLD_NAMES`) holding the same id: the same call either
    way."""
    copy = type(request)()
    copy.CopyFrom(request)
    if without:
        request_id = getattr(copy, without)
        copy.ClearField(without)
        for old_name in () if keep_old_names else _OLD_NAMES:
            if old_name in copy.DESCRIPTOR.fields_by_name and getattr(copy, old_name) == request_id:
                copy.ClearField(old_name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def older_fingerprints(request: Message) -> tuple[str, ...]:
    """Fingerprints sidecars before `fingerprint` cleared `_OLD_NAMES` recorded for the
    same call (the old name holding the request id too): their ledger entries answer it."""
    # Only a request whose old name holds its id (StartRun's client_request_id) has one:
    # every other call with a request id is spared two more encodings and hashes.
    request_id = getattr(request, "request_id", "")
    fields = request.DESCRIPTOR.fields_by_name
    if not request_id or not any(
        name in fields and getattr(request, name) == request_id for name in _OLD_NAMES
    ):
        return ()
    return (fingerprint(request, keep_old_names=True),)


class RequestLedger:
    """Thread-safe, durable map (method, request id) -> (fingerprint, serialized answer)."""

    def __init__(self, path: Path, *, retention_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._retention_s = retention_s
        self._lock = threading.Lock()
        self._calls = KeyedLocks()
        self._recorded = 0
        refuse_emptied(path)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise DatabaseFileError.of(path, exc) from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # An answer is recorded before the client hears it: it must outlive a killed
            # process.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            # As the spool: nothing written outside the data dir.
            self._db.execute("PRAGMA temp_store=MEMORY")
            self._db.executescript(_SCHEMA)
            self._prune()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise DatabaseFileError.of(path, exc) from exc

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def hold(self, method: str, request_id: str) -> Iterator[None]:
        """Serialize concurrent calls of one request id (a retry racing its first try)."""
        with self._calls.hold(f"{method}\0{request_id}"):
            yield

    def answer(
        self, method: str, request_id: str, print_: str, field: str, also: Sequence[str] = ()
    ) -> bytes | None:
        """The recorded answer of this request, or None when there is none.

        InvalidArgumentError naming `field` when the id was used for another request: one
        whose fingerprint is neither `print_` nor one in `also` (`older_fingerprints`)."""
        # Older answers are forgotten as `retention_s` says, whenever the pruning of the
        # table last ran: a quiet sidecar prunes seldom.
        cutoff = now_ms() - int(self._retention_s * 1000)
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, answer FROM answers WHERE method = ? AND request_id = ?"
                " AND recorded_ms >= ?",
                (method, request_id, cutoff),
            ).fetchone()
        if row is None:
            return None
        if row[0] != print_ and row[0] not in also:
            raise request_id_reused(field, request_id, method.rsplit("/", 1)[-1])
        answer: bytes = row[1]
        return answer

    def record(self, method: str, request_id: str, print_: str, answer: bytes) -> None:
        """Remember the answer of a request that succeeded.

        On a full disk the answer is not remembered, and the call still succeeds: it has
        taken effect (in MLflow), and a repeat is resolved by the request id tag the
        entity carries, as after the ledger forgot it. Refusing it instead would tell the
        caller that nothing happened."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO answers"
                    " (method, request_id, fingerprint, answer, recorded_ms)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (method, request_id, print_, answer, now_ms()),
                )
                self._recorded += 1
                prune = self._recorded % _PRUNE_EVERY == 0
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            log.warning(
                "%s %s took effect but the disk is full: its answer is not kept in the"
                " request ledger; a repeat is resolved in MLflow",
                method,
                request_id,
            )
            return
        if prune:
            self._prune()

    def first_seen(self, method: str, request_id: str) -> int:
        """When (ms since the epoch) this request id first reached `method`: the same for
        every try of one call, also after a restart, so that what a call takes from its
        arrival (the timestamp of points sent without one) is its first try's."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO first_seen (method, request_id, seen_ms) VALUES (?, ?, ?)",
                (method, request_id, now_ms()),
            )
            row = self._db.execute(
                "SELECT seen_ms FROM first_seen WHERE method = ? AND request_id = ?",
                (method, request_id),
            ).fetchone()
        return int(row[0])

    def once(
        self,
        method: str,
        request_id: str,
        print_: str,
        call: Callable[[], bytes],
        *,
        field: str = "request_id",
        also: Sequence[str] = (),
    ) -> bytes:
        """The recorded answer of this request, or `call()`'s, recorded when it succeeds;
        `also`: older fingerprints of the same request (see `answer`)."""
        with self.hold(method, request_id):
            recorded = self.answer(method, request_id, print_, field, also)
            if recorded is not None:
                return recorded
            answer = call()
            self.record(method, request_id, print_, answer)
            return answer

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def _prune(self) -> None:
        cutoff = now_ms() - int(self._retention_s * 1000)
        with self._lock:
            self._db.execute("DELETE FROM answers WHERE recorded_ms < ?", (cutoff,))
            self._db.execute("DELETE FROM first_seen WHERE seen_ms < ?", (cutoff,))
