"""`SidecarTrackingStore`: MLflow's tracking store for `sidecar://` URIs.

Metric points take the fast path: `log_metric` and `log_batch` hand them to the
connection's MetricStream, which commits them to the sidecar's durable spool from a
background thread (within `max_delay_s`, 0.2 s by default), and the sidecar delivers them
to MLflow. The call costs the trainer a buffer append, whatever MLflow's latency. Ending a
run first hands its points to the spool (the sidecar then delivers them before it ends the
run in MLflow); `mlflow.flush_async_logging()` waits until every point logged through this
process is in MLflow. Reading a run or a metric history first delivers that run's points,
so a trainer reads what it wrote.

Operations the sidecar's contract does not offer raise MlflowException with error code
NOT_IMPLEMENTED; nothing is silently dropped.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from mlflow.entities import Experiment as MlflowExperiment
from mlflow.entities import LoggedModel as MlflowLoggedModel
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.entities import Run as MlflowRun
from mlflow.entities import RunInfo as MlflowRunInfo
from mlflow.environment_variables import MLFLOW_REGISTRY_URI
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking import (
    SEARCH_LOGGED_MODEL_MAX_RESULTS_DEFAULT,
    SEARCH_MAX_RESULTS_DEFAULT,
    SEARCH_MAX_RESULTS_THRESHOLD,
)
from mlflow.store.tracking.abstract_store import AbstractStore
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.validation import (
    _validate_batch_log_data,
    _validate_param,
    _validate_param_keys_unique,
    _validate_tag,
)

from mlflow_sidecar.client.grpc_logged_models import GrpcLoggedModels
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.metric_stream import checked_numbers
from mlflow_sidecar.core import names
from mlflow_sidecar.core.domain import TERMINAL_RUN_STATUSES, Metric
from mlflow_sidecar.core.domain import (
    RunStatus as SidecarRunStatus,
)
from mlflow_sidecar.core.errors import ErrorReason, FailedPreconditionError, NotFoundError
from mlflow_sidecar.core.limits import DEFAULT_METRIC_PAGE_SIZE, MAX_KEY_LENGTH
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModelStatus
from mlflow_sidecar.mlflow_plugin import entities, paging
from mlflow_sidecar.mlflow_plugin.connection import (
    SCHEME,
    TLS_SCHEME,
    ProcessConnection,
    SidecarConnection,
)
from mlflow_sidecar.mlflow_plugin.errors import refuses_unoffered, translated, unsupported

_log = logging.getLogger(__name__)
_SIDECAR_SCHEMES = (f"{SCHEME}://", f"{TLS_SCHEME}://")
# MLflow copies it into the run's name, which the sidecar bounds as a run name.
_RUN_NAME_TAG = "mlflow.runName"
_LINK_WARNED = False


class _Undelivered:
    """The runs this process streamed points to since they were last delivered, and the
    runs it ended."""

    def __init__(self) -> None:
        self._runs: set[str] = set()
        self._ended: set[str] = set()
        # Dead-lettered points of each run that a flush has reported already.
        self._dead_reported: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, run_id: str) -> None:
        """Refuse points of a run this process ended, before they reach the stream.

        The sidecar refuses them (RUN_ENDED): the stream would drop them and go on, but a
        point the process knows is refused is refused at once, as MLflow's error."""
        if run_id in self._ended:
            raise MlflowException(
                f"run {run_id} was ended: it takes no more metric points (the sidecar refuses"
                " them, reason RUN_ENDED); log them to a new run",
                error_code=databricks_pb2.INVALID_STATE,
            )

    def add(self, run_id: str) -> None:
        """Note points streamed to `run_id` (after the stream took them)."""
        if run_id not in self._runs:
            with self._lock:
                self._runs.add(run_id)

    def newly_dead(self, run_id: str, dead_letter_points: int, *, report: bool) -> int:
        """Of a run's `dead_letter_points`, how many no flush has reported yet; `report`
        counts them as reported from now on."""
        with self._lock:
            reported = self._dead_reported.get(run_id, 0)
            if report:
                self._dead_reported[run_id] = max(dead_letter_points, reported)
        return max(0, dead_letter_points - reported)

    def end(self, run_id: str) -> None:
        """Note that this process ended `run_id`."""
        with self._lock:
            self._ended.add(run_id)

    def resume(self, run_id: str) -> None:
        """Note that `run_id` was resumed: it takes points again."""
        with self._lock:
            self._ended.discard(run_id)

    def take(self, run_id: str | None = None) -> list[str]:
        with self._lock:
            if run_id is None:
                runs, self._runs = list(self._runs), set()
                return runs
            if run_id in self._runs:
                self._runs.discard(run_id)
                return [run_id]
            return []


