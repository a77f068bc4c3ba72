"""`MlflowGateway`: every MLflow call, with retries bounded by the RPC's deadline."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import backoff
from mlflow.entities import LifecycleStage, Param, RunTag, ViewType
from mlflow.entities import Metric as MlflowMetric
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from mlflow_sidecar.core import domain, limits
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.config import ENV_PREFIX, AppConfig, RetryConfig
from mlflow_sidecar.server.idempotency.ledger import (
    DUPLICATE_OF_TAG,
    RENAME_REQUEST_ID_TAG,
    REQUEST_ID_TAG,
    request_id_reused,
)
from mlflow_sidecar.server.idempotency.versions import check_same_version_request
from mlflow_sidecar.server.mlflow_gateway import (
    artifact_streams,
    embedded_store,
    entities,
    metric_history,
    mlflow_internals,
    page_tokens,
    registration,
    search_terms,
)
from mlflow_sidecar.server.mlflow_gateway.artifact_streams import StreamedUpload
from mlflow_sidecar.server.mlflow_gateway.environment import (
    MlflowSettingError,
    NotMlflowError,
    configure_mlflow_environment,
)
from mlflow_sidecar.server.mlflow_gateway.errors import (
    is_transient,
    search_field,
    to_domain_error,
)
from mlflow_sidecar.server.mlflow_gateway.late_writes import SAVED_CHECKS_NAME, LateWriteChecks
from mlflow_sidecar.server.mlflow_gateway.port import MlflowPort, StreamedDownload
from mlflow_sidecar.server.mlflow_gateway.search_terms import SearchGrammar, check_fields_distinct
from mlflow_sidecar.server.mlflow_gateway.sources import (
    check_source_alias,
    models_source,
    name_filter,
    quotable,
    quoted,
    runs_source_run_id,
)
from mlflow_sidecar.server.mlflow_gateway.storage_policy import (
    StoragePolicy,
    check_uri_syntax,
    is_reference,
)
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.redaction import redact

T = TypeVar("T")

log = logging.getLogger(__name__)

# Answer a little before the caller's deadline so the answer can still reach it.
_DEADLINE_MARGIN_S = 0.05

# MLflow's default experiment, which every tracking server has and MLflow never deletes.
DEFAULT_EXPERIMENT_ID = "0"
# Run ids whose artifact location was checked; MLflow never moves a run's artifacts.
_RUN_LOCATION_CACHE = 4096
# The starts of MLflow's messages for a models:/ URI that names no version, or is malformed.
_NO_VERSIONS = "No versions of model"
_IMPROPER_URI = "Not a proper models:/ URI"

# runs:/ and models:/ URIs may point at each other; deeper than this is refused.
_MAX_REFERENCE_DEPTH = 4
# Versions asked for at once when the sidecar looks through all of a model's versions.
_SEARCH_PAGE = 1000


_VIEW_TYPES = {
    domain.ViewType.ACTIVE_ONLY: ViewType.ACTIVE_ONLY,
    domain.ViewType.DELETED_ONLY: ViewType.DELETED_ONLY,
    domain.ViewType.ALL: ViewType.ALL,
}


def _already_exists(exc: MlflowException) -> bool:
    """MLflow refused a create because the name is taken."""
    return bool(exc.error_code == "RESOURCE_ALREADY_EXISTS")


def _missing(exc: MlflowException) -> bool:
    """MLflow found no such entity (or none in the lifecycle stage it looked in)."""
    return bool(exc.error_code == "RESOURCE_DOES_NOT_EXIST")


# Second runs of one request id that a lookup by the id passes over, at most: one per try
# of its call that landed late, and one per other sidecar that served it at once.
_DUPLICATES_PASSED_OVER = 20


def _tag_filter(key: str, value: str) -> str:
    """`tags.key = 'value'` for a sidecar tag; the value is a checked request id."""
    return f"tags.`{key}` = {quoted(value)}"


class _TransientError(Exception):
    """Wraps a retryable failure for `backoff`."""

    def __init__(self, error: SidecarError) -> None:
        super().__init__(error.message)
        self.error = error
        # Set when the retries ended because the call's deadline left no time for another.
        self.out_of_time = False


class MlflowGateway:
    """The sidecar's only door to MLflow. Thread-safe: MlflowClient is, and so is this.

    Building one has no side effect; `open()` prepares MLflow (its environment, the
    embedded store) and must come first."""

    def __init__(self, config: AppConfig, metrics: SidecarMetrics | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self._opened: MlflowClient | None = None
        self._opening = threading.Lock()
        self._retrying = self._build_retrying(config.retry)
        self.tracking_uri = config.tracking_uri
        self.registry_uri = config.registry_uri
        self._storage = StoragePolicy(
            allowed_roots=config.allowed_roots,
            allowed_uris=config.artifacts.allowed_uris,
            tracking_uri=config.tracking_uri,
            discover_root=self._default_artifact_root,
        )
        self._checked_runs: dict[str, str] = {}
        self.late_writes = LateWriteChecks(
            config.mlflow.request_timeout_s,
            self._count_late_removed,
            saved_at=config.data_dir / SAVED_CHECKS_NAME,
        )
        self.late_writes.handle("run", self._remove_late_runs)
        self.late_writes.handle("model_version", self._remove_late_versions)

    def _count_late_removed(self, kind: str, removed: int) -> None:
        if self._metrics is not None:
            self._metrics.late_creates_removed.labels(kind).inc(removed)

    def open(self) -> None:
        """Prepare MLflow for this process, once: set the environment MLflow's client reads
        (process-wide), settle its request header providers, create the embedded store
        when it is missing (EmbeddedStoreError when it cannot be used) and connect.

        Idempotent; the server's start-up calls it before it serves."""
        with self._opening:
            if self._opened is not None:
                return
            config = self._config
            configure_mlflow_environment(config)
            if config.embedded:
                embedded_store.prepare(config.data_dir, config.artifact_root)
            try:
                client = MlflowClient(
                    tracking_uri=config.tracking_uri, registry_uri=config.registry_uri
                )
            except MlflowException as exc:
                raise _unusable_uri(config, exc, registry=False) from exc
            try:
                mlflow_internals.build_registry_client(client)
            except MlflowException as exc:
                raise _unusable_uri(config, exc, registry=True) from exc
            self._opened = client

    @property
    def client(self) -> MlflowClient:
        """The MlflowClient of the opened gateway, for the package's other adapters, which
        go through `call` for retries and error mapping."""
        return self._client

    @property
    def _client(self) -> MlflowClient:
        client = self._opened
        if client is None:
            raise RuntimeError("MlflowGateway.open() must be called before the gateway is used")
        return client

    # -- plumbing ---------------------------------------------------------------------

    def _build_retrying(self, retry: RetryConfig) -> Callable[[Callable[[], Any]], Any]:
        def max_time() -> float:
            left = call_deadline.remaining()
            if left is None:
                return retry.max_time_s
            return max(0.0, min(retry.max_time_s, left - _DEADLINE_MARGIN_S))

        def on_backoff(details: Any) -> None:
            if self._metrics is not None:
                self._metrics.mlflow_retries.inc()
            log.warning(
                "MLflow call failed (try %d, %.2fs elapsed), retrying in %.2fs: %s",
                details["tries"],
                details["elapsed"],
                details["wait"],
                details["exception"],
            )

        def on_giveup(details: Any) -> None:
            # backoff times its tries with the wall clock, the deadline runs on the monotonic
            # one: whether the deadline ended the retries is decided here, not by comparing
            # the two clocks afterwards.
            left = call_deadline.remaining()
            if (
                left is not None
                and details["tries"] < retry.max_tries
                and left - _DEADLINE_MARGIN_S < retry.max_time_s
            ):
                details["exception"].out_of_time = True

        @backoff.on_exception(
            backoff.expo,
            _TransientError,
            max_tries=retry.max_tries,
            max_time=max_time,
            on_giveup=on_giveup,
            factor=retry.factor_s,
            max_value=retry.max_backoff_s,
            jitter=backoff.full_jitter if retry.jitter else None,
            on_backoff=on_backoff,
            logger=None,
        )
        def attempt(op: Callable[[], Any]) -> Any:
            if call_deadline.expired():
                raise DeadlineExceededError("deadline exceeded before MLflow answered")
            try:
                return op()
            except Exception as exc:
                error = to_domain_error(exc)
                if isinstance(error, UnavailableError):
                    raise _TransientError(error) from exc
                raise error from exc

        return attempt

    def call(
        self,
        op: Callable[[], T],
        *,
        retry: bool = True,
        not_found: ErrorReason | None = None,
        invalid_field: str = "",
    ) -> T:
        """Run one MLflow operation, retrying transient failures unless `retry` is False.

        Non-idempotent creates pass `retry=False`; their callers decide how to recover.
        `not_found` is the reason of MLflow's "does not exist" for this operation (MLflow's
        code says only that something is missing; the caller knows what it asked for).
        `invalid_field` names the request field an INVALID_ARGUMENT of MLflow is about, for
        operations whose only free input is that field (MLflow names no field).
        """
        started = time.perf_counter()
        outcome = "error"
        try:
            result = self._call(op, retry=retry)
            outcome = "ok"
            return result
        except NotFoundError as exc:
            if not_found is not None and exc.reason == ErrorReason.NOT_FOUND:
                exc.reason = not_found
            raise
        except InvalidArgumentError as exc:
            if not invalid_field or exc.field:
                raise
            raise InvalidArgumentError(
                invalid_field, exc.problem, reason=exc.reason, metadata=exc.metadata
            ) from exc
        finally:
            self._observe(outcome, time.perf_counter() - started)

    def call_once(self, attempt: Callable[[bool], T], *, not_found: ErrorReason | None = None) -> T:
        """Run a write that must take effect once, retried like `call`.

        `attempt(ambiguous)` is told whether an earlier attempt of this call failed in a
        way that may have taken effect all the same (a timeout, a lost answer, a 5xx), so
        that it looks for that effect before acting again."""
        ambiguous = False

        def op() -> T:
            nonlocal ambiguous
            try:
                return attempt(ambiguous)
            except Exception as exc:
                if isinstance(to_domain_error(exc), UnavailableError):
                    ambiguous = True
                raise

        return self.call(op, not_found=not_found)

    def _observe(self, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.mlflow_seconds.labels(outcome).observe(seconds)

    def _call(self, op: Callable[[], T], *, retry: bool) -> T:
        try:
            if retry:
                result: T = self._retrying(op)
                return result
            try:
                return op()
            except Exception as exc:
                raise to_domain_error(exc) from exc
        except _TransientError as exc:
            if exc.out_of_time or call_deadline.expired():
                raise DeadlineExceededError(
                    # The message says what was unavailable: MLflow or its artifact store.
                    f"deadline exceeded while retrying: {exc.error.message}"
                ) from exc
            raise exc.error from exc

    # -- where bytes may go --------------------------------------------------------------

    def _default_artifact_root(self) -> str | None:
        """The tracking server's default artifact root: where its default experiment
        (id 0, which MLflow never deletes) keeps artifacts, one level up."""
        try:
            location = self.call(
                lambda: self._client.get_experiment(DEFAULT_EXPERIMENT_ID)
            ).artifact_location
        except NotFoundError:
            return None
        return str(location).rstrip("/").rpartition("/")[0] or None

    def run_artifact_uri(self, run_id: str, field: str = "run_id") -> str:
        """The run's artifact location, once it is known to be allowed: PERMISSION_DENIED
        (reason PATH_OUTSIDE_ROOTS, naming `field`) for a run whose artifacts live elsewhere."""
        known = self._checked_runs.get(run_id)
        uri = known if known is not None else self.get_run(run_id).info.artifact_uri
        # Checked at every use, the location only kept: a link swapped in since the last
        # use may lead out of the allowed roots.
        self._storage.check(field, uri)
        if known is None:
            if len(self._checked_runs) >= _RUN_LOCATION_CACHE:
                self._checked_runs.clear()
            self._checked_runs[run_id] = uri
        return uri

    def check_storage(self, field: str, uri: str) -> str:
        """`uri` once the storage policy allows it: PERMISSION_DENIED (reason
        PATH_OUTSIDE_ROOTS, naming `field`) for a location outside the configured stores."""
        self._storage.check(field, uri)
        return uri

    def _storage_uri(self, field: str, uri: str) -> str:
        """The storage location a source names: `runs:/` and `models:/` URIs resolved to
        where their bytes are, checked against the storage policy."""
        for _ in range(_MAX_REFERENCE_DEPTH):
            check_uri_syntax(field, uri)
            scheme, _, rest = uri.partition(":")
            if scheme.lower() == "runs":
                run_id, _, path = rest.lstrip("/").partition("/")
                base = self.run_artifact_uri(run_id, field)
                if not path.strip("/"):
                    return base
                # The sub-path too: a symlink in the run's artifacts may lead out of them.
                return self.check_storage(field, f"{base.rstrip('/')}/{path}")
            if scheme.lower() == "models":
                uri = self._model_download_uri(uri, field)
                continue
            self._storage.check(field, uri)
            return uri
        raise InvalidArgumentError(field, "refers to other models:/ or runs:/ URIs too deeply")

    def _model_download_uri(self, uri: str, field: str) -> str:
        """Where the model a `models:/` URI names keeps its files (a registered version by
        number, alias or stage, or an MLflow 3 logged model), plus the URI's sub-path."""
        base, sub_path = mlflow_internals.split_models_uri(uri)

        def op() -> str:
            try:
                found = mlflow_internals.model_name_and_version(self._client, base)
            except MlflowException as exc:
                # MLflow's URI parsing fails these with no error code (an INTERNAL_ERROR):
                # the caller's URI is at fault, or names no version.
                if exc.message.startswith(_NO_VERSIONS):
                    raise NotFoundError(
                        exc.message, reason=ErrorReason.MODEL_VERSION_NOT_FOUND
                    ) from exc
                if exc.message.startswith(_IMPROPER_URI):
                    raise InvalidArgumentError(field, exc.message) from exc
                raise
            if len(found) == 1:
                return self._logged_model_location(found[0])
            name, version = found
            return str(self._client.get_model_version_download_uri(name, str(version)))

        location = self.call(op, not_found=ErrorReason.MODEL_VERSION_NOT_FOUND)
        return f"{location.rstrip('/')}/{sub_path}" if sub_path.strip("/") else location

    def _logged_model_location(self, model_id: str) -> str:
        """Where a logged model keeps its files; NotFoundError (LOGGED_MODEL_NOT_FOUND)
        when MLflow has no such model: it is no version that is missing."""
        try:
            return str(self._client.get_logged_model(model_id).artifact_location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # Mapped as every MLflow refusal is (MLflow's own code in its metadata).
            error = to_domain_error(exc)
            error.reason = ErrorReason.LOGGED_MODEL_NOT_FOUND
            raise error from exc

    def ping(self, *, retry: bool = True) -> None:
        """One cheap call; raises UnavailableError when MLflow cannot be reached, and
        NotMlflowError when what answers is no MLflow tracking server.

        `retry=False` makes one try only, for a probe that asks again on its own."""
        try:
            answered = self.call(
                lambda: str(self._client.get_experiment(DEFAULT_EXPERIMENT_ID).experiment_id),
                retry=retry,
            )
        except (NotFoundError, PermissionDeniedError):
            return  # MLflow's own refusal: a tracking server answered
        if answered != DEFAULT_EXPERIMENT_ID:
            # A wrong address whose server answers every request 200 with an empty (or
            # `{}`) body would take each write and keep none, and MLflow's client reads
            # such an answer as success: what answers must show MLflow's default experiment.
            raise NotMlflowError(
                f"mlflow.tracking_uri {redact(self.tracking_uri)} answers as no MLflow"
                f" tracking server: asked for MLflow's default experiment (id"
                f" {DEFAULT_EXPERIMENT_ID}), it answered OK without it ({answered!r} as its"
                " id); check the address (host, port and path prefix)"
            )

    # -- experiments ------------------------------------------------------------------

    def create_experiment(
        self, name: str, *, artifact_location: str, tags: Mapping[str, str], request_id: str
    ) -> str:
        """Create an experiment tagged with `request_id`; returns its id.

        Each try first looks for the experiment of that request id, so a retry after a
        lost answer (an MLflow timeout after the write) returns the first try's experiment
        instead of making a second or failing with ALREADY_EXISTS."""
        if artifact_location:
            check_uri_syntax("artifact_location", artifact_location)
            if is_reference(artifact_location):
                raise InvalidArgumentError(
                    "artifact_location", "must be a storage location, not a runs:/ or models:/ URI"
                )
            self._storage.check("artifact_location", artifact_location)
        all_tags = {**tags, REQUEST_ID_TAG: request_id}

        def of_this_request() -> str | None:
            found = self._client.search_experiments(
                view_type=ViewType.ALL,
                max_results=1,
                filter_string=_tag_filter(REQUEST_ID_TAG, request_id),
            )
            if not found:
                return None
            # Made by another call that used the same id (a ledger that has forgotten
            # it, another sidecar's): never answered as this call's.
            if found[0].name != name:
                raise request_id_reused("request_id", request_id, "CreateExperiment")
            return str(found[0].experiment_id)

        def attempt(_ambiguous: bool) -> str:
            found = of_this_request()
            if found is not None:
                return found
            try:
                return str(
                    self._client.create_experiment(
                        name, artifact_location=artifact_location or None, tags=all_tags
                    )
                )
            except MlflowException as exc:
                # Another sidecar may have served this request at the same moment.
                raced = of_this_request() if _already_exists(exc) else None
                if raced is None:
                    raise
                return raced

        return self.call_once(attempt)

    def get_experiment(self, experiment_id: str) -> domain.Experiment:
        """The experiment with this id."""
        return entities.experiment(
            self.call(
                lambda: self._client.get_experiment(experiment_id),
                not_found=ErrorReason.EXPERIMENT_NOT_FOUND,
                invalid_field="experiment_id",
            )
        )

    def get_experiment_by_name(self, name: str) -> domain.Experiment:
        """The experiment with this name; NotFoundError when there is none."""
        exp = self.call(lambda: self._client.get_experiment_by_name(name))
        if exp is None:
            raise NotFoundError(
                f"experiment {name!r} does not exist", reason=ErrorReason.EXPERIMENT_NOT_FOUND
            )
        return entities.experiment(exp)

    def search_experiments(
        self,
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_size: int,
        page_token: str,
        view_type: domain.ViewType,
    ) -> domain.Page[domain.Experiment]:
        """One page of experiments."""
        search_terms.check_filter_reads(search_terms.EXPERIMENTS, filter_string)
        search_terms.check_joins(search_terms.EXPERIMENTS, filter_string, order_by)
        kind = page_tokens.of_query("experiments", filter_string, order_by, view_type.value)
        mlflow_token = page_tokens.to_mlflow(kind, page_token)
        paged = self.call_search(
            lambda: self._client.search_experiments(
                view_type=_VIEW_TYPES[view_type],
                max_results=page_size,
                filter_string=filter_string or None,
                order_by=list(order_by) or None,
                page_token=mlflow_token,
            ),
            filter_string=filter_string,
            order_by=order_by,
            page_token=page_token,
            grammar=search_terms.EXPERIMENTS,
        )
        return domain.Page(
            tuple(entities.experiment(e) for e in paged),
            page_tokens.from_mlflow(kind, paged.token),
        )

    def delete_experiment(self, experiment_id: str) -> None:
        """Soft-delete an experiment and its runs; an already deleted one stays as it is.

        MLflow refuses to delete a deleted experiment, so a retry after a lost answer
        would fail: the whole look-then-delete is what is retried."""

        def op() -> None:
            found = self._client.get_experiment(experiment_id)
            if found.lifecycle_stage == LifecycleStage.DELETED:
                return
            try:
                self._client.delete_experiment(experiment_id)
            except MlflowException as exc:
                # MLflow looks for an active experiment to delete: one a concurrent call
                # deleted since the look above reads as missing, and deleted is what both
                # asked for.
                if not _missing(exc) or not self._experiment_deleted(experiment_id):
                    raise

        self.call(op, not_found=ErrorReason.EXPERIMENT_NOT_FOUND, invalid_field="experiment_id")

    def _experiment_deleted(self, experiment_id: str) -> bool:
        """Whether MLflow has this experiment, deleted."""
        found = self._client.get_experiment(experiment_id)
        return bool(found.lifecycle_stage == LifecycleStage.DELETED)

    def restore_experiment(self, experiment_id: str) -> domain.Experiment:
        """Restore a deleted experiment and its runs; an active one is returned as it is."""

        def op() -> Any:
            found = self._client.get_experiment(experiment_id)
            if found.lifecycle_stage != LifecycleStage.DELETED:
                return found
            try:
                self._client.restore_experiment(experiment_id)
            except MlflowException as exc:
                # MLflow looks for a deleted experiment to restore: one a concurrent call
                # restored since the look above reads as missing, and active is what both
                # asked for.
                if not _missing(exc) or self._experiment_deleted(experiment_id):
                    raise
            return self._client.get_experiment(experiment_id)

        return entities.experiment(
            self.call(op, not_found=ErrorReason.EXPERIMENT_NOT_FOUND, invalid_field="experiment_id")
        )

    # -- runs -------------------------------------------------------------------------

    def find_or_create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        start_time_ms: int,
        key_tag: str,
        also_tagged: tuple[str, str] | None = None,
    ) -> domain.Run:
        """The run of `experiment_id` tagged `key_tag` = `tags[key_tag]` (or, made by an
        older sidecar, tagged `also_tagged`'s tag = value), created if missing.

        Safe to retry as a whole: a retry after a lost answer finds the first attempt's run.
        """

        key = tags[key_tag]

        def first_made(tag: str = key_tag, wanted: str = key) -> Any | None:
            found = self._client.search_runs(
                [experiment_id],
                filter_string=_tag_filter(tag, wanted),
                run_view_type=ViewType.ALL,
                max_results=_DUPLICATES_PASSED_OVER + 1,
                # The earliest, run id breaking ties: every sidecar picks the same one.
                order_by=["attributes.start_time ASC"],
            )
            return next((r for r in found if DUPLICATE_OF_TAG not in r.data.tags), None)

        def attempt(ambiguous: bool) -> Any:
            found = first_made()
            if found is None and also_tagged is not None:
                found = first_made(*also_tagged)
            if found is None:
                found = create()
            if ambiguous:
                answered = found.info.run_id
                self.late_writes.schedule(
                    "run",
                    f"run {answered}",
                    {
                        "experiment_id": experiment_id,
                        "key_tag": key_tag,
                        "key": key,
                        "answered": answered,
                    },
                )
            return found

        def create() -> Any:
            created = self._client.create_run(
                experiment_id,
                start_time=start_time_ms or None,
                tags=dict(tags),
                run_name=run_name or None,
            )
            # Another sidecar serving the same request at the same moment may have made
            # one too: the earlier run is the request's, and the later one goes.
            first = first_made()
            if first is not None and first.info.run_id != created.info.run_id:
                self._remove_duplicate_run(created.info.run_id, first.info.run_id)
                return first
            return created

        return entities.run(self.call_once(attempt, not_found=ErrorReason.EXPERIMENT_NOT_FOUND))

    def _remove_duplicate_run(self, run_id: str, answered: str) -> None:
        """Delete a second run of one request id, tagged with the run the request answered
        with, so that a lookup by request id passes over it."""
        self._client.set_tag(run_id, DUPLICATE_OF_TAG, answered)
        self._client.delete_run(run_id)

    def _remove_late_runs(self, experiment_id: str, key_tag: str, key: str, answered: str) -> int:
        """Remove the runs of this request id other than the one it answered with; returns
        how many. Run in the background, with the gateway's retries."""

        def op() -> int:
            found = self._client.search_runs(
                [experiment_id],
                filter_string=_tag_filter(key_tag, key),
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=_DUPLICATES_PASSED_OVER + 1,
            )
            late = [r.info.run_id for r in found if r.info.run_id != answered]
            for run_id in late:
                self._remove_duplicate_run(run_id, answered)
            return len(late)

        return self.call(op)

    def get_run(self, run_id: str) -> domain.Run:
        """The run with this id."""
        return entities.run(
            self.call(
                lambda: self._client.get_run(run_id),
                not_found=ErrorReason.RUN_NOT_FOUND,
                invalid_field="run_id",
            )
        )

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_size: int,
        page_token: str,
        view_type: domain.ViewType,
    ) -> domain.Page[domain.Run]:
        """One page of runs."""
        check_fields_distinct(order_by, search_terms.RUNS.order_field)
        search_terms.check_filter_reads(search_terms.RUNS, filter_string)
        search_terms.check_joins(search_terms.RUNS, filter_string, order_by)
        kind = page_tokens.of_query(
            "runs", experiment_ids, filter_string, order_by, view_type.value
        )
        mlflow_token = page_tokens.to_mlflow(kind, page_token)
        paged = self.call_search(
            lambda: self._client.search_runs(
                list(experiment_ids),
                filter_string=filter_string,
                run_view_type=_VIEW_TYPES[view_type],
                max_results=page_size,
                order_by=list(order_by) or None,
                page_token=mlflow_token,
            ),
            filter_string=filter_string,
            order_by=order_by,
            page_token=page_token,
            grammar=search_terms.RUNS,
            experiment_ids=experiment_ids,
        )
        return domain.Page(
            tuple(entities.run(r) for r in paged), page_tokens.from_mlflow(kind, paged.token)
        )

    def delete_run(self, run_id: str) -> None:
        """Soft-delete a run; a deleted one stays as it is (its deletion time too)."""

        def op() -> None:
            if self._client.get_run(run_id).info.lifecycle_stage != LifecycleStage.DELETED:
                self._client.delete_run(run_id)

        self.call(op, not_found=ErrorReason.RUN_NOT_FOUND, invalid_field="run_id")

    def restore_run(self, run_id: str) -> domain.Run:
        """Restore a deleted run; an active one is returned as it is."""

        def op() -> Any:
            found = self._client.get_run(run_id)
            if found.info.lifecycle_stage != LifecycleStage.DELETED:
                return found
            self._client.restore_run(run_id)
            return self._client.get_run(run_id)

        return entities.run(
            self.call(op, not_found=ErrorReason.RUN_NOT_FOUND, invalid_field="run_id")
        )

    def set_terminated(self, run_id: str, status: domain.RunStatus, end_time_ms: int) -> None:
        """Mark a run ended with a terminal status."""
        self.call(
            lambda: self._client.set_terminated(
                run_id, status=status.value, end_time=end_time_ms or None
            ),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        """`set_terminated` for a status by name (the spool's record of an end)."""
        self.set_terminated(run_id, domain.RunStatus(status), end_time_ms)

    def set_running(self, run_id: str) -> None:
        """Set a run back to RUNNING, keeping its end time (as `start_run(run_id=...)`)."""
        self.call(
            lambda: self._client.update_run(run_id, status=domain.RunStatus.RUNNING.value),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[domain.Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> None:
        """One MLflow `log_batch` (callers respect MLflow's per-batch limits).

        Retried unless `retry` is False: MLflow's SQL stores ignore exact duplicate metric
        points and equal params.
        """
        mlflow_metrics = [MlflowMetric(m.key, m.value, m.timestamp_ms, m.step) for m in metrics]
        mlflow_params = [Param(k, v) for k, v in (params or {}).items()]
        mlflow_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        self.call(
            lambda: self._client.log_batch(
                run_id,
                metrics=mlflow_metrics,
                params=mlflow_params,
                tags=mlflow_tags,
                synchronous=True,
            ),
            retry=retry,
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    def log_metrics(
        self, run_id: str, metrics: Sequence[domain.Metric], *, retry: bool = True
    ) -> None:
        """One `log_batch` of metric points (at most MLflow's 1000); one try only unless
        `retry`.

        To a tracking server the body is built from the points themselves, the same JSON
        MLflow's client would send (the deliverer's CPU per batch is mostly that body)."""
        store = mlflow_internals.rest_store(self._client)
        if store is None or len(metrics) > limits.MAX_METRICS_PER_BATCH:
            self.log_batch(run_id, metrics=metrics, retry=retry)
            return
        body = mlflow_internals.log_batch_metrics_json(
            run_id, [(m.key, m.value, m.timestamp_ms, m.step) for m in metrics]
        )
        self.call(
            lambda: mlflow_internals.post_log_batch(store, body),
            retry=retry,
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    def delete_tag(self, run_id: str, key: str) -> None:
        """Delete one run tag."""
        self._delete_tag(
            lambda: self._client.delete_tag(run_id, key),
            lambda: self._client.get_run(run_id),
            ErrorReason.RUN_NOT_FOUND,
        )

    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int, page_token: str
    ) -> domain.Page[domain.Metric]:
        """One page of a metric's points, ordered by step, then timestamp (see
        `metric_history`)."""
        metric_history.check_token(page_token, run_id, key)
        history = self.call(
            lambda: self._client.get_metric_history(run_id, key),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )
        return metric_history.page(
            (entities.metric(m) for m in history),
            run_id,
            key,
            page_size=page_size,
            page_token=page_token,
        )

    # -- model registry -----------------------------------------------------------------

    def create_registered_model(
        self, name: str, *, description: str, tags: Mapping[str, str], request_id: str
    ) -> domain.RegisteredModel:
        """Create a registered model tagged with `request_id`.

        A retry after a lost answer finds the model of that name carrying this request id
        and returns it; a model of that name made by another request is ALREADY_EXISTS."""
        all_tags = {**tags, REQUEST_ID_TAG: request_id}

        def of_this_request() -> Any:
            """The model of that name if this request made it; None if there is none."""
            try:
                existing = self._client.get_registered_model(name)
            except MlflowException as exc:
                if not isinstance(to_domain_error(exc), NotFoundError):
                    raise
                return None
            if existing.tags.get(REQUEST_ID_TAG) == request_id:
                return existing
            raise AlreadyExistsError(f"registered model {name!r} already exists")

        def made_under_another_name() -> bool:
            """Whether another model carries this request id: another call's, made by a
            sidecar whose ledger did not know the id (or has forgotten it)."""
            found = self._client.search_registered_models(
                filter_string=_tag_filter(REQUEST_ID_TAG, request_id), max_results=1
            )
            return any(model.name != name for model in found)

        def attempt(_ambiguous: bool) -> Any:
            existing = of_this_request()
            if existing is not None:
                return existing
            if made_under_another_name():
                raise request_id_reused("request_id", request_id, "CreateRegisteredModel")
            try:
                return self._client.create_registered_model(
                    name, tags=all_tags, description=description or None
                )
            except MlflowException as exc:
                # Another sidecar may have served this request at the same moment.
                raced = of_this_request() if _already_exists(exc) else None
                if raced is None:
                    raise
                return raced

        return entities.registered_model(self.call_once(attempt))

    def get_registered_model(self, name: str, *, retry: bool = True) -> domain.RegisteredModel:
        """The registered model of this name."""
        return entities.registered_model(
            self.call(
                lambda: self._client.get_registered_model(name),
                retry=retry,
                not_found=ErrorReason.MODEL_NOT_FOUND,
            )
        )

    def call_search(
        self,
        op: Callable[[], T],
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_token: str,
        grammar: SearchGrammar | None = None,
        experiment_ids: Sequence[str] = (),
        order_term_field: str = "",
    ) -> T:
        """Run a search; an invalid-argument answer names the request field it is about:
        the part MLflow's own parsing refuses (`grammar`), else the one its words name.
        `order_term_field` follows an `order_by[i]` whose terms are messages (".field_name")."""
        try:
            return self.call(op)
        except InvalidArgumentError as exc:
            if exc.field:
                raise
            field = search_terms.refused_part(
                grammar, filter_string, order_by, experiment_ids, exc.message
            ) or search_field(exc.message, filter_string, order_by, page_token)
            if field.startswith("order_by["):
                field += order_term_field
            reason = ErrorReason.INVALID_PAGE_TOKEN if field == "page_token" else exc.reason
            raise InvalidArgumentError(
                field, exc.message, reason=reason, metadata=exc.metadata
            ) from exc

    def search_registered_models(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.RegisteredModel]:
        """One page of registered models."""
        search_terms.check_filter_reads(search_terms.REGISTERED_MODELS, filter_string)
        check_fields_distinct(order_by, search_terms.REGISTERED_MODELS.order_field)
        kind = page_tokens.of_query("registered-models", filter_string, order_by)
        mlflow_token = page_tokens.to_mlflow(kind, page_token)
        paged = self.call_search(
            lambda: self._client.search_registered_models(
                filter_string=filter_string or None,
                max_results=page_size,
                order_by=list(order_by) or None,
                page_token=mlflow_token,
            ),
            filter_string=filter_string,
            order_by=order_by,
            page_token=page_token,
            grammar=search_terms.REGISTERED_MODELS,
        )
        return domain.Page(
            tuple(entities.registered_model(m) for m in paged),
            page_tokens.from_mlflow(kind, paged.token),
        )

    def update_registered_model(self, name: str, description: str) -> domain.RegisteredModel:
        """Replace a registered model's description."""
        self.call(
            lambda: self._client.update_registered_model(name, description=description),
            not_found=ErrorReason.MODEL_NOT_FOUND,
        )
        return self.get_registered_model(name)

    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str
    ) -> domain.RegisteredModel:
        """Rename a registered model, once.

        The model is tagged with the request id first; a retry that no longer finds the
        old name (the first try renamed it, and its answer got lost) finds the new name
        carrying the tag and reports success, also after a sidecar restart."""

        def attempt(_ambiguous: bool) -> None:
            try:
                self._client.set_registered_model_tag(name, RENAME_REQUEST_ID_TAG, request_id)
                self._client.rename_registered_model(name, new_name)
            except MlflowException as exc:
                if isinstance(to_domain_error(exc), NotFoundError) and self._renamed_by(
                    new_name, request_id
                ):
                    return
                if not is_transient(exc):
                    # Refused for good (the new name is taken): the call has no effect,
                    # so the tag it set first goes again.
                    self._untag_rename(name, request_id)
                raise

        self.call_once(attempt, not_found=ErrorReason.MODEL_NOT_FOUND)
        return self.get_registered_model(new_name)

    def _untag_rename(self, name: str, request_id: str) -> None:
        try:
            if self._renamed_by(name, request_id):
                self._client.delete_registered_model_tag(name, RENAME_REQUEST_ID_TAG)
        except MlflowException as exc:
            log.warning(
                "could not remove the rename tag of a refused rename from model %r: %s",
                name,
                to_domain_error(exc).message,
            )

    def _renamed_by(self, name: str, request_id: str) -> bool:
        try:
            model = self._client.get_registered_model(name)
        except MlflowException:
            return False
        return bool(model.tags.get(RENAME_REQUEST_ID_TAG) == request_id)

    def _delete_once(self, delete: Callable[[], object], not_found: ErrorReason) -> None:
        """A delete, retried: NOT_FOUND after a try that may have taken effect is success."""

        def attempt(ambiguous: bool) -> None:
            try:
                delete()
            except MlflowException as exc:
                if not (ambiguous and isinstance(to_domain_error(exc), NotFoundError)):
                    raise

        self.call_once(attempt, not_found=not_found)

    def _delete_tag(
        self,
        delete: Callable[[], object],
        get_owner: Callable[[], object],
        owner_missing: ErrorReason,
    ) -> None:
        """A tag delete: MLflow says "does not exist" alike for a missing tag and a missing
        run, model or version, so on NOT_FOUND the owner is looked up (on that path only)
        to name which one is missing."""
        try:
            self._delete_once(delete, ErrorReason.TAG_NOT_FOUND)
        except NotFoundError:
            self.call(get_owner, not_found=owner_missing)
            raise

    def delete_registered_model(self, name: str) -> None:
        """Delete a registered model and its versions."""
        self._delete_once(
            lambda: self._client.delete_registered_model(name), ErrorReason.MODEL_NOT_FOUND
        )

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        """Set one tag of a registered model."""
        self.call(
            lambda: self._client.set_registered_model_tag(name, key, value),
            not_found=ErrorReason.MODEL_NOT_FOUND,
        )

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        """Delete one tag of a registered model."""
        self._delete_tag(
            lambda: self._client.delete_registered_model_tag(name, key),
            lambda: self._client.get_registered_model(name),
            ErrorReason.MODEL_NOT_FOUND,
        )

    def create_model_version(
        self,
        name: str,
        *,
        source: str,
        run_id: str,
        description: str,
        tags: Mapping[str, str],
        request_id: str,
    ) -> domain.ModelVersion:
        """Create a version tagged with `request_id` and return it as created, possibly
        still pending registration (the caller waits for READY within its deadline).

        Each try first looks for the version of that request id, so a retry after a lost
        answer returns the first try's version and never registers a second.
        A source outside the configured artifact stores is PERMISSION_DENIED."""
        self._storage_uri("source", source)
        all_tags = {**tags, REQUEST_ID_TAG: request_id}
        # A logged model's own models:/ URI (MLflow 3): the registry links the version to
        # that model, as MLflow's register_model does.
        model_id = mlflow_internals.logged_model_id(source)

        def attempt(ambiguous: bool) -> Any:
            answer = find_or_create()
            if ambiguous:
                self.late_writes.schedule(
                    "model_version",
                    f"version {answer.version} of model {answer.name!r}",
                    {
                        "request_id": request_id,
                        "name": answer.name,
                        "answered": int(answer.version),
                    },
                )
            return answer

        def find_or_create() -> Any:
            found = self._find_version(request_id)
            if found is not None:
                check_same_version_request(
                    entities.model_version(found),
                    field="request_id",
                    request_id=request_id,
                    rpc="CreateModelVersion",
                    name=name,
                    run_id=run_id,
                    description=description,
                    tags=tags,
                    source=None if source.startswith("models:") else source,
                )
                return found
            created = self._client.create_model_version(
                name,
                source,
                run_id=run_id or None,
                tags=all_tags,
                description=description or None,
                await_creation_for=0,
                model_id=model_id,
            )
            # Another sidecar serving the same request at the same moment may have
            # registered one too: the lower version is the request's, the other goes.
            first = self._find_version(request_id)
            if (
                first is not None
                and first.name == created.name
                and int(first.version) < int(created.version)
            ):
                self._client.delete_model_version(created.name, created.version)
                return first
            return created

        return entities.model_version(
            self.call_once(attempt, not_found=ErrorReason.MODEL_NOT_FOUND)
        )

    def resolve_source(self, source: str, run_id: str) -> str:
        """Check what a new version's source names before anything is registered; returns
        the run the version belongs to. MLflow accepts a runs:/ source only together with
        the id of that same run, and would register a models:/ source whose version or
        alias is missing with a vague error, or none at all."""
        check_source_alias(source)
        mlflow_internals.logged_model_id(source)  # a models: URI MLflow cannot read is refused
        if source_run_id := runs_source_run_id(source):
            if run_id and run_id != source_run_id:
                raise InvalidArgumentError(
                    "run_id", f"{run_id!r} is not the run of the source {source!r}"
                )
            run_id = source_run_id
        if origin := models_source(source):
            try:
                if origin.alias:
                    self.get_model_version_by_alias(origin.name, origin.alias)
                else:
                    self._source_version(origin.name, origin.version)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError("source", exc.problem, reason=exc.reason) from None
        if run_id:
            self.get_run(run_id)
        return run_id

    def _source_version(self, name: str, version: int) -> None:
        """Check that a source's version exists. MLflow says only that the version is
        missing, also when its whole model is: one more call, on that failure only, tells
        MODEL_NOT_FOUND from MODEL_VERSION_NOT_FOUND."""
        try:
            self.get_model_version(name, version)
        except NotFoundError as exc:
            if exc.reason != ErrorReason.MODEL_VERSION_NOT_FOUND:
                raise
            self.get_registered_model(name, retry=False)
            raise

    def wait_until_ready(self, version: domain.ModelVersion) -> domain.ModelVersion:
        """The version once it has left PENDING_REGISTRATION (MLflow's limit and the
        call's deadline bound the wait)."""
        return registration.await_ready(version, self.get_model_version)

    def latest_model_version(self, name: str) -> domain.ModelVersion:
        """The version with the highest number."""
        if not quotable(name):
            return self._latest_of_model(name)
        found = self.call(
            lambda: self._client.search_model_versions(
                filter_string=name_filter(name),
                max_results=1,
                order_by=["version_number DESC"],
            )
        )
        if not found:
            self.get_registered_model(name)  # NOT_FOUND names the model when it is missing
            raise NotFoundError(
                f"registered model {name!r} has no versions",
                reason=ErrorReason.MODEL_VERSION_NOT_FOUND,
            )
        return entities.model_version(found[0])

    def _latest_of_model(self, name: str) -> domain.ModelVersion:
        """The version with the highest number, for a name no filter can quote: MLflow's
        registered model carries the latest version of each stage, and the highest of
        those is the highest of all."""
        model = self.call(
            lambda: self._client.get_registered_model(name),
            not_found=ErrorReason.MODEL_NOT_FOUND,
        )
        numbers = [int(v.version) for v in model.latest_versions or ()]
        if not numbers:
            raise NotFoundError(
                f"registered model {name!r} has no versions",
                reason=ErrorReason.MODEL_VERSION_NOT_FOUND,
            )
        return self.get_model_version(name, max(numbers))

    def versions_from(self, name: str, source: str) -> tuple[domain.ModelVersion, ...]:
        """Every version of `name` registered from exactly this source."""
        run_id = runs_source_run_id(source)
        where = name_filter(name)
        if run_id:
            where += f" AND run_id = {quoted(run_id, 'source')}"

        def page(after: str | None) -> Any:
            return self.call(
                lambda: self._client.search_model_versions(
                    filter_string=where,
                    max_results=_SEARCH_PAGE,
                    order_by=["version_number DESC"],
                    page_token=after,
                )
            )

        found: list[domain.ModelVersion] = []
        paged = page(None)
        while True:
            found.extend(
                v
                for v in map(entities.model_version, paged)
                if v.source == source and v.name == name
            )
            if not paged.token:
                return tuple(found)
            paged = page(paged.token)

    def _remove_late_versions(self, request_id: str, name: str, answered: int) -> int:
        """Delete the versions of this request id above the one it answered with (a late
        create lands as a later version); returns how many. Run in the background, with
        the gateway's retries."""

        def op() -> int:
            found = self._client.search_model_versions(
                filter_string=_tag_filter(REQUEST_ID_TAG, request_id),
                max_results=_DUPLICATES_PASSED_OVER + 1,
            )
            late = [v for v in found if v.name == name and int(v.version) > answered]
            for version in late:
                self._client.delete_model_version(version.name, version.version)
            return len(late)

        return self.call(op)

    def _find_version(self, request_id: str) -> Any | None:
        # Of any model: an id is one call's, whichever model it named. The first version
        # made for it, should two sidecars both have made one: each picks the same.
        found = self._client.search_model_versions(
            filter_string=_tag_filter(REQUEST_ID_TAG, request_id),
            max_results=1,
            order_by=["version_number ASC"],
        )
        return found[0] if found else None

    def find_model_version(self, request_id: str) -> domain.ModelVersion | None:
        """The version (of any model) that the request `request_id` created, or None."""
        found = self.call(lambda: self._find_version(request_id))
        return None if found is None else entities.model_version(found)

    def get_model_version(
        self, name: str, version: int, *, retry: bool = True
    ) -> domain.ModelVersion:
        """One version of a model."""
        return entities.model_version(
            self.call(
                lambda: self._client.get_model_version(name, str(version)),
                retry=retry,
                not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
            )
        )

    def get_model_version_by_alias(self, name: str, alias: str) -> domain.ModelVersion:
        """The version an alias points at; NotFoundError for an alias the model lacks.

        The one place that knows MLflow's quirk: an alias that is not set is reported as
        INVALID_PARAMETER_VALUE "... not found", not as a missing resource."""
        try:
            found = self.call(
                lambda: self._client.get_model_version_by_alias(name, alias),
                not_found=ErrorReason.MODEL_NOT_FOUND,
            )
        except InvalidArgumentError as exc:
            # MLflow reports a missing alias as INVALID_PARAMETER_VALUE "... not found".
            if "not found" in exc.message:
                raise NotFoundError(
                    exc.message, reason=ErrorReason.ALIAS_NOT_FOUND, metadata=exc.metadata
                ) from exc
            raise
        return entities.model_version(found)

    def search_model_versions(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.ModelVersion]:
        """One page of model versions."""
        search_terms.check_filter_reads(search_terms.MODEL_VERSIONS, filter_string)
        check_fields_distinct(order_by, search_terms.MODEL_VERSIONS.order_field)
        kind = page_tokens.of_query("model-versions", filter_string, order_by)
        mlflow_token = page_tokens.to_mlflow(kind, page_token)
        paged = self.call_search(
            lambda: self._client.search_model_versions(
                filter_string=filter_string or None,
                max_results=page_size,
                order_by=list(order_by) or None,
                page_token=mlflow_token,
            ),
            filter_string=filter_string,
            order_by=order_by,
            page_token=page_token,
            grammar=search_terms.MODEL_VERSIONS,
        )
        return domain.Page(
            tuple(entities.model_version(v) for v in paged),
            page_tokens.from_mlflow(kind, paged.token),
        )

    def update_model_version(
        self, name: str, version: int, description: str
    ) -> domain.ModelVersion:
        """Replace a version's description."""
        self.call(
            lambda: self._client.update_model_version(name, str(version), description=description),
            not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
        )
        return self.get_model_version(name, version)

    def delete_model_version(self, name: str, version: int) -> None:
        """Delete one version."""
        self._delete_once(
            lambda: self._client.delete_model_version(name, str(version)),
            ErrorReason.MODEL_VERSION_NOT_FOUND,
        )

    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        """Set one tag of a version."""
        self.call(
            lambda: self._client.set_model_version_tag(name, str(version), key, value),
            not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
        )

    def model_version_tag(self, name: str, version: int, key: str) -> str | None:
        """One tag of a version, the sidecar's own included; None when it lacks it."""
        found = self.call(
            lambda: self._client.get_model_version(name, str(version)),
            not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
        )
        value = (found.tags or {}).get(key)
        return None if value is None else str(value)

    def delete_model_version_tag(self, name: str, version: int, key: str) -> None:
        """Delete one tag of a version."""
        self._delete_tag(
            lambda: self._client.delete_model_version_tag(name, str(version), key),
            lambda: self._client.get_model_version(name, str(version)),
            ErrorReason.MODEL_VERSION_NOT_FOUND,
        )

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at a version."""
        # MLflow would point an alias at a deleted or missing version; refuse with NOT_FOUND.
        self.get_model_version(name, version)
        self.call(
            lambda: self._client.set_registered_model_alias(name, alias, str(version)),
            not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
        )

    def delete_model_alias(self, name: str, alias: str) -> None:
        """Remove an alias."""
        # MLflow deletes a missing alias silently; the port promises NOT_FOUND.
        if alias not in self.get_registered_model(name).aliases:
            raise NotFoundError(
                f"registered model {name!r} has no alias {alias!r}",
                reason=ErrorReason.ALIAS_NOT_FOUND,
            )
        self._delete_once(
            lambda: self._client.delete_registered_model_alias(name, alias),
            ErrorReason.MODEL_NOT_FOUND,
        )

    # -- artifacts ----------------------------------------------------------------------

    def log_artifact(self, run_id: str, local_file: Path, artifact_dir: str) -> None:
        """Store one file as `artifact_dir/<the file's name>` among the run's artifacts.

        MLflow names the stored file after the local one, so callers name it accordingly.
        Retried: storing the same bytes again just overwrites them.
        """
        self.run_artifact_uri(run_id)
        self.call(
            lambda: self._client.log_artifact(run_id, str(local_file), artifact_dir or None),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )

    def start_artifact_upload(
        self, artifact_uri: str, artifact_dir: str, file_name: str, size_bytes: int
    ) -> StreamedUpload | None:
        """Start a PUT of `artifact_dir/file_name` that is fed while the bytes arrive.

        None when the run's artifact store is not MLflow's HTTP proxy, the file is empty,
        or MLflow's client would send it in presigned parts: then the file is stored with
        `log_artifact` once it is complete."""
        self._storage.check("run_id", artifact_uri)
        if size_bytes <= 0:
            return None
        repo = self._proxy_repository(artifact_uri)
        if repo is None or not self.call(lambda: artifact_streams.streams_upload(repo, size_bytes)):
            return None
        return StreamedUpload(repo, artifact_dir, file_name, size_bytes, self._observe)

    def open_artifact_download(
        self, artifact_uri: str, artifact_path: str, chunk_bytes: int, size_hint: int = 0
    ) -> StreamedDownload | None:
        """A GET of one artifact file whose bytes are passed on as they arrive, from the
        object store itself when MLflow's server presigns it.

        None when the run's artifact store is not MLflow's HTTP proxy: then the file is
        downloaded with `download_artifact` first (also when MLflow's answer has no
        Content-Length and no `size_hint` is known)."""
        self._storage.check("run_id", artifact_uri)
        repo = self._proxy_repository(artifact_uri)
        if repo is None:
            return None
        return self.call(
            lambda: artifact_streams.open_download(repo, artifact_path, chunk_bytes, size_hint),
            not_found=ErrorReason.ARTIFACT_NOT_FOUND,
        )

    def _proxy_repository(self, artifact_uri: str) -> Any | None:
        return self.call(lambda: artifact_streams.proxy_repository(artifact_uri, self.tracking_uri))

    def _run_repository(self, run_id: str, directory: str = "") -> Any:
        """The artifact repository of the run's own artifacts (of one `directory` of them),
        once their location is allowed.

        Not MLflow's `runs:/` repository, which MlflowClient's listing and downloads use in
        MLflow 3: that one adds the files of a logged model named like the path, which a
        `sidecar://` client adds itself (the files came twice) and which behind MLflow's
        artifact proxy it fails to find."""
        uri = self.run_artifact_uri(run_id)
        if directory:
            uri = f"{uri.rstrip('/')}/{directory}"
        return get_artifact_repository(
            uri, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )

    def list_artifacts(self, run_id: str, path: str) -> list[domain.FileInfo]:
        """Every artifact of the run directly under `path` (empty: the root); [] for a file
        or nothing."""
        repo = self._run_repository(run_id)
        infos = self.call(
            lambda: repo.list_artifacts(path or None),
            not_found=ErrorReason.RUN_NOT_FOUND,
        )
        return [
            domain.FileInfo(path=i.path, is_dir=bool(i.is_dir), size_bytes=int(i.file_size or 0))
            for i in infos
        ]

    def download_artifact(self, run_id: str, artifact_path: str, dst_dir: Path) -> Path:
        """Download one artifact file of the run into `dst_dir`, named as the artifact;
        returns its path."""
        directory, _, name = artifact_path.rpartition("/")
        repo = self._run_repository(run_id, directory)
        dst_dir.mkdir(parents=True, exist_ok=True)
        return Path(
            self.call(
                lambda: repo.download_artifacts(name, str(dst_dir)),
                not_found=ErrorReason.ARTIFACT_NOT_FOUND,
            )
        )

    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        """Delete a run's artifact file or directory (not every artifact store can)."""
        artifact_uri = self.run_artifact_uri(run_id)

        def op() -> None:
            repo: Any = get_artifact_repository(artifact_uri, tracking_uri=self.tracking_uri)
            repo.delete_artifacts(artifact_path)

        self.call(op)

    def download_model_version(self, name: str, version: int, dst_dir: Path) -> Path:
        """Download every file of a model version into `dst_dir`; returns the model's root.

        Reads the version's storage location from the registry and copies exactly what is
        stored there, wherever it is (run artifacts, an MLflow 3 logged model, a bucket),
        as long as that is one of the configured artifact stores (else PERMISSION_DENIED:
        a version registered through MLflow directly may point anywhere).
        """
        # Asked by name and number, never through a models:/ URI: a name may hold what that
        # URI's syntax reads as an alias ('@'), a query ('?') or nothing at all (a newline),
        # and would name another model's files.
        location = self.call(
            lambda: str(self._client.get_model_version_download_uri(name, str(version))),
            not_found=ErrorReason.MODEL_VERSION_NOT_FOUND,
        )
        uri = self._storage_uri("version", location)

        def op() -> str:
            # Building the repository may already ask MLflow (a runs:/ URI resolves its run).
            repo: Any = get_artifact_repository(
                uri, tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
            )
            return mlflow_internals.download_artifacts(repo, "", str(dst_dir))

        return Path(self.call(op))


def _unusable_uri(config: AppConfig, exc: MlflowException, *, registry: bool) -> MlflowSettingError:
    """The one-line refusal of a tracking or (`registry`) registry URI MLflow has no store
    for."""
    key = "registry_uri" if registry and config.mlflow.registry_uri else "tracking_uri"
    uri = config.registry_uri if registry else config.tracking_uri
    # MLflow's message lists the schemes it takes, then a link to its docs.
    said = exc.message.split(" See https://")[0].strip()
    return MlflowSettingError(
        f"invalid config key mlflow.{key} ({ENV_PREFIX}MLFLOW__{key.upper()}):"
        f" MLflow has no store for {uri!r}: {said}"
    )


# mypy checks here that the gateway is a complete MlflowPort.
_: type[MlflowPort] = MlflowGateway
