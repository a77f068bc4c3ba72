"""`MlflowPort`: what the sidecar's services need from MLflow, in the sidecar's own terms.

The anti-corruption layer at the MLflow seam: domain types (`mlflow_sidecar.core.domain`)
in and out, the sidecar's errors (`mlflow_sidecar.core.errors`) out, no MLflow type in
any signature. `MlflowGateway` implements it against MLflow; the tests keep one in-memory
implementation, and one contract test suite holds both to the same behaviour.

The port is made of one Protocol per concern, so that a new concern is one more Protocol
joined into `MlflowPort` (or, like `LoggedModelsPort`, kept beside it).

Every method may also raise UnavailableError (MLflow unreachable after the retries) and
DeadlineExceededError (the call's deadline passed), and nothing else unexpected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import SidecarError
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus


@dataclass(frozen=True, slots=True)
class StreamedDownload:
    """An artifact file coming from MLflow: its size and its bytes, as they arrive."""

    size_bytes: int
    chunks: Iterator[bytes]
    close: Callable[[], None]


class ArtifactUpload(Protocol):
    """One artifact file sent to MLflow while its bytes still arrive; see
    `ArtifactsPort.start_artifact_upload`."""

    def failure(self) -> SidecarError | None:
        """What ended the transfer before `commit()`, if it has ended."""

    def write(self, chunk: bytes) -> None:
        """Pass on the next chunk."""

    def commit(self) -> SidecarError | None:
        """Finish the transfer: None once MLflow stored the file, else what went wrong
        (MLflow then kept nothing, unless `maybe_stored`)."""

    def abort(self) -> bool:
        """Cut the transfer short so that nothing is stored; True when one was cut."""

    @property
    def maybe_stored(self) -> bool:
        """True once the file's last byte has left for MLflow and no answer showed that
        MLflow never had it: a failure then may have come after MLflow stored the file."""


class ReachabilityPort(Protocol):
    """Whether MLflow answers."""

    def ping(self, *, retry: bool = True) -> None:
        """One cheap call; UnavailableError when MLflow cannot be reached. `retry=False`
        makes one try only, for a probe that asks again on its own."""


class ExperimentsPort(Protocol):
    """Experiments. A missing one is NotFoundError (reason EXPERIMENT_NOT_FOUND)."""

    def create_experiment(
        self, name: str, *, artifact_location: str, tags: Mapping[str, str], request_id: str
    ) -> str:
        """Create an experiment; returns its id. The same `request_id` again returns the
        same experiment; a name taken by another request is AlreadyExistsError."""

    def get_experiment(self, experiment_id: str) -> domain.Experiment:
        """The experiment with this id (deleted ones too)."""

    def get_experiment_by_name(self, name: str) -> domain.Experiment:
        """The experiment of this name (deleted ones too)."""

    def search_experiments(
        self,
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_size: int,
        page_token: str,
        view_type: domain.ViewType,
    ) -> domain.Page[domain.Experiment]:
        """One page of experiments; a bad filter, order or token is InvalidArgumentError
        naming that field."""

    def delete_experiment(self, experiment_id: str) -> None:
        """Soft-delete an experiment; an already deleted one stays as it is."""

    def restore_experiment(self, experiment_id: str) -> domain.Experiment:
        """Restore a deleted experiment; an active one is returned as it is."""


class RunsPort(Protocol):
    """Runs, their params, tags and metric points. A missing run is NotFoundError
    (reason RUN_NOT_FOUND)."""

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
        older sidecar, tagged `also_tagged`'s tag = value), created if missing."""

    def get_run(self, run_id: str) -> domain.Run:
        """The run with this id (deleted ones too)."""

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
        """One page of runs of these experiments."""

    def delete_run(self, run_id: str) -> None:
        """Soft-delete a run; an already deleted one stays as it is."""

    def restore_run(self, run_id: str) -> domain.Run:
        """Restore a deleted run; an active one is returned as it is."""

    def set_terminated(self, run_id: str, status: domain.RunStatus, end_time_ms: int) -> None:
        """Mark a run ended with a terminal status (`end_time_ms` 0: now)."""

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        """`set_terminated` for a status by name (the spool's record of an end)."""

    def set_running(self, run_id: str) -> None:
        """Set a run back to RUNNING, keeping its end time (MLflow's resume of a run)."""

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[domain.Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log points, params and tags at once (within MLflow's per-batch limits).
        Exact duplicate points and equal params are no-ops, so a retry is safe."""

    def log_metrics(
        self, run_id: str, metrics: Sequence[domain.Metric], *, retry: bool = True
    ) -> None:
        """`log_batch` of metric points only. `retry=False` makes one try only, for a
        caller that backs off on its own (the spool's deliverer)."""

    def delete_tag(self, run_id: str, key: str) -> None:
        """Delete one run tag; a missing tag is NotFoundError (reason TAG_NOT_FOUND)."""

    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int, page_token: str
    ) -> domain.Page[domain.Metric]:
        """One page of a metric's points, ordered by step, then timestamp."""


class RegisteredModelsPort(Protocol):
    """Registered models. A missing one is NotFoundError (reason MODEL_NOT_FOUND)."""

    def create_registered_model(
        self, name: str, *, description: str, tags: Mapping[str, str], request_id: str
    ) -> domain.RegisteredModel:
        """Create a model; the same `request_id` again returns it, another request's
        model of that name is AlreadyExistsError."""

    def get_registered_model(self, name: str, *, retry: bool = True) -> domain.RegisteredModel:
        """The model of this name, with its aliases. `retry=False` makes one try only, for
        a poller that reads again on its own."""

    def search_registered_models(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.RegisteredModel]:
        """One page of models."""

    def update_registered_model(self, name: str, description: str) -> domain.RegisteredModel:
        """Replace a model's description."""

    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str
    ) -> domain.RegisteredModel:
        """Rename a model, once: a retry of the same request finds the new name."""

    def delete_registered_model(self, name: str) -> None:
        """Delete a model and its versions."""

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        """Set one tag of a model."""

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        """Delete one tag of a model; a tag that is not there is deleted already."""


class ModelVersionsPort(Protocol):
    """Model versions and aliases. A missing version is NotFoundError (reason
    MODEL_VERSION_NOT_FOUND), an alias the model lacks too (reason ALIAS_NOT_FOUND)."""

    def resolve_source(self, source: str, run_id: str) -> str:
        """Check what a new version's `source` names, before anything is registered;
        returns the run the version belongs to (`run_id`, or the run of a runs:/ source).

        A malformed runs:/ URI, or one of another run than `run_id`, is InvalidArgumentError;
        a run, version or alias that does not exist is NotFoundError."""

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
        """Register a version, possibly still PENDING_REGISTRATION (see `wait_until_ready`).
        The same `request_id` again returns the same version, never a second one."""

    def wait_until_ready(self, version: domain.ModelVersion) -> domain.ModelVersion:
        """The version once it has left PENDING_REGISTRATION, within the call's deadline
        (else DeadlineExceededError); FAILED_REGISTRATION is FailedPreconditionError."""

    def find_model_version(self, request_id: str) -> domain.ModelVersion | None:
        """The version (of any model) that the request `request_id` created, or None."""

    def get_model_version(
        self, name: str, version: int, *, retry: bool = True
    ) -> domain.ModelVersion:
        """One version of a model (`retry` as for `get_registered_model`)."""

    def get_model_version_by_alias(self, name: str, alias: str) -> domain.ModelVersion:
        """The version an alias points at."""

    def latest_model_version(self, name: str) -> domain.ModelVersion:
        """The version with the highest number; a model without versions is NotFoundError
        (MODEL_VERSION_NOT_FOUND), a missing model too (MODEL_NOT_FOUND)."""

    def search_model_versions(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.ModelVersion]:
        """One page of versions."""

    def versions_from(self, name: str, source: str) -> tuple[domain.ModelVersion, ...]:
        """Every version of `name` registered from exactly this source."""

    def update_model_version(
        self, name: str, version: int, description: str
    ) -> domain.ModelVersion:
        """Replace a version's description."""

    def delete_model_version(self, name: str, version: int) -> None:
        """Delete one version."""

    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        """Set one tag of a version."""

    def model_version_tag(self, name: str, version: int, key: str) -> str | None:
        """One tag of a version, the sidecar's own included (which versions returned
        leave out); None when the version lacks it."""

    def delete_model_version_tag(self, name: str, version: int, key: str) -> None:
        """Delete one tag of a version; a tag that is not there is deleted already."""

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        """Point an alias at an existing version (a missing one is NotFoundError)."""

    def delete_model_alias(self, name: str, alias: str) -> None:
        """Remove an alias; one the model lacks is NotFoundError (ALIAS_NOT_FOUND)."""


class ArtifactsPort(Protocol):
    """A run's artifact files and a version's model files. Paths are checked relative paths."""

    def log_artifact(self, run_id: str, local_file: Path, artifact_dir: str) -> None:
        """Store one file as `artifact_dir/<the file's name>` among the run's artifacts."""

    def start_artifact_upload(
        self, artifact_uri: str, artifact_dir: str, file_name: str, size_bytes: int
    ) -> ArtifactUpload | None:
        """A transfer of `artifact_dir/file_name` fed while the bytes arrive; None when the
        store takes whole files only (then `log_artifact` the complete file)."""

    def open_artifact_download(
        self, artifact_uri: str, artifact_path: str, chunk_bytes: int, size_hint: int = 0
    ) -> StreamedDownload | None:
        """One artifact file's bytes as they arrive; None when the store hands out whole
        files only (then `download_artifact` it). `size_hint`: the file's size as listed
        (0: unknown), for an answer that does not say its length."""

    def list_artifacts(self, run_id: str, path: str) -> list[domain.FileInfo]:
        """Every artifact directly under `path` (empty: the root); [] for a file or nothing."""

    def download_artifact(self, run_id: str, artifact_path: str, dst_dir: Path) -> Path:
        """Download one artifact file into the existing directory `dst_dir`, named as the
        artifact (its last path segment); returns its path."""

    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        """Delete a run's artifact file or directory."""

    def check_storage(self, field: str, uri: str) -> str:
        """`uri` once the storage policy allows it: PermissionDeniedError (reason
        PATH_OUTSIDE_ROOTS, naming `field`) for a location outside the configured stores."""

    def download_model_version(self, name: str, version: int, dst_dir: Path) -> Path:
        """Download every file of a model version into the existing directory `dst_dir`;
        returns the model's root."""


class LoggedModelsPort(Protocol):
    """MLflow 3's logged models: what `log_model` and autologging create. Kept apart from
    `MlflowPort`, whose run-artifact and run-tag methods share their names. A missing model
    is NotFoundError (reason LOGGED_MODEL_NOT_FOUND), a missing run RUN_NOT_FOUND."""

    def create(
        self,
        experiment_id: str,
        *,
        name: str,
        model_type: str,
        source_run_id: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
    ) -> LoggedModel:
        """Create a logged model in PENDING status; not retried (a retry could make two)."""

    def get(self, model_id: str) -> LoggedModel:
        """The logged model; NotFoundError (LOGGED_MODEL_NOT_FOUND) when there is none."""

    def search(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        order_by: Sequence[tuple[str, bool]],
        page_size: int,
        page_token: str,
    ) -> domain.Page[LoggedModel]:
        """One page of the experiments' logged models, in MLflow's filter syntax."""

    def finalize(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        """Set the model's final status (READY or FAILED)."""

    def set_tags(self, model_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) the model's tags; the others stay."""

    def delete_tag(self, model_id: str, key: str) -> None:
        """Delete one tag; NotFoundError (TAG_NOT_FOUND) when the model has no such tag."""

    def log_outputs(self, run_id: str, outputs: Sequence[tuple[str, int]]) -> None:
        """Record logged models as outputs of the run, each at a step. The run must be
        active (else FailedPreconditionError, RUN_NOT_ACTIVE); the model ids are not
        checked."""

    def log_inputs(
        self, run_id: str, datasets: Sequence[DatasetUse], model_ids: Sequence[str]
    ) -> None:
        """Record the datasets and logged models a run used (an active run, as `log_outputs`)."""

    def artifact_location(self, model_id: str) -> str:
        """Where the model's files live, once the storage policy allows it."""

    def log_artifact(self, model_id: str, local_file: Path, artifact_dir: str) -> None:
        """Store one file among the model's artifacts."""

    def list_artifacts(self, model_id: str, path: str) -> list[domain.FileInfo]:
        """The model's artifacts directly under `path`."""

    def download_artifact(self, model_id: str, artifact_path: str, dst_dir: Path) -> Path:
        """Download one of the model's files to `dst_dir/artifact_path` (its path under the
        model's root, unlike a run's); returns that path."""


class MlflowPort(
    ReachabilityPort,
    ExperimentsPort,
    RunsPort,
    RegisteredModelsPort,
    ModelVersionsPort,
    ArtifactsPort,
    Protocol,
):
    """Everything the sidecar asks of MLflow."""