# Per connection: stores come and go (MLflow builds one per client), the points stay.
_UNDELIVERED: dict[int, _Undelivered] = {}
_UNDELIVERED_LOCK = threading.Lock()


def _undelivered(connection: SidecarConnection) -> _Undelivered:
    with _UNDELIVERED_LOCK:
        found = _UNDELIVERED.get(id(connection))
        if found is None:
            found = _UNDELIVERED[id(connection)] = _Undelivered()
        return found


_REGISTRY_RESOLUTION_SPED_UP = False


def _speed_up_registry_resolution() -> None:
    """Resolve the default registry of a `sidecar://` tracking URI at once, once set up
    per process, as MLflow would resolve it: the tracking URI itself.

    With no registry URI chosen, MLflow resolves one in every fluent call (twice), and
    looks for an active Spark session first: an import attempt and several lookups that
    together cost more than the sidecar's `log_metric`. While nothing chose a registry
    (`mlflow.set_registry_uri`, MLFLOW_REGISTRY_URI) and pyspark was never imported (no
    session can be active then), the registry of a `sidecar://` tracking URI is that URI,
    and is answered so; anything else goes to MLflow's own resolution. Setting the
    process's registry URI instead would be as fast, but would also hand the sidecar the
    registry of every client this process makes for another tracking server.
    """
    global _REGISTRY_RESOLUTION_SPED_UP  # noqa: PLW0603 - once per process
    if _REGISTRY_RESOLUTION_SPED_UP:
        return
    _REGISTRY_RESOLUTION_SPED_UP = True
    mlflows_resolution = registry_utils._resolve_registry_uri

    def resolve_registry_uri(
        registry_uri: str | None = None, tracking_uri: str | None = None
    ) -> str | None:
        if (
            not registry_uri
            and registry_utils._registry_uri is None
            and "pyspark" not in sys.modules
            and not os.environ.get(MLFLOW_REGISTRY_URI.name)
        ):
            tracking = tracking_utils._resolve_tracking_uri(tracking_uri)
            if isinstance(tracking, str) and tracking.startswith(_SIDECAR_SCHEMES):
                return tracking
        resolved: str | None = mlflows_resolution(registry_uri, tracking_uri)
        return resolved

    registry_utils._resolve_registry_uri = resolve_registry_uri


def _page_size(max_results: int | None, default: int, ceiling: int) -> int:
    if max_results is None:
        return default
    return max(1, min(int(max_results), ceiling))


def _step(metric: MlflowMetric) -> Any:
    """A point's step as MLflow's client sends it: none is 0."""
    return 0 if metric.step is None else metric.step


def _refuse_bools(metric: MlflowMetric) -> None:
    """A bool step or timestamp is TypeError, as protobuf refuses it in MLflow's client;
    the metric stream would take `True` as 1."""
    for name, given in (("step", metric.step), ("timestamp", metric.timestamp)):
        if isinstance(given, bool):
            raise TypeError(f"metric {metric.key!r}: {name} must be an integer, not bool")


def _out_of_range(error: ValueError, path: str = "") -> MlflowException:
    """The metric stream's ValueError (a step or timestamp out of its range) as MLflow's
    error for a value it refuses."""
    where = f"{path}: " if path else ""
    return MlflowException(f"{where}{error}", error_code=databricks_pb2.INVALID_PARAMETER_VALUE)


