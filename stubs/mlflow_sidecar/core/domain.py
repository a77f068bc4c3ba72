"""Domain types of the ports: plain dataclasses, independent of protobuf and MLflow."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")

Progress: TypeAlias = Callable[[int, int], None]
"""A transfer's progress callback: called with (bytes done, bytes total) as chunks move.

An exception raised by the callback aborts the transfer and reaches the caller."""


class LifecycleStage(enum.Enum):
    """Whether an experiment or run is active or (soft-)deleted."""

    ACTIVE = "active"
    DELETED = "deleted"
    # Not known to the answer: EndRun answering while MLflow cannot be reached.
    UNKNOWN = "unknown"


class ViewType(enum.Enum):
    """Which lifecycle stages a search returns."""

    ACTIVE_ONLY = "active_only"
    DELETED_ONLY = "deleted_only"
    ALL = "all"


class RunStatus(enum.Enum):
    """Status of a run, as MLflow names it."""

    RUNNING = "RUNNING"
    SCHEDULED = "SCHEDULED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


TERMINAL_RUN_STATUSES = frozenset({RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED})


class ModelVersionStatus(enum.Enum):
    """Registration status of a model version."""

    PENDING_REGISTRATION = "PENDING_REGISTRATION"
    FAILED_REGISTRATION = "FAILED_REGISTRATION"
    READY = "READY"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a paginated list; an empty `next_page_token` means the last page."""

    items: tuple[T, ...]
    next_page_token: str = ""


@dataclass(frozen=True, slots=True)
class Experiment:
    """An MLflow experiment."""

    experiment_id: str
    name: str
    artifact_location: str = ""
    lifecycle_stage: LifecycleStage = LifecycleStage.ACTIVE
    tags: Mapping[str, str] = field(default_factory=dict)
    creation_time_ms: int = 0
    last_update_time_ms: int = 0


# Metric and MetricPoint are made by the hundred thousand per second on the streaming
# path; a frozen dataclass costs four times as much to construct, so these two are not frozen.
@dataclass(slots=True)
class Metric:
    """One metric point. `timestamp_ms` 0 means "now" when logging."""

    key: str
    value: float
    timestamp_ms: int = 0
    step: int = 0


@dataclass(slots=True)
class MetricPoint:
    """A metric point addressed to a run, as streamed through the spool."""

    run_id: str
    key: str
    value: float
    timestamp_ms: int = 0
    step: int = 0


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What FlushMetrics left behind: points still spooled, points dead-lettered, run
    ends recorded behind points that MLflow has not been told of yet, and run ends MLflow
    refused, held for `mlflow-sidecar spool requeue`."""

    pending_points: int
    dead_letter_points: int = 0
    pending_run_ends: int = 0
    held_run_ends: int = 0

    @property
    def complete(self) -> bool:
        """True when nothing is pending any more: no point, no run end."""
        return self.pending_points == 0 and self.pending_run_ends == 0


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Identity and status of a run."""

    run_id: str
    experiment_id: str
    run_name: str = ""
    status: RunStatus = RunStatus.RUNNING
    start_time_ms: int = 0
    end_time_ms: int = 0
    artifact_uri: str = ""
    lifecycle_stage: LifecycleStage = LifecycleStage.ACTIVE
    user_id: str = ""


@dataclass(frozen=True, slots=True)
class DatasetUse:
    """A dataset a run used, as MLflow describes it, with the tags of that use."""

    name: str
    digest: str
    source_type: str
    source: str
    schema: str = ""
    profile: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Run:
    """A run with its params, tags and the latest point of each metric."""

    info: RunInfo
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    # What the run used (datasets, logged model ids) and the logged models it recorded as
    # outputs (model id, step), in MLflow's order.
    dataset_inputs: tuple[DatasetUse, ...] = ()
    model_inputs: tuple[str, ...] = ()
    model_outputs: tuple[tuple[str, int], ...] = ()

    @property
    def run_id(self) -> str:
        """The run's id (shortcut for `info.run_id`)."""
        return self.info.run_id


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A registered model; `aliases` maps alias to version number."""

    name: str
    description: str = ""
    creation_time_ms: int = 0
    last_updated_time_ms: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One version of a registered model."""

    name: str
    version: int
    source: str = ""
    run_id: str = ""
    status: ModelVersionStatus = ModelVersionStatus.READY
    status_message: str = ""
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    creation_time_ms: int = 0
    last_updated_time_ms: int = 0
    user_id: str = ""
    model_id: str = ""


@dataclass(frozen=True, slots=True)
class SyncedModel:
    """A version's files in a local directory, after `ModelRegistry.sync_model`."""

    path: Path
    model_version: ModelVersion
    digest: str
    """The content's identity (`ModelManifest.digest`): sha256 of the files' sha256s and paths."""
    changed: bool
    """False when `path` already held these files and was left as it was."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One entry of a run's artifact listing; `path` is relative to the run's artifact root."""

    path: str
    is_dir: bool = False
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """An artifact file as stored: its path in the run, its size and hex sha256."""

    path: str
    size_bytes: int
    sha256: str


class AliasChangeKind(enum.Enum):
    """What happened to a watched alias."""

    CURRENT = "CURRENT"
    """The alias's state when the watch opened (unchanged since the version last seen, when
    the watch resumed an earlier one)."""
    SET = "SET"
    """The alias was set where it was not set before."""
    MOVED = "MOVED"
    """The alias now points at another version."""
    DELETED = "DELETED"
    """The alias was removed (its version still exists), or its model was deleted."""
    VERSION_DELETED = "VERSION_DELETED"
    """The version the alias pointed at was deleted, and the alias with it."""


@dataclass(frozen=True, slots=True)
class AliasChange:
    """One change of a watched alias: `model_version` is the version it points at now (None
    when it is not set), `previous_version` the number it pointed at before (0: none, and
    always 0 for CURRENT)."""

    alias: str
    kind: AliasChangeKind
    model_version: ModelVersion | None = None
    previous_version: int = 0

    @property
    def version(self) -> int:
        """The version number the alias points at now; 0 when it is not set."""
        return self.model_version.version if self.model_version is not None else 0


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """How an alias watch sees MLflow: whether its last poll reached it, when it last read
    the model (ms since the epoch; 0: never) and, while unreachable, why."""

    mlflow_reachable: bool
    last_poll_time_ms: int = 0
    message: str = ""
