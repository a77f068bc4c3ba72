"""`MetricIngest`: accepts streamed points into the spool and answers flushes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mlflow_sidecar.core.domain import FlushResult
from mlflow_sidecar.core.errors import DeadlineExceededError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import RunEnd, SpoolStore, run_ended_error

# What a wait leaves of the caller's deadline for the answer to travel back: a tenth of
# it, between these bounds. A fixed 0.1 s was too little on a loaded machine, where the
# answer then came after the deadline and the caller saw DEADLINE_EXCEEDED, not the counts.
_ANSWER_MARGIN_MIN_S = 0.1
_ANSWER_MARGIN_MAX_S = 1.0


def wait_within(wanted_s: float, left_s: float | None) -> float:
    """How long a call with `left_s` of its deadline (None: none) waits, of `wanted_s`,
    so that its answer still arrives in time."""
    if left_s is None:
        return wanted_s
    margin = min(_ANSWER_MARGIN_MAX_S, max(_ANSWER_MARGIN_MIN_S, left_s / 10))
    return min(wanted_s, max(0.0, left_s - margin))


class MetricIngest:
    """The spool's front door: validation, timestamps, acceptance, flush waits."""

    def __init__(
        self,
        store: SpoolStore,
        deliverer: MetricDeliverer,
        flush_timeout_s: float,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self._store = store
        self._deliverer = deliverer
        self._flush_timeout_s = flush_timeout_s
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_spool(store.gauges)

    @property
    def max_message_points(self) -> int:
        """The most points one message can hold: more can never be accepted."""
        return self._store.max_points

    def accept(self, batch: MetricBatch) -> int:
        """Check a batch and commit it to the spool (all or none); returns how many points."""
        accepted = self._store.append(batch.checked())
        self._deliverer.notify()
        if self._metrics is not None:
            self._metrics.points_accepted.inc(accepted)
        return accepted

    def flush(self, run_id: str = "", timeout_s: float | None = None) -> FlushResult:
        """Wait for delivery of a run's (or all) points within the call's deadline."""
        if run_id:
            check.run_id("run_id", run_id)
        pending = self._deliverer.wait_delivered(run_id, self._budget(timeout_s))
        return FlushResult(
            pending,
            self._store.dead_letter_count(run_id),
            self._ends_to_apply(run_id),
            self._held_ends(run_id),
        )

    @contextmanager
    def delivery_held(self, run_id: str) -> Iterator[None]:
        """Nothing of the run goes to MLflow (points, its recorded end) while the block
        runs. Waits for a send of the run in flight, within the call's deadline."""
        budget = self._budget(None)
        try:
            with self._deliverer.held(run_id, budget):
                yield
        except TimeoutError:
            raise DeadlineExceededError(
                f"run {run_id} stayed busy with delivery to MLflow for {budget:.1f}s;"
                " nothing was changed, call again"
            ) from None
        self._deliverer.notify()

    def has_end(self, run_id: str) -> bool:
        """Whether an end of the run is recorded (applied in MLflow or not)."""
        return self._store.run_end(run_id) is not None

    def cancel_end(self, run_id: str) -> bool:
        """Forget the run's recorded end (it was resumed): its points are accepted again.
        True if an end was recorded."""
        return self._store.cancel_end(run_id)

    def end_of(self, run_id: str) -> RunEnd | None:
        """The run's recorded end, applied in MLflow or not; None without one."""
        return self._store.run_end(run_id)

    def put_back_end(self, run_id: str, previous: RunEnd | None) -> None:
        """Undo a `record_end` that did not take effect: the end recorded before it, if
        any, is the run's again as it was (an end held with the run's dead letters stays
        held for `spool requeue`)."""
        if previous is None:
            self._store.cancel_end(run_id)
        else:
            self._store.restore_end(previous)

    def end_applied(self, run_id: str) -> None:
        """MLflow has ended the run as its recorded end says."""
        self._store.end_applied(run_id)

    def _budget(self, timeout_s: float | None) -> float:
        """`timeout_s` (None: the flush timeout), within the call's deadline."""
        budget = self._flush_timeout_s if timeout_s is None else timeout_s
        return wait_within(budget, call_deadline.remaining())

    def _ends_to_apply(self, run_id: str) -> int:
        """Recorded ends of the run (with "": of any run) that follow its points to MLflow;
        an end held with the run's dead letters waits for `spool requeue` instead."""
        if run_id:
            end = self._store.run_end(run_id)
            return int(end is not None and end.waiting)
        return len(self._store.ends_to_apply())

    def _held_ends(self, run_id: str) -> int:
        """Ends of the run (with "": of any run) MLflow refused, held for `spool requeue`."""
        if run_id:
            end = self._store.run_end(run_id)
            return int(end is not None and bool(end.held))
        return len(self._store.held_ends())

    def pending(self, run_id: str) -> int:
        """Points of a run still in the spool."""
        return self._store.pending(run_id)

    def record_end(self, run_id: str, status: str, end_time_ms: int, *, applied: bool) -> int:
        """Record a run's end durably; returns its points still to be delivered first.

        Points for the run that arrive from now on are refused (RUN_ENDED). Unless
        `applied` (MLflow has ended the run already), the deliverer ends the run in MLflow
        right after its last point from before the end."""
        pending = self._store.record_end(run_id, status, end_time_ms, applied=applied)
        self._deliverer.notify()
        return pending

    def refuse_if_ended(self, run_id: str) -> None:
        """FAILED_PRECONDITION (reason RUN_ENDED) for a run ended through the sidecar, as
        the spool refuses its streamed points: LogMetrics and StreamMetrics agree."""
        end = self._store.run_end(run_id)
        if end is not None:
            raise run_ended_error(end)

    def ended(self, run_id: str) -> bool:
        """True once a recorded end of the run has reached MLflow."""
        end = self._store.run_end(run_id)
        return end is not None and end.applied