def _check_point(metric: MlflowMetric, path: str) -> None:
    """Refuse, before any of its batch is sent, a point the metric stream would refuse
    once some of the batch is sent already: a step or timestamp that is not an integer
    (NaN, 1.5) is TypeError, as MLflow's client cannot put it into its request either;
    one out of range is INVALID_PARAMETER_VALUE."""
    _refuse_bools(metric)
    try:
        checked_numbers(metric.key, metric.value, metric.timestamp, _step(metric))
    except ValueError as exc:
        raise _out_of_range(exc, path) from None


def _dataset_use(dataset_input: Any) -> DatasetUse:
    """One MLflow DatasetInput as the sidecar records it.

    MLflow leaves schema, profile and tags unset (None) when a dataset has none; the
    sidecar's fields are never None, so they become empty.
    """
    dataset = dataset_input.dataset
    return DatasetUse(
        name=dataset.name,
        digest=dataset.digest,
        source_type=dataset.source_type,
        source=dataset.source,
        schema=dataset.schema or "",
        profile=dataset.profile or "",
        tags={t.key: t.value for t in dataset_input.tags or ()},
    )


@refuses_unoffered(AbstractStore, RestStore)
class SidecarTrackingStore(AbstractStore):
    """MLflow's tracking store for `sidecar://HOST:PORT` and `sidecar+tls://HOST:PORT`."""

    def __init__(self, store_uri: str, artifact_uri: str | None = None) -> None:
        super().__init__()
        self._process_connection = ProcessConnection(store_uri)
        self._undelivered_of: SidecarConnection | None = None
        self._undelivered_now = _Undelivered()
        _speed_up_registry_resolution()
        self._root = self._connection.root

    @property
    def _connection(self) -> SidecarConnection:
        return self._process_connection.get()

    @property
    def _tracking(self) -> GrpcExperimentTracking:
        return self._connection.tracking

    @property
    def _models(self) -> GrpcLoggedModels:
        return self._connection.models

    @property
    def _undelivered(self) -> _Undelivered:
        # Looked up again only after a fork: log_metric reads it twice per point.
        connection = self._connection
        if self._undelivered_of is not connection:
            self._undelivered_now = _undelivered(connection)
            self._undelivered_of = connection
        return self._undelivered_now

    # -- experiments ----------------------------------------------------------------------

    @translated
    def search_experiments(
        self,
        view_type: int | None = None,
        max_results: int | None = SEARCH_MAX_RESULTS_DEFAULT,
        filter_string: str | None = None,
        order_by: Sequence[str] | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        wanted = paging.checked_max_results(
            max_results, SEARCH_MAX_RESULTS_DEFAULT, SEARCH_MAX_RESULTS_THRESHOLD
        )
        found, token = paging.collect(
            lambda size, token: self._tracking.search_experiments(
                filter_string=filter_string or "",
                order_by=tuple(order_by or ()),
                page_size=size,
                page_token=token,
                view_type=entities.view_type(view_type),
            ),
            wanted,
            page_token,
        )
        return PagedList([entities.experiment(e) for e in found], token)

    @translated
    def create_experiment(
        self, name: str, artifact_location: str | None = None, tags: Any = None
    ) -> str:
        try:
            created = self._tracking.create_experiment(
                name, tags=entities.tag_dict(tags), artifact_location=artifact_location or ""
            )
        except FailedPreconditionError as exc:
            if exc.reason != ErrorReason.EXPERIMENT_NOT_ACTIVE:
                raise
            # A deleted experiment keeps its name: MLflow says the name exists.
            raise MlflowException(
                exc.message, error_code=databricks_pb2.RESOURCE_ALREADY_EXISTS
            ) from exc
        return created.experiment_id

    @translated
    def get_experiment(self, experiment_id: str) -> MlflowExperiment:
        return entities.experiment(self._tracking.get_experiment(str(experiment_id)))

    @translated
    def get_experiment_by_name(self, experiment_name: str) -> MlflowExperiment | None:
        try:
            return entities.experiment(self._tracking.get_experiment_by_name(experiment_name))
        except NotFoundError:
            # MLflow's stores answer None for a missing name; `set_experiment` relies on it.
            return None

    @translated
    def delete_experiment(self, experiment_id: str) -> None:
        self._tracking.delete_experiment(str(experiment_id))

    @translated
    def restore_experiment(self, experiment_id: str) -> None:
        self._tracking.restore_experiment(str(experiment_id))

    def rename_experiment(self, experiment_id: str, new_name: str) -> None:
        raise unsupported("Renaming an experiment")

    def set_experiment_tag(self, experiment_id: str, tag: Any) -> None:
        raise unsupported("Setting an experiment tag")

    def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        raise unsupported("Deleting an experiment tag")

    # -- runs -----------------------------------------------------------------------------

    @translated
    def create_run(
        self,
        experiment_id: str,
        user_id: str | None,
        start_time: int | None,
        tags: Any,
        run_name: str | None,
    ) -> MlflowRun:
        # `user_id` is not sent: StartRun has none, and the sidecar's MLflow client takes
        # it from the `mlflow.user` tag, as MLflow's client made it ("unknown" without the
        # tag). Turned into that tag, it would leave a tag MLflow's own call does not.
        tag_values = entities.tag_dict(tags)
        parent = tag_values.get("mlflow.parentRunId", "")
        started = self._tracking.start_run(
            str(experiment_id),
            run_name=run_name or "",
            tags=tag_values,
            parent_run_id=parent,
            start_time_ms=int(start_time or 0),
        )
        return entities.run(started, self._root)

    @translated
    def get_run(self, run_id: str) -> MlflowRun:
        self._deliver(run_id)
        return entities.run(self._tracking.get_run(run_id), self._root)

    @translated
    def update_run_info(
        self,
        run_id: str,
        run_status: int | None,
        end_time: int | None,
        run_name: str | None,
    ) -> MlflowRunInfo:
        status = SidecarRunStatus(RunStatus.to_string(run_status)) if run_status else None
        if status in TERMINAL_RUN_STATUSES and end_time and not run_name:
            # MLflow's set_terminated (every end of a run, `with mlflow.start_run()`'s
            # included) ends the run at once, without reading it from MLflow first: the
            # sidecar records an end behind the run's points while MLflow is down, and a
            # read would fail the end there.
            return self._end_run(run_id, status, end_time)
        current = self._tracking.get_run(run_id)
        if run_name and run_name != current.info.run_name:
            raise unsupported("Renaming a run")
        if status is SidecarRunStatus.RUNNING:
            # mlflow.start_run(run_id=...): even a run MLflow has RUNNING may have an end
            # recorded by the sidecar, waiting for its points; resuming cancels it.
            resumed = self._tracking.resume_run(run_id)
            self._undelivered.resume(run_id)
            self._connection.run_resumed(run_id)
            return entities.run_info(resumed.info, self._root)
        if status is None or (
            # A run ended again with its status and another end time takes that time, as
            # in MLflow (set_terminated(run_id, "FINISHED", end_time=...) on a FINISHED run).
            status == current.info.status
            and (end_time is None or end_time == current.info.end_time_ms)
        ):
            return entities.run_info(current.info, self._root)
        if status not in TERMINAL_RUN_STATUSES:
            raise unsupported(f"Setting run {run_id} to {status.value}")
        return self._end_run(run_id, status, end_time)

    def _end_run(
        self, run_id: str, status: SidecarRunStatus, end_time: int | None
    ) -> MlflowRunInfo:
        # The run's points go to the spool first; the sidecar ends the run in MLflow only
        # after it delivered them. The run stays undelivered here until a read or a flush
        # has waited for that.
        self._connection.flush_stream()
        ended = self._tracking.end_run(run_id, status, end_time_ms=int(end_time or 0))
        self._undelivered.end(run_id)
        return entities.run_info(ended.info, self._root)

    @translated
    def delete_run(self, run_id: str) -> None:
        # As MLflow's own logging would have them: in the run before it is deleted.
        self._deliver(run_id)
        self._tracking.delete_run(run_id)

    @translated
    def restore_run(self, run_id: str) -> None:
        self._tracking.restore_run(run_id)

    @translated
    def _search_runs(
        self,
        experiment_ids: Sequence[str],
        filter_string: str | None,
        run_view_type: int | None,
        max_results: int | None,
        order_by: Sequence[str] | None,
        page_token: str | None,
    ) -> tuple[list[MlflowRun], str | None]:
        wanted = paging.checked_max_results(
            max_results, SEARCH_MAX_RESULTS_DEFAULT, SEARCH_MAX_RESULTS_THRESHOLD
        )
        if not experiment_ids:
            # MLflow finds no runs in no experiments; the RPC refuses an empty list.
            return [], None
        self._deliver(None)  # a search reads what this process logged, as a get_run does
        found, token = paging.collect(
            lambda size, token: self._tracking.search_runs(
                [str(e) for e in experiment_ids],
                filter_string=filter_string or "",
                order_by=tuple(order_by or ()),
                page_size=size,
                page_token=token,
                view_type=entities.view_type(run_view_type),
            ),
            wanted,
            page_token,
        )
        return [entities.run(r, self._root) for r in found], token

    # -- params, tags, metrics ------------------------------------------------------------

    @translated
    def log_param(self, run_id: str, param: Param) -> None:
        param = _validate_param(param.key, param.value)  # MLflow's rules, and its truncation
        self._tracking.log_params(run_id, {param.key: str(param.value)})

    @translated
    def set_tag(self, run_id: str, tag: RunTag) -> None:
        tag = _validate_tag(tag.key, tag.value)
        self._tracking.set_run_tags(run_id, {tag.key: str(tag.value)})

    @translated
    def delete_tag(self, run_id: str, key: str) -> None:
        self._tracking.delete_run_tag(run_id, key)

    @translated
    def log_metric(self, run_id: str, metric: MlflowMetric) -> None:
        self._warn_of_dropped_links((metric,))
        self._undelivered.check(run_id)
        _refuse_bools(metric)
        try:
            # Step and timestamp go as given: the stream refuses what is not an integer
            # (TypeError, as MLflow's client does) instead of rounding it.
            self._connection.stream().log(
                run_id,
                metric.key,
                metric.value,
                step=_step(metric),
                timestamp_ms=metric.timestamp,
            )
        except ValueError as exc:
            raise _out_of_range(exc) from None
        # Only once the stream took it: a point it refused leaves nothing to wait for.
        self._undelivered.add(run_id)

    @translated
    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MlflowMetric],
        params: Sequence[Param],
        tags: Sequence[RunTag],
    ) -> None:
        # All of it checked before any of it is sent, as MLflow's stores do: a batch that
        # fails leaves nothing behind. Long values are truncated as MLflow truncates them.
        metrics, params, tags = _validate_batch_log_data(metrics, params, tags)
        _validate_param_keys_unique(params)
        # And by the sidecar's own rules for tags, which it applies after the params went.
        for index, t in enumerate(tags):
            names.tag_key(f"tags[{index}].key", t.key)
            if t.key == _RUN_NAME_TAG:
                names.bounded(f"tags[{_RUN_NAME_TAG}]", str(t.value), MAX_KEY_LENGTH)
        self._warn_of_dropped_links(metrics)
        if metrics:
            self._undelivered.check(run_id)
            names.run_id("run_id", run_id)
            for index, m in enumerate(metrics):
                names.key(f"metrics[{index}].key", m.key)
                _check_point(m, f"metrics[{index}]")
        if params:
            self._tracking.log_params(run_id, {p.key: str(p.value) for p in params})
        if tags:
            self._tracking.set_run_tags(run_id, {t.key: str(t.value) for t in tags})
        if metrics:
            stream = self._connection.stream()
            for m in metrics:
                stream.log(run_id, m.key, m.value, step=_step(m), timestamp_ms=m.timestamp)
            self._undelivered.add(run_id)

    def log_metric_async(self, run_id: str, metric: MlflowMetric) -> RunOperations:
        # The stream is already asynchronous and durable: MLflow's own queue would only
        # add a thread hop in front of it.
        self.log_metric(run_id, metric)
        return RunOperations([])

    def log_param_async(self, run_id: str, param: Param) -> RunOperations:
        self.log_param(run_id, param)
        return RunOperations([])

    def set_tag_async(self, run_id: str, tag: RunTag) -> RunOperations:
        self.set_tag(run_id, tag)
        return RunOperations([])

    def log_batch_async(
        self,
        run_id: str,
        metrics: Sequence[MlflowMetric],
        params: Sequence[Param],
        tags: Sequence[RunTag],
    ) -> RunOperations:
        self.log_batch(run_id, metrics, params, tags)
        return RunOperations([])

    @translated
    def flush_async_logging(self) -> None:
        """Wait until every point logged through this process is in MLflow."""
        self._connection.flush_stream(report_dropped=True)
        runs = self._undelivered.take()
        for done, run_id in enumerate(runs):
            try:
                self._await_delivery(run_id, strict=True)
            except BaseException:
                # The runs not yet waited for are waited for by the next flush or read.
                for later in runs[done + 1 :]:
                    self._undelivered.add(later)
                raise

    @translated
    def end_async_logging(self) -> None:
        self._connection.flush_stream()

    @translated
    def shut_down_async_logging(self) -> None:
        self._connection.flush_stream()

    @translated
    def get_metric_history(
        self,
        run_id: str,
        metric_key: str,
        max_results: int | None = None,
        page_token: str | None = None,
    ) -> PagedList[Any]:
        self._deliver(run_id)
        try:
            return self._metric_history(run_id, metric_key, max_results, page_token)
        except NotFoundError as exc:
            # MLflow answers a missing run's history with no points; the RPC says
            # RUN_NOT_FOUND.
            if exc.reason != ErrorReason.RUN_NOT_FOUND:
                raise
            return PagedList([], None)

    def _metric_history(
        self, run_id: str, metric_key: str, max_results: int | None, page_token: str | None
    ) -> PagedList[Any]:
        if max_results is not None:
            page = self._tracking.get_metric_history(
                run_id,
                metric_key,
                page_size=_page_size(max_results, DEFAULT_METRIC_PAGE_SIZE, max_results),
                page_token=page_token or "",
            )
            return PagedList([entities.metric(p) for p in page.items], page.next_page_token or None)
        # No bound: every point, as MLflow's own stores answer.
        points: list[Metric] = []
        token = page_token or ""
        while True:
            page = self._tracking.get_metric_history(run_id, metric_key, page_token=token)
            points.extend(page.items)
            token = page.next_page_token
            if not token:
                return PagedList([entities.metric(p) for p in points], None)

    @translated
    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        uses = [_dataset_use(d) for d in datasets or ()]
        model_ids = [m.model_id for m in models or ()]
        if uses or model_ids:
            self._models.log_inputs(run_id, uses, model_ids)

    @translated
    def log_outputs(self, run_id: str, models: Sequence[Any]) -> None:
        self._models.log_outputs(run_id, [(m.model_id, int(m.step or 0)) for m in models])

    @translated
    def create_logged_model(
        self,
        experiment_id: str,
        name: str | None = None,
        source_run_id: str | None = None,
        tags: Any = None,
        params: Any = None,
        model_type: str | None = None,
    ) -> MlflowLoggedModel:
        created = self._models.create(
            str(experiment_id),
            name=name or "",
            model_type=model_type or "",
            source_run_id=source_run_id or "",
            params=entities.tag_dict(params),
            tags=entities.tag_dict(tags),
        )
        return entities.logged_model(created, self._root)

    @translated
    def search_logged_models(
        self,
        experiment_ids: Sequence[str],
        filter_string: str | None = None,
        datasets: Sequence[Any] | None = None,
        max_results: int | None = None,
        order_by: Sequence[dict[str, Any]] | None = None,
        page_token: str | None = None,
    ) -> PagedList[MlflowLoggedModel]:
        if datasets:
            raise unsupported("Searching logged models by dataset")
        # MLflow's stores read a missing or zero max_results as their default, and set no
        # ceiling.
        wanted = paging.checked_max_results(
            max_results or None, SEARCH_LOGGED_MODEL_MAX_RESULTS_DEFAULT, None
        )
        found, token = paging.collect(
            lambda size, token: self._models.search(
                [str(e) for e in experiment_ids],
                filter_string=filter_string or "",
                order_by=[
                    (o["field_name"], bool(o.get("ascending", True))) for o in order_by or ()
                ],
                page_size=size,
                page_token=token,
            ),
            wanted,
            page_token,
        )
        return PagedList([entities.logged_model(m, self._root) for m in found], token)

    @translated
    def get_logged_model(self, model_id: str, allow_deleted: bool = False) -> MlflowLoggedModel:
        return entities.logged_model(self._models.get(model_id), self._root)

    @translated
    def finalize_logged_model(self, model_id: str, status: Any) -> MlflowLoggedModel:
        final = LoggedModelStatus(str(getattr(status, "name", status)).upper())
        return entities.logged_model(self._models.finalize(model_id, final), self._root)

    @translated
    def set_logged_model_tags(self, model_id: str, tags: Any) -> None:
        self._models.set_tags(model_id, entities.tag_dict(tags))

    @translated
    def delete_logged_model_tag(self, model_id: str, key: str) -> None:
        self._models.delete_tag(model_id, key)

    def delete_logged_model(self, model_id: str) -> None:
        raise unsupported("Deleting a logged model")

    def record_logged_model(self, run_id: str, mlflow_model: Any) -> None:
        raise unsupported("Recording an MLflow 2 model on a run (the mlflow.log-model.history tag)")

    # -- delivery -------------------------------------------------------------------------

    def _deliver(self, run_id: str | None) -> None:
        """Put the run's (None: every run's) points logged through this process into
        MLflow before a read."""
        self._connection.flush_stream()
        for pending in self._undelivered.take(run_id):
            self._await_delivery(pending, strict=False)

    def _await_delivery(self, run_id: str, *, strict: bool) -> None:
        result = self._tracking.flush_metrics(run_id)
        dead = self._undelivered.newly_dead(run_id, result.dead_letter_points, report=strict)
        if dead and not strict:
            # A read does not report them: the run waits for the next flush, which does.
            self._undelivered.add(run_id)
        elif dead:
            raise MlflowException(
                f"{dead} metric points of run {run_id} will never be in MLflow: MLflow refused"
                " them for good (the run is deleted or does not exist), and the sidecar keeps"
                " them as dead letters (`mlflow-sidecar spool status` lists them)",
                error_code=databricks_pb2.INVALID_STATE,
            )
        if result.complete:
            return
        # Still pending: keep the run so that the next read or flush waits for it again.
        self._undelivered.add(run_id)
        message = (
            f"{result.pending_points} points of run {run_id} are safe in the sidecar's spool"
            " but not yet in MLflow"
            if result.pending_points
            else f"the end of run {run_id} is recorded in the sidecar but not yet in MLflow"
        )
        if strict:
            raise MlflowException(message, error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE)
        _log.warning("%s; reading what MLflow has now", message)

    @staticmethod
    def _warn_of_dropped_links(metrics: Sequence[MlflowMetric]) -> None:
        global _LINK_WARNED  # noqa: PLW0603 - warn once per process
        if _LINK_WARNED:
            return
        if any(getattr(m, "model_id", None) or getattr(m, "dataset_name", None) for m in metrics):
            _LINK_WARNED = True
            _log.warning(
                "metric points linked to a logged model or dataset are logged to their run"
                " without that link: the sidecar's metric stream carries run, key, value,"
                " timestamp and step only"
            )
