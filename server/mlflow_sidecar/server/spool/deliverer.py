"""`MetricDeliverer`: drains the spool into MLflow in the background, run by run, in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import backoff

from mlflow_sidecar.core.domain import Metric
from mlflow_sidecar.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SidecarError,
)
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.spool.store import RunEnd, SpooledBatch, SpoolStore

log = logging.getLogger(__name__)

LogBatch = Callable[[str, Sequence[Metric]], None]
# (run id, terminal status, end time in ms): ends a run in MLflow.
EndRun = Callable[[str, str, int], None]

# Failures that no retry can fix: the run is gone, deleted, or refuses these points.
_PERMANENT = (NotFoundError, FailedPreconditionError, InvalidArgumentError)


class MetricDeliverer:
    """One background thread that moves spooled points to MLflow with `log_batch`.

    A batch is deleted from the spool only after MLflow confirmed it, so delivery is
    at-least-once; MLflow's SQL stores ignore exact duplicates. While MLflow is down the
    thread backs off (exponential, jitter) and tries again, for as long as it takes.
    Points of runs that no longer accept writes go to the dead-letter table with the reason.

    A run ended through the sidecar while it still had points in the spool is ended in
    MLflow (`end_run`) right after the last of those points is delivered; points for it
    accepted after the end are dead-lettered.

    Delivery starts as soon as points are accepted and drains the spool before it waits
    again.
    """

    def __init__(
        self,
        store: SpoolStore,
        log_batch: LogBatch,
        *,
        batch_size: int,
        backoff_factor_s: float,
        max_backoff_s: float,
        metrics: SidecarMetrics | None = None,
        end_run: EndRun | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._log_batch = log_batch
        self._end_run = end_run
        self._batch_size = batch_size
        self._backoff_factor_s = backoff_factor_s
        self._max_backoff_s = max_backoff_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        # Batches MLflow confirmed that the spool could not forget yet (a full disk): their
        # delete is retried, never their send, so no batch goes to MLflow twice for it.
        self._undeleted: dict[str, SpooledBatch] = {}

    def start(self) -> None:
        """Start delivering, beginning with whatever an earlier process left in the spool."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metric-deliverer", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the batch in flight; undelivered points stay in the spool."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def notify(self) -> None:
        """New points were accepted."""
        self._wake.set()

    def wait_delivered(self, run_id: str, timeout_s: float) -> int:
        """Wait until a run's (or, with "", every run's) points are delivered or dead-lettered,
        at most `timeout_s`; returns how many points are still pending."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._progress:
            while (pending := self._store.pending(run_id)) > 0 or self._end_waits(run_id):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._progress.wait(min(left, 0.5))
        return pending

    def _end_waits(self, run_id: str) -> bool:
        end = self._store.run_end(run_id) if run_id else None
        return end is not None and not end.applied

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        delays = backoff.full_jitter
        waits = backoff.expo(factor=self._backoff_factor_s, max_value=self._max_backoff_s)
        next(waits)  # the generator's first value is a priming None
        while not self._stop.is_set():
            # Cleared before the round looks, so that points accepted during it wake the
            # next wait instead of waiting for its timeout.
            self._wake.clear()
            try:
                delivered = self._deliver_round()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any failure
                wait = delays(next(waits))
                log.warning("metric delivery failed, retrying in %.2fs: %s", wait, exc)
                self._stop.wait(wait)
                continue
            waits = backoff.expo(factor=self._backoff_factor_s, max_value=self._max_backoff_s)
            next(waits)
            if not delivered:
                self._wake.wait(0.5)

    def _deliver_round(self) -> bool:
        """One batch from each run with pending points (fair across runs), then the ends
        that waited for them; True if anything moved."""
        moved = False
        for run_id in self._store.runs_with_pending():
            if self._stop.is_set():
                break
            if run_id in self._undeleted:
                self._forget(self._undeleted[run_id])
                moved = True
                continue
            end = self._store.run_end(run_id)
            if end is None:
                batch = self._store.oldest(run_id, self._batch_size)
            else:
                batch = self._store.oldest(run_id, self._batch_size, through=end.last_chunk)
                if batch is None:
                    self._refuse_after_end(end)
                    moved = True
                    continue
            if batch is None:
                continue
            self._deliver(batch)
            moved = True
            with self._progress:
                self._progress.notify_all()
        moved = self._apply_ends() or moved
        if moved:
            with self._progress:
                self._progress.notify_all()
        return moved

    def _refuse_after_end(self, end: RunEnd) -> None:
        reason = f"run was ended ({end.status}) through the sidecar before these points arrived"
        moved = self._store.dead_letter(end.run_id, reason)
        log.warning("dead-lettered %d points of run %s: %s", moved, end.run_id, reason)

    def _apply_ends(self) -> bool:
        """End in MLflow the runs whose points from before their end are all delivered."""
        applied = False
        for end in self._store.ends_to_apply():
            if self._end_run is None or self._store.pending_through(end.run_id, end.last_chunk):
                continue
            try:
                self._end_run(end.run_id, end.status, end.end_time_ms)
            except _PERMANENT as exc:
                log.warning(
                    "run %s could not be ended (%s) after its points were delivered: %s",
                    end.run_id,
                    end.status,
                    exc.message,
                )
            self._store.end_applied(end.run_id)
            applied = True
        return applied

    def _deliver(self, batch: SpooledBatch) -> None:
        try:
            self._log_batch(batch.run_id, batch.metrics)
        except _PERMANENT as exc:
            self._dead_letter(batch, exc)
            return
        if self._metrics is not None:
            self._metrics.points_delivered.inc(len(batch.metrics))
        self._undeleted[batch.run_id] = batch
        self._forget(batch)

    def _forget(self, batch: SpooledBatch) -> None:
        """Delete a delivered batch from the spool; on failure it stays remembered, so the
        next round retries the delete instead of sending the batch again."""
        self._store.delete(batch)
        del self._undeleted[batch.run_id]

    def _dead_letter(self, batch: SpooledBatch, exc: SidecarError) -> None:
        # A bad batch dead-letters only itself; a run that is gone takes all its points.
        whole_run = not isinstance(exc, InvalidArgumentError)
        reason = f"{exc.code.name}: {exc.message}"
        moved = self._store.dead_letter(batch.run_id, reason, None if whole_run else batch)
        log.warning("dead-lettered %d points of run %s: %s", moved, batch.run_id, reason)
