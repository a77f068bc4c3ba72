"""`MetricIngest`: accepts streamed points into the spool and answers flushes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from mlflow_sidecar.core.domain import FlushResult, MetricColumns, MetricPoint
from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.metric_series import SeriesBatch
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore, run_ended_error

# Leave this much of a caller's deadline for the answer to travel back.
_ANSWER_MARGIN_S = 0.1


def _named(error: InvalidArgumentError, name: str) -> InvalidArgumentError:
    """The same complaint, about the field its request calls `name`."""
    return InvalidArgumentError(name, error.problem, reason=error.reason, metadata=error.metadata)


def _at(error: InvalidArgumentError, points: MetricColumns, index: int) -> InvalidArgumentError:
    """The same complaint, naming the point it is about as its request did."""
    return _named(error, points.field_name(index, error.field))


def _check_points(points: MetricColumns) -> None:
    # A training loop repeats a few run ids and keys thousands of times: check each
    # distinct one once; only a bad one is looked for, to name its first point.
    for run_id in points.distinct("run_ids"):
        try:
            check.run_id("run_id", run_id)
        except InvalidArgumentError as exc:
            raise _at(exc, points, points.run_ids.index(run_id)) from None
    for key in points.distinct("keys"):
        try:
            check.key("key", key)
        except InvalidArgumentError as exc:
            raise _at(exc, points, points.keys.index(key)) from None
    if points.timestamps_ms and min(points.timestamps_ms) < 0:
        index = next(i for i, t in enumerate(points.timestamps_ms) if t < 0)
        field = points.field_name(index, "timestamp_ms")
        raise InvalidArgumentError(field, "must not be negative")


def _checked_series(batch: SeriesBatch) -> SeriesBatch:
    """`_check_points` for series, read as columns; zero timestamps stamped with now."""
    now = 0
    stamped = []
    for series in batch.series:
        try:
            check.run_id("run_id", series.run_id)
            check.key("key", series.key)
        except InvalidArgumentError as exc:
            raise _named(exc, f"series[{series.index}].{exc.field}") from None
        stamps = series.timestamps_ms
        if stamps.min() <= 0:
            negative = np.flatnonzero(stamps < 0)
            if len(negative):
                field = f"series[{series.index}].timestamps_ms[{negative[0]}]"
                raise InvalidArgumentError(field, "must not be negative")
            now = now or _now_ms()
            stamps = np.where(stamps == 0, now, stamps)
            series = dataclasses.replace(series, timestamps_ms=stamps)  # noqa: PLW2901
        stamped.append(series)
    return SeriesBatch(stamped)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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

    def accept(self, points: Sequence[MetricPoint]) -> int:
        """Validate and commit points to the spool (all or none); returns how many."""
        if isinstance(points, SeriesBatch):
            return self._commit(_checked_series(points))
        columns = MetricColumns.from_points(points)
        _check_points(columns)
        if 0 in columns.timestamps_ms:
            # Stamped here, before the spool, so a redelivery is an exact duplicate MLflow
            # ignores.
            now = _now_ms()
            columns = MetricColumns(
                columns.run_ids,
                columns.keys,
                columns.values,
                [t or now for t in columns.timestamps_ms],
                columns.steps,
            )
        return self._commit(columns)

    def _commit(self, points: Sequence[MetricPoint]) -> int:
        accepted = self._store.append(points)
        self._deliverer.notify()
        if self._metrics is not None:
            self._metrics.points_accepted.inc(accepted)
        return accepted

    def flush(self, run_id: str = "", timeout_s: float | None = None) -> FlushResult:
        """Wait for delivery of a run's (or all) points within the call's deadline."""
        if run_id:
            check.bounded("run_id", run_id, 64)
        budget = self._flush_timeout_s if timeout_s is None else timeout_s
        left = call_deadline.remaining()
        if left is not None:
            budget = min(budget, max(0.0, left - _ANSWER_MARGIN_S))
        pending = self._deliverer.wait_delivered(run_id, budget)
        return FlushResult(pending, self._store.dead_letter_count(run_id))

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
