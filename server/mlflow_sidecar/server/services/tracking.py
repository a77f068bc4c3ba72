"""`TrackingService`: the `ExperimentTracking` port over the MLflow gateway."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow_sidecar.client import domain
from mlflow_sidecar.client.domain import (
    DEFAULT_METRIC_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_METRIC_PAGE_SIZE,
    MAX_PAGE_SIZE,
    TERMINAL_RUN_STATUSES,
    ArtifactInfo,
    Experiment,
    FileInfo,
    FlushResult,
    Metric,
    MetricPoint,
    Page,
    Progress,
    Run,
    RunStatus,
    ViewType,
)
from mlflow_sidecar.client.errors import (
    AlreadyExistsError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from mlflow_sidecar.client.paths import check_relative_path
from mlflow_sidecar.client.ports import ExperimentTracking, StrPath
from mlflow_sidecar.client.transfer import file_digest, report
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.keyed_locks import KeyedLocks
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.services.artifacts import (
    artifact_file,
    check_upload_size,
    decode_listing_token,
    encode_listing_token,
    store_file,
)
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.staging import Staging

CLIENT_REQUEST_ID_TAG = "mlflow_sidecar.client_request_id"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
_CLIENT_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TrackingService(ExperimentTracking):
    """Experiment tracking backed by MLflow, with the sidecar's rules on top:
    idempotent StartRun, write-once params, MLflow's batch limits, named-field errors."""

    def __init__(self, gateway: MlflowGateway, ingest: MetricIngest, staging: Staging) -> None:
        self._gateway = gateway
        self._ingest = ingest
        self._staging = staging  # transfer limits and scratch space
        self._start_locks = KeyedLocks()

    # -- experiments --------------------------------------------------------------------

    def create_experiment(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str = "",
        get_if_exists: bool = False,
    ) -> Experiment:
        check.require("name", name)
        check.string_map("tags", tags or {}, max_value_length=check.MAX_TAG_VALUE_LENGTH)
        check.bounded("artifact_location", artifact_location, 4096)
        if get_if_exists:
            try:
                return self._gateway.get_experiment_by_name(name)
            except NotFoundError:
                pass
        try:
            experiment_id = self._gateway.create_experiment(
                name, artifact_location=artifact_location, tags=tags or {}
            )
        except AlreadyExistsError:
            if not get_if_exists:
                raise
            # Another caller created it between our look-up and our create.
            return self._gateway.get_experiment_by_name(name)
        return self._gateway.get_experiment(experiment_id)

    def get_experiment(self, experiment_id: str) -> Experiment:
        check.require("experiment_id", experiment_id, max_length=64)
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
        check.bounded("filter", filter_string, 10_000)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        return self._gateway.search_experiments(
            filter_string=filter_string,
            order_by=order_by,
            page_size=size,
            page_token=check.page_token(page_token),
            view_type=view_type,
        )

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
    ) -> Run:
        check.require("experiment_id", experiment_id, max_length=64)
        check.bounded("run_name", run_name, check.MAX_KEY_LENGTH)
        check.string_map("tags", tags or {}, max_value_length=check.MAX_TAG_VALUE_LENGTH)
        if start_time_ms < 0:
            raise InvalidArgumentError("start_time_ms", "must not be negative")
        all_tags = dict(tags or {})
        if parent_run_id:
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
                f"experiment {experiment_id} is deleted", reason=ErrorReason.EXPERIMENT_NOT_ACTIVE
            )
        if not client_request_id:
            return self._gateway.create_run(
                experiment_id, run_name=run_name, tags=all_tags, start_time_ms=start_time_ms
            )
        check.bounded("client_request_id", client_request_id, check.MAX_CLIENT_REQUEST_ID_LENGTH)
        if not _CLIENT_REQUEST_ID_RE.match(client_request_id):
            raise InvalidArgumentError(
                "client_request_id", "may only contain letters, digits and _ . : -"
            )
        all_tags[CLIENT_REQUEST_ID_TAG] = client_request_id
        # Concurrent duplicates wait here; the first creates, the rest find its run.
        with self._start_locks.hold(client_request_id):
            return self._gateway.find_or_create_run(
                experiment_id,
                run_name=run_name,
                tags=all_tags,
                start_time_ms=start_time_ms,
                key_tag=CLIENT_REQUEST_ID_TAG,
            )

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
            check.require(f"experiment_ids[{index}]", experiment_id, max_length=64)
        check.bounded("filter", filter_string, 10_000)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        return self._gateway.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by,
            page_size=size,
            page_token=check.page_token(page_token),
            view_type=view_type,
        )

    def end_run(
        self, run_id: str, status: RunStatus = RunStatus.FINISHED, *, end_time_ms: int = 0
    ) -> Run:
        check.run_id("run_id", run_id)
        if status not in TERMINAL_RUN_STATUSES:
            raise InvalidArgumentError("status", "must be FINISHED, FAILED or KILLED")
        if end_time_ms < 0:
            raise InvalidArgumentError("end_time_ms", "must not be negative")
        self._require_active(run_id)
        # The run's streamed points go first, so its history is complete once it has ended.
        flushed = self._ingest.flush(run_id)
        if flushed.pending_points:
            raise UnavailableError(
                f"{flushed.pending_points} spooled points of run {run_id} are not in MLflow yet;"
                " the run was not ended, retry EndRun",
                reason=ErrorReason.MLFLOW_UNAVAILABLE,
                metadata={"pending_points": str(flushed.pending_points)},
            )
        self._gateway.set_terminated(run_id, status, end_time_ms or _now_ms())
        self._ingest.mark_ended(run_id, status.value)
        return self._gateway.get_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        check.run_id("run_id", run_id)
        check.string_map("params", params, max_value_length=check.MAX_PARAM_VALUE_LENGTH)
        if not params:
            return
        run = self._require_active(run_id)
        for k, v in params.items():
            if k in run.params and run.params[k] != v:
                raise FailedPreconditionError(
                    f"param {k!r} of run {run_id} is already {run.params[k]!r}; params are"
                    f" write-once, so {v!r} is refused",
                    reason=ErrorReason.PARAM_VALUE_CHANGED,
                    metadata={"key": k},
                )
        new = [(k, v) for k, v in params.items() if k not in run.params]
        for batch in check.chunks(new, check.MAX_PARAMS_TAGS_PER_BATCH):
            self._gateway.log_batch(run_id, params=dict(batch))

    def log_metrics(self, run_id: str, metrics: Sequence[Metric]) -> int:
        check.run_id("run_id", run_id)
        check.metric_points("metrics", ((m.key, m.timestamp_ms) for m in metrics))
        if not metrics:
            return 0
        now = _now_ms()
        stamped = [m if m.timestamp_ms else Metric(m.key, m.value, now, m.step) for m in metrics]
        for batch in check.chunks(stamped, check.MAX_METRICS_PER_BATCH):
            self._gateway.log_batch(run_id, metrics=batch)
        return len(stamped)

    def enqueue_metrics(self, points: Sequence[MetricPoint]) -> int:
        return self._ingest.accept(points)

    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        return self._ingest.flush(run_id, timeout_s)

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        check.run_id("run_id", run_id)
        check.string_map("tags", tags, max_value_length=check.MAX_TAG_VALUE_LENGTH)
        items = list(tags.items())
        for batch in check.chunks(items, check.MAX_PARAMS_TAGS_PER_BATCH):
            self._gateway.log_batch(run_id, tags=dict(batch))

    def delete_run_tag(self, run_id: str, key: str) -> None:
        check.run_id("run_id", run_id)
        check.key("key", key)
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
        return self._gateway.get_metric_history(
            run_id, key, page_size=size, page_token=check.page_token(page_token)
        )

    # -- artifacts ----------------------------------------------------------------------

    def upload_artifact(
        self,
        run_id: str,
        local_path: StrPath,
        artifact_path: str = "",
        *,
        progress: Progress | None = None,
    ) -> ArtifactInfo:
        check.run_id("run_id", run_id)
        source = Path(local_path)
        if not source.is_file():
            raise InvalidArgumentError("local_path", f"{source} is not a file")
        target = check_relative_path("artifact_path", artifact_path or source.name)
        size, sha256 = file_digest(source, self._staging.chunk_bytes)
        check_upload_size("local_path", size, self._staging.max_upload_bytes)
        self._require_active(run_id)
        report(progress, 0, size)
        store_file(self._gateway, self._staging, run_id, source, target)
        report(progress, size, size)
        return ArtifactInfo(path=target, size_bytes=size, sha256=sha256)

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
        after = decode_listing_token(page_token, path)
        # MLflow lists a directory in one piece; the pages are cut here, in path order.
        entries = sorted(self._gateway.list_artifacts(run_id, path), key=lambda e: e.path)
        remaining = [e for e in entries if e.path > after] if after else entries
        page = tuple(remaining[:size])
        more = len(remaining) > size
        return Page(page, encode_listing_token(path, page[-1].path) if more else "")

    def download_artifact(
        self,
        run_id: str,
        artifact_path: str,
        dst_dir: StrPath,
        *,
        progress: Progress | None = None,
    ) -> Path:
        check.run_id("run_id", run_id)
        entry = artifact_file(self._gateway, run_id, artifact_path)
        destination = Path(dst_dir)
        destination.mkdir(parents=True, exist_ok=True)
        report(progress, 0, entry.size_bytes)
        local = self._gateway.download_artifact(run_id, artifact_path, destination)
        size = local.stat().st_size
        report(progress, size, size)
        return local

    def _require_active(self, run_id: str) -> Run:
        run = self._gateway.get_run(run_id)
        if run.info.lifecycle_stage is domain.LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
            )
        return run
