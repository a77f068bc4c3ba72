"""Domain types of the ports: plain dataclasses, independent of protobuf and MLflow."""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeAlias, TypeVar, overload

T = TypeVar("T")

Progress: TypeAlias = Callable[[int, int], None]
"""A transfer's progress callback: called with (bytes done, bytes total) as chunks move.

An exception raised by the callback aborts the transfer and reaches the caller."""

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_METRIC_PAGE_SIZE = 1000
MAX_METRIC_PAGE_SIZE = 25000


class LifecycleStage(enum.Enum):
    """Whether an experiment or run is active or (soft-)deleted."""

    ACTIVE = "active"
    DELETED = "deleted"


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


class PointFields(Protocol):
    """Anything with the fields of a metric point: MetricPoint, or its protobuf message."""

    @property
    def run_id(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> float: ...

    @property
    def timestamp_ms(self) -> int: ...

    @property
    def step(self) -> int: ...


# A point's field and the column a MetricSeries message keeps it in.
_SERIES_COLUMNS = {"value": "values", "timestamp_ms": "timestamps_ms", "step": "steps"}


class MetricColumns(Sequence[MetricPoint]):
    """Metric points of any runs in columns, as they come off the wire: point i is
    (run_ids[i], keys[i], values[i], timestamps_ms[i], steps[i]).

    A sequence of MetricPoint like any other, but the streaming path never builds one
    object per point: that alone cost more than everything else the sidecar does with it.

    `series_starts`, set when a StreamMetrics message is read, remembers where each of
    its series begins (the points before the first one were sent one by one), so that
    an error can name a point the way its request did; slices and `take` forget it.
    """

    __slots__ = ("keys", "run_ids", "series_starts", "steps", "timestamps_ms", "values")

    def __init__(
        self,
        run_ids: list[str],
        keys: list[str],
        values: list[float],
        timestamps_ms: list[int],
        steps: list[int],
    ) -> None:
        if not len(run_ids) == len(keys) == len(values) == len(timestamps_ms) == len(steps):
            raise ValueError("metric columns must all have the same length")
        self.run_ids = run_ids
        self.keys = keys
        self.values = values
        self.timestamps_ms = timestamps_ms
        self.steps = steps
        self.series_starts: Sequence[int] = ()

    def field_name(self, index: int, field: str) -> str:
        """How the request named `field` of point `index`: `points[i].key` for a point
        sent on its own, `series[j].key` or `series[j].timestamps_ms[k]` for one sent
        in a series."""
        starts = self.series_starts
        if not starts or index < starts[0]:
            return f"points[{index}].{field}"
        # bisect_right: an empty series shares its start with the next one.
        which = bisect.bisect_right(starts, index) - 1
        if field in ("run_id", "key"):
            return f"series[{which}].{field}"
        column = _SERIES_COLUMNS.get(field, field)
        return f"series[{which}].{column}[{index - starts[which]}]"

    @classmethod
    def from_points(cls, points: Iterable[PointFields]) -> MetricColumns:
        """The columns of `points` (itself, when it already is columns)."""
        if isinstance(points, MetricColumns):
            return points
        listed = list(points)
        return cls(
            [p.run_id for p in listed],
            [p.key for p in listed],
            [p.value for p in listed],
            [p.timestamp_ms for p in listed],
            [p.step for p in listed],
        )

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, index: int) -> MetricPoint: ...

    @overload
    def __getitem__(self, index: slice) -> MetricColumns: ...

    def __getitem__(self, index: int | slice) -> MetricPoint | MetricColumns:
        if isinstance(index, slice):
            return MetricColumns(
                self.run_ids[index],
                self.keys[index],
                self.values[index],
                self.timestamps_ms[index],
                self.steps[index],
            )
        return MetricPoint(
            self.run_ids[index],
            self.keys[index],
            self.values[index],
            self.timestamps_ms[index],
            self.steps[index],
        )

    def distinct(self, column: Literal["run_ids", "keys"]) -> list[str]:
        """The distinct run ids (or keys), in the order they first appear.

        A series has one run id and one key, so of a column read from a message only the
        first point of each series is looked at."""
        values: list[str] = getattr(self, column)
        starts = self.series_starts
        if starts:
            first = [values[start] for start in starts if start < len(values)]
            values = values[: starts[0]] + first
        return list(dict.fromkeys(values))

    def take(self, indices: Iterable[int]) -> MetricColumns:
        """The points at `indices`, in that order."""
        chosen = list(indices)
        return MetricColumns(
            [self.run_ids[i] for i in chosen],
            [self.keys[i] for i in chosen],
            [self.values[i] for i in chosen],
            [self.timestamps_ms[i] for i in chosen],
            [self.steps[i] for i in chosen],
        )


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What FlushMetrics left behind: points still spooled, and points dead-lettered."""

    pending_points: int
    dead_letter_points: int = 0

    @property
    def complete(self) -> bool:
        """True when nothing is pending any more."""
        return self.pending_points == 0


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
class Run:
    """A run with its params, tags and the latest point of each metric."""

    info: RunInfo
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

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
