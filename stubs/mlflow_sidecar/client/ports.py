"""The ports trainer code depends on: `ExperimentTracking` and `ModelRegistry`.

The gRPC clients in `mlflow_sidecar.client` implement them; trainer tests can inject a
fake of their own. (The sidecar's services are another interface: they serve RPCs, and
local paths or progress callbacks mean nothing to them.)
Every method raises `mlflow_sidecar.core.errors.SidecarError` subclasses.

Every method that creates, renames, ends, uploads or deletes takes `request_id`: the id of
one logical call, kept across its retries, so that it takes effect once. The gRPC clients
make a fresh UUID4 for each call when it is empty; a trainer passes its own to make a
call it repeats after a restart of its own (e.g. "register the model of run X") safe too.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from mlflow_sidecar.core.domain import (
    AliasChange,
    ArtifactInfo,
    Experiment,
    FileInfo,
    FlushResult,
    Metric,
    MetricPoint,
    ModelVersion,
    Page,
    Progress,
    RegisteredModel,
    Run,
    RunStatus,
    SyncedModel,
    ViewType,
    WatchStatus,
)
from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import DEFAULT_METRIC_PAGE_SIZE, DEFAULT_PAGE_SIZE
from mlflow_sidecar.core.model_digest import directory_digest

StrPath = str | os.PathLike[str]

W = TypeVar("W", bound="AliasWatch")


class AliasWatch(Iterator[AliasChange]):
    """An open watch of a registered model's aliases (see `ModelRegistry.watch`): iterating
    it waits for the next change; `status` says how the sidecar last saw MLflow. Use it as a
    context manager, or `close()` it (from any thread) to end it."""

    @property
    @abc.abstractmethod
    def status(self) -> WatchStatus | None:
        """The latest status the watch received (None before the first): whether MLflow
        answered the sidecar's last poll, and when that was."""

    @property
    @abc.abstractmethod
    def last_seen_versions(self) -> dict[str, int]:
        """Alias -> the version last reported (0: not set): keep it to resume a watch later
        (`ModelRegistry.watch(..., last_seen_versions=...)`) without a change missed."""

    @property
    @abc.abstractmethod
    def last_seen_creation_times_ms(self) -> dict[str, int]:
        """Alias -> the creation time (ms since the epoch) of the version last reported (0:
        not set): keep it with `last_seen_versions` and pass both to resume, so that a
        model deleted and made again meanwhile, its alias on a new version of the same
        number, is reported (DELETED, then SET) rather than taken for the version seen."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the watch; an iteration waiting for a change ends (StopIteration)."""

    def __enter__(self: W) -> W:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class ExperimentTracking(abc.ABC):
    """Experiments, runs, params, metrics and tags."""

    @abc.abstractmethod
    def create_experiment(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str = "",
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> Experiment:
        """Create an experiment; with `get_if_exists` return the existing one of that name.

        A deleted experiment of that name is FailedPreconditionError (reason
        EXPERIMENT_NOT_ACTIVE), with or without `get_if_exists`: restore it or pick another name.
        """

    @abc.abstractmethod
    def get_experiment(self, experiment_id: str) -> Experiment:
        """The experiment with this id."""

    @abc.abstractmethod
    def get_experiment_by_name(self, name: str) -> Experiment:
        """The experiment with this name."""

    @abc.abstractmethod
    def search_experiments(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        view_type: ViewType = ViewType.ACTIVE_ONLY,
    ) -> Page[Experiment]:
        """One page of experiments matching an MLflow filter string."""

    @abc.abstractmethod
    def delete_experiment(self, experiment_id: str, *, request_id: str = "") -> None:
        """Soft-delete an experiment and its runs, as MLflow does; deleting a deleted one
        is fine. Its name stays taken (FailedPreconditionError, reason EXPERIMENT_NOT_ACTIVE,
        for a create of that name) until it is restored or purged by MLflow."""

    @abc.abstractmethod
    def restore_experiment(self, experiment_id: str) -> Experiment:
        """Restore a deleted experiment and its runs; an active one is returned unchanged."""

    @abc.abstractmethod
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
        """Start a run; the same `request_id` always yields the same run.

        `client_request_id` is the older name of `request_id`, still honoured."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> Run:
        """The run with its params, tags and latest metrics."""

    @abc.abstractmethod
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
        """One page of runs of the given experiments matching an MLflow filter string."""

    @abc.abstractmethod
    def end_run(
        self,
        run_id: str,
        status: RunStatus = RunStatus.FINISHED,
        *,
        end_time_ms: int = 0,
        request_id: str = "",
        wait_for_delivery: bool = False,
    ) -> Run:
        """End a run with a terminal status, after its spooled metrics are delivered.

        With points of the run still spooled, the end is recorded by the sidecar at once
        and reaches MLflow right after the run's last point: the run returned is still
        RUNNING then. `wait_for_delivery` waits for that instead (DeadlineExceededError,
        reason RUN_END_PENDING, when the deadline passes first; the end stays recorded).
        `flush_metrics(run_id)` also waits for it."""

    @abc.abstractmethod
    def delete_run(self, run_id: str, *, request_id: str = "") -> None:
        """Soft-delete a run, as MLflow does; deleting a deleted one is fine."""

    @abc.abstractmethod
    def restore_run(self, run_id: str) -> Run:
        """Restore a deleted run; an active one is returned unchanged."""

    @abc.abstractmethod
    def resume_run(self, run_id: str) -> Run:
        """Set an ended run back to RUNNING, as MLflow's `start_run(run_id=...)` does (a
        preempted trainer going on with its run): the sidecar takes its points again, and
        an end it recorded but MLflow has not applied yet is cancelled. A running run is
        returned unchanged; a deleted one is FailedPreconditionError (RUN_NOT_ACTIVE)."""

    @abc.abstractmethod
    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """Log params; a param already logged with another value is FailedPreconditionError."""

    @abc.abstractmethod
    def log_metrics(self, run_id: str, metrics: Sequence[Metric], *, request_id: str = "") -> int:
        """Log metric points synchronously; returns how many were accepted. The call's
        retries log them once; to retry it yourself, pass the same `request_id`."""

    @abc.abstractmethod
    def enqueue_metrics(self, points: Sequence[MetricPoint]) -> int:
        """Hand points of any runs to the sidecar's durable spool; returns how many were
        accepted. Delivery to MLflow is asynchronous; ResourceExhaustedError when full.
        A point with timestamp 0 is stamped with the current time before it is sent, so a
        resend of the call is an exact duplicate that MLflow holds once."""

    @abc.abstractmethod
    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        """Wait until a run's (or all) spooled points are in MLflow, or the timeout passes
        (`timeout_s` None: the client's timeout; 0: do not wait, say what is pending now;
        negative: InvalidArgumentError)."""

    @abc.abstractmethod
    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags on a run."""

    @abc.abstractmethod
    def delete_run_tag(self, run_id: str, key: str, *, request_id: str = "") -> None:
        """Delete one tag of a run."""

    @abc.abstractmethod
    def get_metric_history(
        self,
        run_id: str,
        key: str,
        *,
        page_size: int = DEFAULT_METRIC_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[Metric]:
        """One page of every point of a metric, ordered by step, then timestamp."""

    @abc.abstractmethod
    def upload_artifact(
        self,
        run_id: str,
        local_path: StrPath,
        artifact_path: str = "",
        *,
        progress: Progress | None = None,
        request_id: str = "",
    ) -> ArtifactInfo:
        """Store the file `local_path` as the run's artifact `artifact_path`.

        `artifact_path` is the file's path inside the run's artifacts (e.g.
        "checkpoints/step_100.pt"); empty means the file's own name at the root. The
        bytes are verified by size and sha256 before MLflow sees them: a mismatch is
        DataLossError and stores nothing. Files over the sidecar's limit are
        ResourceExhaustedError. `progress` gets (bytes sent, bytes total).
        """

    @abc.abstractmethod
    def list_artifacts(
        self,
        run_id: str,
        path: str = "",
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[FileInfo]:
        """One page of the artifacts directly under `path` (empty: the root), sorted by path."""

    @abc.abstractmethod
    def download_artifact(
        self,
        run_id: str,
        artifact_path: str,
        dst_dir: StrPath,
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download one artifact file to `dst_dir/artifact_path` and return that path.

        The file appears only once its size and sha256 are verified (DataLossError
        otherwise); a directory is InvalidArgumentError, a missing file NotFoundError.
        """


class ModelRegistry(abc.ABC):
    """Registered models, versions, tags and aliases."""

    @abc.abstractmethod
    def create_registered_model(
        self,
        name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> RegisteredModel:
        """Create a registered model; with `get_if_exists` return the existing one."""

    @abc.abstractmethod
    def get_registered_model(self, name: str) -> RegisteredModel:
        """The registered model of this name."""

    @abc.abstractmethod
    def search_registered_models(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegisteredModel]:
        """One page of registered models matching an MLflow filter string."""

    @abc.abstractmethod
    def update_registered_model(self, name: str, *, description: str) -> RegisteredModel:
        """Replace the description of a registered model."""

    @abc.abstractmethod
    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str = ""
    ) -> RegisteredModel:
        """Rename a registered model; its versions and aliases follow."""

    @abc.abstractmethod
    def delete_registered_model(self, name: str, *, request_id: str = "") -> None:
        """Delete a registered model with all its versions."""

    @abc.abstractmethod
    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        """Set one tag of a registered model."""

    @abc.abstractmethod
    def delete_registered_model_tag(self, name: str, key: str, *, request_id: str = "") -> None:
        """Delete one tag of a registered model."""

    @abc.abstractmethod
    def create_model_version(
        self,
        name: str,
        *,
        source: str = "",
        run_id: str = "",
        artifact_path: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> ModelVersion:
        """Register a new version from a source URI or a run's artifact path; waits for READY."""

    @abc.abstractmethod
    def get_model_version(self, name: str, version: int) -> ModelVersion:
        """One version of a model."""

    @abc.abstractmethod
    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        """The version an alias (e.g. "champion") points at."""

    @abc.abstractmethod
    def get_latest_model_version(self, name: str) -> ModelVersion:
        """The version with the highest version number."""

    @abc.abstractmethod
    def search_model_versions(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[ModelVersion]:
        """One page of model versions matching an MLflow filter string."""

    @abc.abstractmethod
    def update_model_version(self, name: str, version: int, *, description: str) -> ModelVersion:
        """Replace the description of a version."""

    @abc.abstractmethod
    def delete_model_version(self, name: str, version: int, *, request_id: str = "") -> None:
        """Delete one version (its aliases go with it)."""

    @abc.abstractmethod
    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        """Set one tag of a version."""

    @abc.abstractmethod
    def delete_model_version_tag(
        self, name: str, version: int, key: str, *, request_id: str = ""
    ) -> None:
        """Delete one tag of a version."""

    @abc.abstractmethod
    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at a version."""

    @abc.abstractmethod
    def delete_model_alias(self, name: str, alias: str, *, request_id: str = "") -> None:
        """Remove an alias."""

    @abc.abstractmethod
    def watch(
        self,
        name: str,
        aliases: Sequence[str],
        *,
        last_seen_versions: Mapping[str, int] | None = None,
        last_seen_creation_times_ms: Mapping[str, int] | None = None,
    ) -> AliasWatch:
        """Watch `aliases` (1 to 16, e.g. ["champion"]) of the registered model `name`.

        The watch yields each alias's state first (kind CURRENT), then every change (SET,
        MOVED, DELETED, VERSION_DELETED) as the sidecar's poller sees it, in order, each
        once. It rides out sidecar restarts and MLflow outages: it reconnects on its own and
        misses no change. An alias given in `last_seen_versions` (alias -> the version last
        seen, 0: not set; e.g. kept by the caller across its own restarts) is reported only
        once it points elsewhere; given its `last_seen_creation_times_ms` too (both as the
        watch's properties of those names give them), also once it points at another
        version of the same number (the model was deleted and made again). NotFoundError
        for a missing model (unless `last_seen_versions` resumes a watch of it: then each
        alias seen set is DELETED), InvalidArgumentError for a bad alias, raised here or by
        the iteration.
        """

    @abc.abstractmethod
    def upload_model(
        self,
        name: str,
        local_dir: StrPath,
        *,
        run_id: str = "",
        experiment_id: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
        progress: Progress | None = None,
        request_id: str = "",
    ) -> ModelVersion:
        """Save the model directory `local_dir` and register it as a new version of `name`.

        The files become artifacts of the run `run_id` (or of a new run in
        `experiment_id`) under `models/<id>/`, the version's source is that `runs:/` URI,
        and `aliases` point at it; the registered model is created if missing. Every file
        is verified by size and sha256 first; nothing is stored when one does not match.
        Symlinks are followed only inside `local_dir`. Returns the new version.
        """

    @abc.abstractmethod
    def download_model(
        self,
        name: str,
        dst_dir: StrPath,
        *,
        version: int | None = None,
        alias: str | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Make `dst_dir` hold exactly the files of one version (give `version` or `alias`).

        As `sync_model`, and returns `dst_dir`, which stock MLflow can load from (e.g.
        `mlflow.pyfunc.load_model`) when the version is an MLflow model.
        """

    def sync_model(
        self,
        name: str,
        dst_dir: StrPath,
        *,
        version: int | None = None,
        alias: str | None = None,
        progress: Progress | None = None,
    ) -> SyncedModel:
        """Make `dst_dir` hold exactly the files of one version (give `version` or
        `alias`), and say whether that changed it.

        The files arrive in a sibling directory of `dst_dir` (same filesystem) and are
        verified by size and sha256 (DataLossError otherwise); then the sibling takes the
        place of `dst_dir` in one step (Linux: `renameat2(RENAME_EXCHANGE)`, so the path
        always names a complete model; elsewhere the old directory is renamed aside first)
        and the old copy is removed. A failure leaves `dst_dir` as it was and no sibling
        behind; the siblings of a download whose process died are removed by the next
        download into the same directory (README "Model cache"). When `dst_dir` already
        holds the version's files (same digest), nothing is transferred
        or replaced and `changed` is False. A symlink `dst_dir` stays: the directory it
        names is replaced. A `dst_dir` ending in `.` or `..`, or the root, is
        InvalidArgumentError (a trailing `/` is dropped).

        This default, for implementations of the port that predate it, resolves the version,
        calls `download_model` by its number and reports `changed` True.
        """
        if version is not None and alias is None:
            found = self.get_model_version(name, version)
        elif alias is not None and version is None:
            found = self.get_model_version_by_alias(name, alias)
        else:
            raise InvalidArgumentError("selector", "give exactly one of version or alias")
        path = self.download_model(name, dst_dir, version=found.version, progress=progress)
        return SyncedModel(path, found, directory_digest(path), changed=True)
