"""`MetricDeliverer`: drains the spool into MLflow in the background, in parallel, each
series' points in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from mlflow_sidecar.core.domain import Metric
from mlflow_sidecar.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SidecarError,
)
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.spool.delivery_concurrency import DeliveryConcurrency
from mlflow_sidecar.server.spool.run_claims import RunClaims
from mlflow_sidecar.server.spool.shared_backoff import SharedBackoff
from mlflow_sidecar.server.spool.store import RunEnd, SpooledBatch, SpoolStore

log = logging.getLogger(__name__)

LogBatch = Callable[[str, Sequence[Metric]], None]
# (run id, terminal status, end time in ms): ends a run in MLflow.
EndRun = Callable[[str, str, int], None]

# Failures that no retry can fix: the run is gone, deleted, or refuses these points.
_PERMANENT = (NotFoundError, FailedPreconditionError, InvalidArgumentError)
# How long an idle worker sleeps when no wake comes: a safety net, wakes do the work.
_IDLE_S = 0.5


class MetricDeliverer:
    """Background workers that move spooled points to MLflow with `log_batch`.

    Up to `workers` `log_batch` calls are in flight at once: of different runs, and of one
    run's different series (a run and key) when the run has more than a batch waiting.
    How many of those MLflow gets is fitted to what it gains from them
    (`DeliveryConcurrency`): a server that takes one write at a time gets few calls.
    Each worker holds one run at a time; the batches it sends together share no key, and
    none holds a point of a series ahead of an earlier point of it that is still pending
    (`plan_batches`), so each series reaches MLflow in the order it was accepted. Runs
    with work take turns.

    A batch is deleted from the spool only after MLflow confirmed it, so delivery is
    at-least-once; MLflow's SQL stores ignore exact duplicates. When MLflow fails a batch
    (down, or asking to slow down) every worker backs off together (exponential, jitter)
    and tries again, for as long as it takes. Points of runs that no longer accept writes
    go to the dead-letter table with the reason.

    A run ended through the sidecar while it still had points in the spool is ended in
    MLflow (`end_run`) right after the last of those points is delivered; points for it
    accepted after the end are dead-lettered. When MLflow refuses the run's points or the
    end itself for good, the end is kept with the run's dead letters, not applied, and
    `mlflow-sidecar spool requeue` brings it back with them.

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
        workers: int = 1,
        metrics: SidecarMetrics | None = None,
        end_run: EndRun | None = None,
        backoff: SharedBackoff | None = None,
        concurrency: DeliveryConcurrency | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a deliverer needs at least one worker, not {workers}")
        self._store = store
        self._metrics = metrics
        self._log_batch = log_batch
        self._end_run = end_run
        self._batch_size = batch_size
        self._workers = workers
        self._backoff = backoff or SharedBackoff(backoff_factor_s, max_backoff_s)
        self._claims = RunClaims(self._runs_with_work)
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._threads: list[threading.Thread] = []
        # One per log_batch call in flight: a worker's own send, and the sends it adds for
        # other series of its run while slots are free.
        self._slots = concurrency or DeliveryConcurrency(workers)
        if self._slots.most > workers:
            raise ValueError(f"{self._slots.most} calls in flight need as many workers")
        if metrics is not None:
            slots = self._slots
            metrics.delivery_calls_limit.set_function(lambda: slots.limit)
        # Batches MLflow confirmed that the spool could not forget yet (a full disk): their
        # delete is retried, never their send, so no batch goes to MLflow twice for it.
        # Only the worker holding a run touches its entry.
        self._undeleted: dict[str, list[SpooledBatch]] = {}

    def start(self) -> None:
        """Start delivering, beginning with whatever an earlier process left in the spool."""
        if not self._threads:
            self._threads = [
                threading.Thread(target=self._work, name=f"metric-deliverer-{i}", daemon=True)
                for i in range(self._workers)
            ]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the batches in flight, waiting for them at most `timeout_s` (a later
        call waits again for those still out); undelivered points stay in the spool."""
        self._stop.set()
        self._claims.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def held(self, run_id: str, timeout_s: float) -> AbstractContextManager[None]:
        """No worker delivers the run's points or applies its end while the block runs;
        it waits first, at most `timeout_s` (then TimeoutError), for the worker doing so."""
        return self._claims.held(run_id, timeout_s)

    def notify(self) -> None:
        """New points were accepted."""
        self._claims.wake()

    def wait_delivered(self, run_id: str, timeout_s: float) -> int:
        """Wait until a run's (or, with "", every run's) points are delivered or dead-lettered,
        at most `timeout_s`; returns how many points are still pending."""
        deadline = time.monotonic() + timeout_s
        self._claims.wake()
        with self._progress:
            while (pending := self._store.pending(run_id)) > 0 or self._end_waits(run_id):
                left = deadline - time.monotonic()
                if left <= 0 or call_deadline.call_ended():
                    break
                self._progress.wait(min(left, 0.5))
        return pending

    def ends_left(self) -> int:
        """Recorded ends not applied in MLflow yet, held ones aside (they wait for
        `spool requeue`, not for the deliverer)."""
        return len(self._store.ends_to_apply()) if self._end_run is not None else 0

    def _end_waits(self, run_id: str) -> bool:
        """Whether an end recorded for the run (with "": for any run) is not in MLflow yet:
        a flush covers the ends that follow the points it waits for."""
        if not run_id:
            return self._end_run is not None and bool(self._store.ends_to_apply())
        end = self._store.run_end(run_id)
        return end is not None and end.waiting

    # -- the workers ------------------------------------------------------------------

    def _runs_with_work(self) -> list[str]:
        runs = self._store.runs_with_pending()
        if self._end_run is not None:
            waiting = set(runs)
            runs += [end.run_id for end in self._store.ends_to_apply() if end.run_id not in waiting]
        return runs

    def _work(self) -> None:
        while not self._stop.is_set():
            self._backoff.wait(self._stop)
            if self._stop.is_set():
                return
            # Counted before looking, so that points accepted meanwhile end the wait below.
            wakes = self._claims.wakes()
            run_id = self._claims.claim()
            if run_id is None:
                self._claims.wait_for_work(wakes, _IDLE_S)
                continue
            ticket = self._backoff.ticket()
            try:
                with self._slots.working():
                    moved = self._step(run_id)
            except Exception as exc:  # noqa: BLE001 - a worker must outlive any failure
                wait = self._backoff.failed(ticket)
                if wait is not None:
                    log.warning("metric delivery failed, retrying in %.2fs: %s", wait, exc)
                    if self._metrics is not None:
                        self._metrics.mlflow_retries.inc()
                continue
            else:
                self._backoff.succeeded()
            finally:
                self._claims.release(run_id)
            if moved:
                with self._progress:
                    self._progress.notify_all()
            else:
                self._claims.wait_for_work(wakes, _IDLE_S)

    def _step(self, run_id: str) -> bool:
        """One thing for a run this worker holds: its next batches, or what follows its
        last point (dead letters after its end, the end itself); True if anything moved."""
        if run_id in self._undeleted:
            self._forget(run_id)
            return True
        end = self._store.run_end(run_id)
        through = 2**63 - 1 if end is None else end.last_chunk
        if not self._slots.acquire(self._stop):
            return False
        spare = self._spare_slots()
        try:
            batches = self._store.next_batches(
                run_id, self._batch_size, through=through, most=1 + spare
            )
        except BaseException:
            self._release(1 + spare)
            raise
        self._release(1 + spare - max(1, len(batches)))
        if batches:
            self._deliver(batches)
            return True
        self._slots.release()
        if end is None:
            return False
        moved = False
        if self._store.pending(run_id):
            self._refuse_after_end(end)
            moved = True
        return self._apply_end(end) or moved

    def _spare_slots(self) -> int:
        """Takes the slots no worker is using now, for more batches of the same run."""
        taken = 0
        while taken < self._workers - 1 and self._slots.try_acquire():
            taken += 1
        return taken

    def _release(self, slots: int) -> None:
        for _ in range(slots):
            self._slots.release()

    def _refuse_after_end(self, end: RunEnd) -> None:
        reason = f"run was ended ({end.status}) through the sidecar before these points arrived"
        moved = self._store.dead_letter(end.run_id, reason)
        log.warning("dead-lettered %d points of run %s: %s", moved, end.run_id, reason)

    def _apply_end(self, end: RunEnd) -> bool:
        """End the run in MLflow, its points from before the end all delivered; an end
        MLflow refuses for good is held for `spool requeue`."""
        if not end.waiting or self._end_run is None:
            return False
        if self._store.pending_through(end.run_id, end.last_chunk):
            return False
        try:
            self._end_run(end.run_id, end.status, end.end_time_ms)
        except _PERMANENT as exc:
            # Marked applied, it would be lost: MLflow keeps the run RUNNING while the
            # sidecar refuses its points as ended, and nothing would try again.
            self._store.hold_end(end.run_id, f"{exc.code.name}: {exc.message}")
            log.warning(
                "run %s was not ended (%s) in MLflow, which refused it: %s; the end is kept"
                " with the run's dead letters (mlflow-sidecar spool status lists it): once"
                " MLflow has the run again (restored, or the sidecar pointed at the MLflow"
                " that has it), mlflow-sidecar spool requeue applies it",
                end.run_id,
                end.status,
                exc.message,
            )
            return True
        # An EndRun that came meanwhile recorded an end of its own, which it or the next
        # step applies after this one: it stays to be applied.
        self._store.end_applied(end.run_id, end)
        return True

    def _deliver(self, batches: list[SpooledBatch]) -> None:
        """Send a run's batches at once (each holds one slot); forget those MLflow
        confirmed, dead-letter those it refused for good, then raise the first other
        failure, so the workers back off and the rest is sent again."""
        outcomes = self._send_all(batches)
        run_id = batches[0].run_id
        for batch, outcome in zip(batches, outcomes, strict=True):
            if outcome is None:
                if self._metrics is not None:
                    self._metrics.points_delivered.inc(len(batch.metrics))
                self._undeleted.setdefault(run_id, []).append(batch)
        if run_id in self._undeleted:
            self._forget(run_id)
        retry: Exception | None = None
        for batch, outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, _PERMANENT):
                if self._dead_letter(batch, outcome):
                    break  # the run's every point went with it
            elif outcome is not None and retry is None:
                retry = outcome
        if retry is not None:
            raise retry

    def _send_all(self, batches: list[SpooledBatch]) -> list[Exception | None]:
        """Each batch's `log_batch` failure, or None; the first is sent on this thread, the
        others on threads of their own at the same time."""
        outcomes: list[Exception | None] = [None] * len(batches)

        def send(index: int) -> None:
            confirmed = 0
            try:
                self._log_batch(batches[index].run_id, batches[index].metrics)
                confirmed = len(batches[index].metrics)
            except Exception as exc:  # noqa: BLE001 - handed to the worker, which decides
                outcomes[index] = exc
            finally:
                pushed_back = outcomes[index] is not None and not isinstance(
                    outcomes[index], _PERMANENT
                )
                self._slots.sent(confirmed, pushed_back=pushed_back)

        helpers: list[threading.Thread] = []
        inline = [0]
        for index in range(1, len(batches)):
            helper = threading.Thread(
                target=send, args=(index,), name="metric-deliverer-send", daemon=True
            )
            try:
                helper.start()
            except RuntimeError:  # no thread to be had: this one sends it after its own
                inline.append(index)
            else:
                helpers.append(helper)
        for index in inline:
            send(index)
        for helper in helpers:
            helper.join()
        return outcomes

    def _forget(self, run_id: str) -> None:
        """Delete a run's delivered batches from the spool; one that fails to go stays
        remembered, with those after it, so the run's next turn retries the delete instead
        of sending the batch again."""
        waiting = self._undeleted[run_id]
        while waiting:
            self._store.delete(waiting[0])
            waiting.pop(0)
        del self._undeleted[run_id]

    def _dead_letter(self, batch: SpooledBatch, exc: SidecarError) -> bool:
        """Dead-letter what MLflow refused for good; True when that was the whole run."""
        # A bad batch dead-letters only itself; a run that is gone takes all its points, and
        # its recorded end with them: applied now, it would come before those points.
        whole_run = not isinstance(exc, InvalidArgumentError)
        reason = f"{exc.code.name}: {exc.message}"
        moved = self._store.dead_letter(
            batch.run_id, reason, None if whole_run else batch, hold_end=whole_run
        )
        end = self._store.run_end(batch.run_id)
        if whole_run and end is not None and end.held:
            log.warning(
                "dead-lettered %d points of run %s: %s; its end (%s) is kept with them, not"
                " applied: once MLflow has the run again (restored, or the sidecar pointed at"
                " the MLflow that has it), mlflow-sidecar spool requeue delivers them and"
                " ends it",
                moved,
                batch.run_id,
                reason,
                end.status,
            )
        else:
            log.warning("dead-lettered %d points of run %s: %s", moved, batch.run_id, reason)
        return whole_run
