"""`TrackingService`: the sidecar's experiment-tracking use cases, over `MlflowPort`."""

from __future__ import annotations

import concurrent.futures
import contextvars
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from mlflow_sidecar.core import domain, limits
from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import (
    TERMINAL_RUN_STATUSES,
    Experiment,
    FileInfo,
    FlushResult,
    LifecycleStage,
    Metric,
    MetricPoint,
    Page,
    Run,
    RunInfo,
    RunStatus,
    ViewType,
)
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.core.limits import (
    DEFAULT_METRIC_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_METRIC_PAGE_SIZE,
    MAX_PAGE_SIZE,
)
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.idempotency import (
    CLIENT_REQUEST_ID_TAG,
    REQUEST_ID_TAG,
    check_request_id,
    request_id_reused,
)
from mlflow_sidecar.server.keyed_locks import KeyedLocks
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.services.artifacts import (
    decode_listing_token,
    encode_listing_token,
)
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.spool.store import RunEnd
from mlflow_sidecar.server.staging import Staging

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = check.RUN_NAME_TAG


def _start_run_id(request_id: str, client_request_id: str) -> str:
    """The one request id of a StartRun that may name it twice (old and new field)."""
    check_request_id("request_id", request_id)
    check_request_id("client_request_id", client_request_id)
    if request_id and client_request_id and request_id != client_request_id:
        raise InvalidArgumentError(
            "client_request_id", "differs from request_id; set request_id alone"
        )
    return request_id or client_request_id


def _usable(experiment: Experiment) -> Experiment:
    """An existing experiment that CreateExperiment may hand back: not a deleted one."""
    if experiment.lifecycle_stage is domain.LifecycleStage.DELETED:
        raise FailedPreconditionError(
            f"experiment {experiment.name!r} is deleted (id {experiment.experiment_id}) and"
            f" keeps its name until it is purged: restore it with RestoreExperiment"
            f" (experiment_id {experiment.experiment_id}) or choose another name",
            reason=ErrorReason.EXPERIMENT_NOT_ACTIVE,
            metadata={"experiment_id": experiment.experiment_id},
        )
    return experiment


def _refuse_changed_params(
    run_id: str, logged: Mapping[str, str], params: Mapping[str, str]
) -> None:
    """FAILED_PRECONDITION (PARAM_VALUE_CHANGED) for a param logged with another value."""
    for k, v in params.items():
        if k in logged and logged[k] != v:
            raise FailedPreconditionError(
                f"param {k!r} of run {run_id} is already {logged[k]!r}; params are"
                f" write-once, so {v!r} is refused",
                reason=ErrorReason.PARAM_VALUE_CHANGED,
                metadata={"key": k},
            )


