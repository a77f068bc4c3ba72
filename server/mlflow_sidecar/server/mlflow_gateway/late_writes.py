"""Checks, after the answer, for creates of a call that land in MLflow late.

A create whose try ended without an answer (a timeout, a lost connection, a 5xx) may
not have reached MLflow yet, and may still reach it after a later try made the entity
the call answered with: a proxy or a busy MLflow holds the request
and passes it on later. Looking before creating cannot see a write that has not landed
yet, so a call that met such a try has its entity looked for again a few times after it
answered, and a second one made for the same request id is removed.

The checks not yet made are kept in the data dir (`late-creates.json`), so that a sidecar
stopped (or killed) meanwhile makes them after its restart.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# After the answer, in units of `mlflow.request_timeout_s`: a held request that MLflow
# still takes is taken within a few of its timeouts, or its client (and a proxy's) has
# long given up on it.
CHECK_AFTER_TIMEOUTS = (1, 2, 4, 8, 16)
SAVED_CHECKS_NAME = "late-creates.json"

# What a check is told: the identity of the call's entity (request id, experiment, ...).
CheckArgs = Mapping[str, str | int]
# Looks for late entities of one kind; returns how many it removed.
Check = Callable[..., int]


@dataclass
class _Pending:
    """One call's checks not yet made: its kind, its entity's name for the logs, what its
    check is told, and the wall-clock times still due (earliest first)."""

    kind: str
    what: str
    args: dict[str, str | int]
    due: list[float] = field(default_factory=list)


class LateWriteChecks:
    """Runs each scheduled check at its times, in one background thread started with the
    first check due. A check returns how many late entities it removed; one that fails is
    logged and tried again at its next time.

    With `saved_at`, the checks not yet made are written there after every change and
    loaded by `start()`: a restarted sidecar makes the ones a stop left (those already due
    at once). Without it (or when it cannot be written), a stop drops them, with a WARNING
    naming how many."""

    def __init__(
        self,
        request_timeout_s: float,
        on_removed: Callable[[str, int], None],
        *,
        saved_at: Path | None = None,
    ) -> None:
        self._delays = tuple(request_timeout_s * n for n in CHECK_AFTER_TIMEOUTS)
        self._on_removed = on_removed
        self._saved_at = saved_at
        self._checks: dict[str, Check] = {}
        self._pending: dict[int, _Pending] = {}
        self._due: list[tuple[float, int]] = []  # (wall time, pending id)
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._saved = True

    @property
    def delays_s(self) -> Sequence[float]:
        """The times after the answer at which a call's entity is looked for again."""
        return self._delays

    def handle(self, kind: str, check: Check) -> None:
        """Make `check(**args)` the check of every call scheduled with `kind`."""
        self._checks[kind] = check

    def schedule(self, kind: str, what: str, args: CheckArgs) -> None:
        """Look again at `delays_s` after now, with the check of `kind` (`run`,
        `model_version`) told `args`; `what` names the call's entity in the logs."""
        if kind not in self._checks:
            raise ValueError(f"no check handles {kind!r}")
        now = time.time()
        with self._wake:
            if self._closed:
                return
            self._add(_Pending(kind, what, dict(args), [now + d for d in self._delays]))
            self._save()
        log.info(
            "a try of the call that made %s ended without MLflow's answer; a second %s of"
            " its request id is looked for over the next %.0f s, should that try land late",
            what,
            kind.replace("_", " "),
            self._delays[-1],
        )

    def pending(self) -> int:
        """Checks not yet made."""
        with self._wake:
            return len(self._due)

    def start(self) -> None:
        """Take up the checks a stopped sidecar left in `saved_at`."""
        saved = self._load()
        if not saved:
            return
        with self._wake:
            for pending in saved:
                if pending.kind in self._checks and pending.due:
                    self._add(pending)
        log.info(
            "%d checks for late creates left by the last run of the sidecar are taken up",
            len(self._due),
        )

    def stop(self, timeout_s: float) -> None:
        """Stop at once (`timeout_s` is not needed). The checks not yet made stay in
        `saved_at` for the next start; without it they are dropped, with a WARNING."""
        with self._wake:
            self._closed = True
            left = len(self._due)
            kept = self._saved_at is not None and self._saved
            self._due.clear()
            self._wake.notify()
        if not left:
            return
        if kept:
            log.info(
                "stopping with %d checks for late creates not yet made: kept in %s for the"
                " next start",
                left,
                self._saved_at,
            )
        else:
            log.warning(
                "stopping with %d checks for late creates not yet made: a create that lands"
                " in MLflow after this keeps its second entity, tagged with the request id",
                left,
            )

    def _add(self, pending: _Pending) -> None:
        """Under the lock."""
        pending_id = next(self._ids)
        self._pending[pending_id] = pending
        for due in pending.due:
            heapq.heappush(self._due, (due, pending_id))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="late-write-checks", daemon=True)
            self._thread.start()
        self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (not self._due or self._due[0][0] > time.time()):
                    timeout = self._due[0][0] - time.time() if self._due else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                _, pending_id = heapq.heappop(self._due)
                pending = self._pending[pending_id]
            self._make(pending)
            with self._wake:
                if self._closed:
                    return  # what was made stays saved: made again, it removes nothing
                pending.due.pop(0)
                if not pending.due:
                    del self._pending[pending_id]
                self._save()

    def _make(self, pending: _Pending) -> None:
        try:
            removed = self._checks[pending.kind](**pending.args)
        except Exception as exc:  # noqa: BLE001 - logged; the next time tries again
            log.warning("could not look for a late create of %s: %s", pending.what, exc)
            return
        if removed:
            log.warning(
                "removed %d %s(s) made by a late try of the call that made %s",
                removed,
                pending.kind,
                pending.what,
            )
            self._on_removed(pending.kind, removed)

    def _save(self) -> None:
        """Under the lock: write the checks not yet made, whole, in place of the last."""
        if self._saved_at is None:
            return
        entries = [
            {"kind": p.kind, "what": p.what, "args": p.args, "due": p.due}
            for p in self._pending.values()
        ]
        partial = self._saved_at.with_name(self._saved_at.name + ".partial")
        try:
            with open(partial, "w", encoding="utf-8") as out:
                json.dump(entries, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, self._saved_at)
        except OSError as exc:
            if self._saved:
                log.warning(
                    "cannot keep the checks for late creates in %s (%s): a stop before they"
                    " are made drops them",
                    self._saved_at,
                    exc.strerror or exc,
                )
            self._saved = False
            return
        self._saved = True

    def _load(self) -> list[_Pending]:
        if self._saved_at is None or not self._saved_at.exists():
            return []
        try:
            entries = json.loads(self._saved_at.read_text(encoding="utf-8"))
            return [
                _Pending(str(e["kind"]), str(e["what"]), dict(e["args"]), sorted(e["due"]))
                for e in entries
            ]
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning(
                "the checks for late creates kept in %s cannot be read (%s) and are dropped:"
                " a create that lands late keeps its second entity, tagged with the request id",
                self._saved_at,
                exc,
            )
            return []