class TrackingService:
    """Experiment tracking backed by MLflow, with the sidecar's rules on top:
    idempotent StartRun, write-once params, MLflow's batch limits, named-field errors."""

    def __init__(self, gateway: MlflowPort, ingest: MetricIngest, staging: Staging) -> None:
        self._gateway = gateway
        self._ingest = ingest
        self._staging = staging  # transfer limits and scratch space
        self._start_locks = KeyedLocks()
        self._end_locks = KeyedLocks()

    # -- experiments --------------------------------------------------------------------

    def create_experiment(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str = "",
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> Experiment:
        check.require("name", name, max_length=limits.MAX_CREATED_NAME_LENGTH)
        check.tags("tags", tags or {}, max_value_length=limits.MAX_EXPERIMENT_TAG_VALUE_LENGTH)
        check.bounded("artifact_location", artifact_location, limits.MAX_ARTIFACT_LOCATION_LENGTH)
        if get_if_exists:
            try:
                return _usable(self._gateway.get_experiment_by_name(name))
            except NotFoundError:
                pass
        try:
            experiment_id = self._gateway.create_experiment(
                name,
                artifact_location=artifact_location,
                tags=tags or {},
                # Without a caller's id the call still takes effect once across the
                # sidecar's own retries of MLflow.
                request_id=request_id or uuid.uuid4().hex,
            )
        except AlreadyExistsError:
            # The name is taken: by a deleted experiment (which MLflow keeps until its garbage
            # collection), or by one another caller created after our look-up.
            existing = _usable(self._gateway.get_experiment_by_name(name))
            if not get_if_exists:
                raise AlreadyExistsError(
                    f"experiment {name!r} already exists (id {existing.experiment_id})"
                ) from None
            return existing
        return self._gateway.get_experiment(experiment_id)

    def get_experiment(self, experiment_id: str) -> Experiment:
        check.experiment_id("experiment_id", experiment_id)
        return self._gateway.get_experiment(experiment_id)

    def get_experiment_by_name(self, name: str) -> Experiment:
        check.require("name", name)
        return self._gateway.get_experiment_by_name(name)

    def search_experiments(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        view_type: ViewType = ViewType.ACTIVE_ONLY,
    ) -> Page[Experiment]:
        check.search_terms(filter_string, order_by)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        return self._gateway.search_experiments(
            filter_string=filter_string,
            order_by=order_by,
            page_size=size,
            page_token=check.page_token(page_token),
            view_type=view_type,
        )

    def delete_experiment(self, experiment_id: str, *, request_id: str = "") -> None:
        check.experiment_id("experiment_id", experiment_id)
        self._gateway.delete_experiment(experiment_id)

    def restore_experiment(self, experiment_id: str) -> Experiment:
        check.experiment_id("experiment_id", experiment_id)
        return self._gateway.restore_experiment(experiment_id)

    # -- runs ---------------------------------------------------------------------------

    def start_run(
        self,
        experiment_id: str,
        *,
        run_name: str = "",
        tags: Mapping[str, str] | None = None,
        parent_run_id: str = "",
        start_time_ms: int = 0,
        client_request_id: str = "",
        request_id: str = "",
    ) -> Run:
        check.experiment_id("experiment_id", experiment_id)
        check.bounded("run_name", run_name, limits.MAX_KEY_LENGTH)
        check.run_tags("tags", tags or {}, creating=True)
        named = (tags or {}).get(RUN_NAME_TAG)
        if run_name and named is not None and named != run_name:
            # MLflow refuses the pair too, without saying which field.
            raise InvalidArgumentError(
                "run_name",
                f"{run_name!r} differs from the tag {RUN_NAME_TAG}={named!r}; give the name once",
            )
        if start_time_ms < 0:
            raise InvalidArgumentError("start_time_ms", "must not be negative")
        all_tags = dict(tags or {})
        if parent_run_id:
            check.run_id("parent_run_id", parent_run_id)
            tagged = all_tags.get(PARENT_RUN_ID_TAG)
            if tagged is not None and tagged != parent_run_id:
                raise InvalidArgumentError(
                    "parent_run_id",
                    f"{parent_run_id!r} differs from the tag {PARENT_RUN_ID_TAG}={tagged!r};"
                    " give the parent once",
                )
            parent = self.get_run(parent_run_id)
            if parent.info.experiment_id != experiment_id:
                raise InvalidArgumentError(
                    "parent_run_id", "the parent run belongs to another experiment"
                )
            all_tags[PARENT_RUN_ID_TAG] = parent_run_id
        # Fails with NOT_FOUND for an unknown experiment rather than MLflow's vaguer error.
        experiment = self._gateway.get_experiment(experiment_id)
        if experiment.lifecycle_stage is domain.LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"experiment {experiment_id} is deleted; restore it with RestoreExperiment first",
                reason=ErrorReason.EXPERIMENT_NOT_ACTIVE,
                metadata={"experiment_id": experiment_id},
            )
        key = _start_run_id(request_id, client_request_id) or uuid.uuid4().hex
        all_tags[REQUEST_ID_TAG] = key
        # Concurrent duplicates wait here; the first creates, the rest find its run.
        with self._start_locks.hold(key):
            run = self._gateway.find_or_create_run(
                experiment_id,
                run_name=run_name,
                tags=all_tags,
                start_time_ms=start_time_ms,
                key_tag=REQUEST_ID_TAG,
                also_tagged=(CLIENT_REQUEST_ID_TAG, key) if client_request_id else None,
            )
        # A run found by the id's tag (the ledger forgot the id) that another name was
        # asked for is another call's.
        if run_name and run.info.run_name != run_name:
            field = "request_id" if request_id else "client_request_id"
            raise request_id_reused(field, key, "StartRun")
        return run

    def get_run(self, run_id: str) -> Run:
        check.run_id("run_id", run_id)
        return self._gateway.get_run(run_id)

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        view_type: ViewType = ViewType.ACTIVE_ONLY,
    ) -> Page[Run]:
        if not experiment_ids:
            raise InvalidArgumentError("experiment_ids", "name at least one experiment")
        for index, experiment_id in enumerate(experiment_ids):
            check.experiment_id(f"experiment_ids[{index}]", experiment_id)
        check.search_terms(filter_string, order_by)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        return self._gateway.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by,
            page_size=size,
            page_token=check.page_token(page_token),
            view_type=view_type,
        )

    def end_run_with_pending(
        self,
        run_id: str,
        status: RunStatus = RunStatus.FINISHED,
        *,
        end_time_ms: int = 0,
        wait_for_delivery: bool = False,
    ) -> tuple[Run, int]:
        """End a run once its spooled points are in MLflow, so its history is complete;
        returns the run and how many of its points are still to be delivered first.

        With no points of the run in the spool, the run is ended in MLflow at once. With a
        backlog the end is recorded in the spool (durably) and applied by the deliverer
        right after the run's last point: the run returned is still RUNNING then, unless
        `wait_for_delivery`, which waits for that within the call's deadline. An end is
        also recorded, backlog or not, while MLflow cannot be reached (the run it returns
        then holds only its id and status): the trainer that ends its run during an
        outage and exits leaves it ended once MLflow is back.
        """
        check.run_id("run_id", run_id)
        if status not in TERMINAL_RUN_STATUSES:
            raise InvalidArgumentError("status", "must be FINISHED, FAILED or KILLED")
        if end_time_ms < 0:
            raise InvalidArgumentError("end_time_ms", "must not be negative")
        ended_ms = end_time_ms or now_ms()
        # One end or resume of a run at a time: MLflow and the spool's record agree after.
        with self._end_locks.hold(run_id):
            previous = self._ingest.end_of(run_id)
            # Recorded first, in one step with counting the run's backlog: points that
            # arrive from now on are refused (RUN_ENDED), so none can land in MLflow after
            # the end, nor be missing from the backlog the answer reports.
            pending = self._ingest.record_end(run_id, status.value, ended_ms, applied=False)
            answer_by = _answer_by()
            mlflow_answered = True
            if not pending:
                if self._ended_now(run_id, status, ended_ms, previous):
                    return self._gateway.get_run(run_id), 0
                mlflow_answered = False
            else:
                # With a backlog the end stays recorded whatever MLflow says now: down or
                # hung, it may not answer within the call's deadline, and a trainer that
                # ends its run and exits must leave it ended. Both questions to MLflow share
                # one short wait.
                try:
                    _asked_briefly(lambda: self._require_active(run_id), answer_by)
                except (UnavailableError, DeadlineExceededError):
                    mlflow_answered = False  # the deliverer applies the end once MLflow answers
                except SidecarError:
                    # A deleted or unknown run: this end does not take effect, and an end
                    # recorded before it stays as it was.
                    self._ingest.put_back_end(run_id, previous)
                    raise
        if wait_for_delivery:
            self._wait_for_end(run_id)
            # Ended in MLflow now, after every point MLflow took (one it refused as invalid
            # is a dead letter): the caller asked for MLflow's view.
            return self._gateway.get_run(run_id), 0
        if mlflow_answered:
            try:
                return _asked_briefly(lambda: self._gateway.get_run(run_id), answer_by), pending
            except (UnavailableError, DeadlineExceededError):
                pass
        # The end is recorded: the call did what it promises, MLflow's view can wait.
        return (
            Run(
                RunInfo(
                    run_id,
                    experiment_id="",
                    status=RunStatus.RUNNING,
                    lifecycle_stage=LifecycleStage.UNKNOWN,
                )
            ),
            pending,
        )

    def _ended_now(
        self, run_id: str, status: RunStatus, ended_ms: int, previous: RunEnd | None
    ) -> bool:
        """End in MLflow a run with no backlog whose end is recorded; True once ended,
        False when MLflow cannot be reached and the end stays recorded for the deliverer.
        Under the run's end lock."""
        try:
            # Not while the deliverer applies an earlier end of the run: landing in MLflow
            # after this one, it would leave the run with the earlier status.
            with self._ingest.delivery_held(run_id):
                self._require_active(run_id)
                self._gateway.set_terminated(run_id, status, ended_ms)
        except (UnavailableError, DeadlineExceededError):
            if previous is not None and previous.held:
                # An end held with the run's dead letters waits for `spool requeue`,
                # which applies it after them: it stays as it was.
                self._ingest.put_back_end(run_id, previous)
                raise
            # The end stays recorded, as with a backlog: points that came while MLflow was
            # asked were refused as after an end, so the end must take effect. The
            # deliverer applies it once MLflow answers; a trainer that ends its run during
            # an outage and exits leaves it ended.
            return False
        except SidecarError:
            self._ingest.put_back_end(run_id, previous)
            raise
        self._ingest.end_applied(run_id)
        return True

    def _wait_for_end(self, run_id: str) -> None:
        """Wait until the run's recorded end is applied in MLflow, within the call's
        deadline alone, as EndRun's contract says (the flush timeout is FlushMetrics'
        default wait, not a bound of this one)."""
        flushed = self._ingest.flush(run_id, timeout_s=call_deadline.remaining())
        end = self._ingest.end_of(run_id)
        if end is not None and end.held:
            raise FailedPreconditionError(
                f"run {run_id} is not ended in MLflow, which refused it ({end.held}); the"
                f" end is kept with the run's {flushed.dead_letter_points} dead-lettered"
                " points: once MLflow has the run again, `mlflow-sidecar spool requeue`"
                " applies it after them",
                reason=ErrorReason.RUN_END_HELD,
                metadata={"dead_letter_points": str(flushed.dead_letter_points)},
            )
        if not self._ingest.ended(run_id):
            raise DeadlineExceededError(
                f"run {run_id} is not ended in MLflow yet: {flushed.pending_points} of its"
                " points are still being delivered; its end is recorded and follows them",
                reason=ErrorReason.RUN_END_PENDING,
            )

    def delete_run(self, run_id: str, *, request_id: str = "") -> None:
        """Soft-delete a run, as MLflow does. An end recorded here and not yet applied
        (its points still being delivered) is applied first: a run that was ended and
        then deleted is ended when it is restored, as in MLflow. Its undelivered points
        become dead letters (`mlflow-sidecar spool requeue` sends them after a restore)."""
        check.run_id("run_id", run_id)
        with self._end_locks.hold(run_id):
            end = self._ingest.end_of(run_id)
            if end is not None and not end.applied:
                run = self._gateway.get_run(run_id)
                if run.info.lifecycle_stage is domain.LifecycleStage.ACTIVE:
                    self._gateway.set_terminated(run_id, RunStatus(end.status), end.end_time_ms)
                self._ingest.end_applied(run_id)
            self._gateway.delete_run(run_id)

    def restore_run(self, run_id: str) -> Run:
        check.run_id("run_id", run_id)
        return self._gateway.restore_run(run_id)

    def resume_run(self, run_id: str) -> Run:
        """Set an ended run back to RUNNING, as MLflow's `start_run(run_id=...)` does, and
        accept its points again; an end recorded here and not yet applied is cancelled.

        No point or end of the run goes to MLflow meanwhile, so a recorded end cannot land
        after the run was set RUNNING. MLflow is changed before the record, so a failure
        leaves the run ended on both sides (and a retry finishes the job)."""
        check.run_id("run_id", run_id)
        with self._end_locks.hold(run_id), self._ingest.delivery_held(run_id):
            run = self._require_active(run_id)
            if run.info.status is not RunStatus.RUNNING:
                self._gateway.set_running(run_id)
            self._ingest.cancel_end(run_id)
        return self._gateway.get_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        check.run_id("run_id", run_id)
        check.string_map("params", params, max_value_length=limits.MAX_PARAM_VALUE_LENGTH)
        if not params:
            return
        run = self._require_active(run_id)
        _refuse_changed_params(run_id, run.params, params)
        new = [(k, v) for k, v in params.items() if k not in run.params]
        for batch in check.chunks(new, limits.MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self._gateway.log_batch(run_id, params=dict(batch))
            except InvalidArgumentError:
                # Another call may have logged some of them since the run was read. MLflow's
                # SQL stores refuse the whole batch then, even where that call logged the
                # same values (its insert and ours raced): another value reads as the
                # check's refusal, and the same value is this call's effect already.
                logged = self._gateway.get_run(run_id).params
                _refuse_changed_params(run_id, logged, params)
                missing = {k: v for k, v in batch if k not in logged}
                if missing:
                    self._gateway.log_batch(run_id, params=missing)

    def log_metrics(
        self, run_id: str, metrics: Sequence[Metric], *, arrived_ms: int | None = None
    ) -> int:
        """Log points to MLflow now; those without a timestamp take `arrived_ms` (the
        call's first arrival, the same for its retries), else the time of this call."""
        check.run_id("run_id", run_id)
        check.metric_points("metrics", ((m.key, m.timestamp_ms) for m in metrics))
        if not metrics:
            return 0
        self._ingest.refuse_if_ended(run_id)
        now = arrived_ms if arrived_ms is not None else now_ms()
        stamped = [m if m.timestamp_ms else Metric(m.key, m.value, now, m.step) for m in metrics]
        for batch in check.chunks(stamped, limits.MAX_METRICS_PER_BATCH):
            self._gateway.log_batch(run_id, metrics=batch)
        return len(stamped)

    def enqueue_metrics(self, points: Sequence[MetricPoint]) -> int:
        return self.accept_metrics(MetricBatch.from_points(points))

    @property
    def max_message_points(self) -> int:
        """The most points one StreamMetrics message can hold (spool.max_points)."""
        return self._ingest.max_message_points

    def accept_metrics(self, batch: MetricBatch) -> int:
        """Check a batch of streamed points and commit it to the spool (all or none);
        returns how many points."""
        return self._ingest.accept(batch)

    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        return self._ingest.flush(run_id, timeout_s)

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        check.run_id("run_id", run_id)
        check.run_tags("tags", tags)
        items = list(tags.items())
        for batch in check.chunks(items, limits.MAX_PARAMS_TAGS_PER_BATCH):
            self._gateway.log_batch(run_id, tags=dict(batch))

    def delete_run_tag(self, run_id: str, key: str, *, request_id: str = "") -> None:
        check.run_id("run_id", run_id)
        check.tag_key("key", key)
        self._gateway.delete_tag(run_id, key)

    def get_metric_history(
        self,
        run_id: str,
        key: str,
        *,
        page_size: int = DEFAULT_METRIC_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[Metric]:
        check.run_id("run_id", run_id)
        check.key("metric_key", key)
        size = check.page_size(
            page_size, default=DEFAULT_METRIC_PAGE_SIZE, maximum=MAX_METRIC_PAGE_SIZE
        )
        page = self._gateway.get_metric_history(
            run_id, key, page_size=size, page_token=check.page_token(page_token)
        )
        if not page.items and not page_token:
            # MLflow answers a run it does not have with an empty history: a mistyped run
            # id must not read as "no points yet".
            self._gateway.get_run(run_id)
        return page

    # -- artifacts ----------------------------------------------------------------------

    def list_artifacts(
        self,
        run_id: str,
        path: str = "",
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[FileInfo]:
        check.run_id("run_id", run_id)
        check_relative_path("path", path, allow_empty=True)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        after = decode_listing_token(page_token, run_id, path)
        # MLflow lists a directory in one piece; the pages are cut here, in path order.
        entries = sorted(self._gateway.list_artifacts(run_id, path), key=lambda e: e.path)
        remaining = [e for e in entries if e.path > after] if after else entries
        page = tuple(remaining[:size])
        more = len(remaining) > size
        return Page(page, encode_listing_token(run_id, path, page[-1].path) if more else "")

    def _require_active(self, run_id: str) -> Run:
        run = self._gateway.get_run(run_id)
        if run.info.lifecycle_stage is domain.LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
            )
        return run


T = TypeVar("T")

# With a backlog, how long EndRun waits for MLflow's view of the run before it answers
# without it: the end is recorded already, and a hung MLflow must not hold the trainer's
# call until its deadline (which would read as a failure of a call that took effect).
_ASK_WHILE_RECORDED_S = 2.0
_asking = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="end-run-ask")


def _answer_by() -> float:
    """When (`time.monotonic()`) a call whose effect is recorded answers at the latest:
    `_ASK_WHILE_RECORDED_S` from now, or half the call's deadline if that is sooner."""
    budget = _ASK_WHILE_RECORDED_S
    left = call_deadline.remaining()
    if left is not None:
        budget = min(budget, max(0.0, left / 2))
    return time.monotonic() + budget


def _asked_briefly(ask: Callable[[], T], answer_by: float) -> T:
    """`ask()`'s answer before `answer_by`, else UnavailableError; an unanswered `ask`
    finishes in the background, bounded by MLflow's request timeout."""
    # The call's deadline goes with it: the gateway bounds its retries by it.
    future = _asking.submit(contextvars.copy_context().run, ask)
    try:
        return future.result(timeout=max(0.0, answer_by - time.monotonic()))
    except concurrent.futures.TimeoutError:
        raise UnavailableError("MLflow did not answer in time") from None
