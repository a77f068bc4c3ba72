"""`MetricBatch`: the metric points of one StreamMetrics message, in columns.

Values, timestamps and steps are numpy columns, read straight out of protobuf's packed
fields; run ids and keys are kept once per segment, a stretch of points that share both (a
series of the message, or points sent one by one under the same run and key). Checking,
stamping and spooling a batch then costs microseconds per thousand points, where a Python
object per number would cost tens.

Each segment remembers where its request put it, so that an error names a point as the
request did: `series[3].timestamps_ms[17]`, `series[2].fixed_steps[4]`, `points[5].key`.

A series sends its timestamps and its steps each in one of two forms, varints
(`timestamps_ms`, `steps`) or fixed-width integers (`fixed_timestamps_ms`, `fixed_steps`,
what the typed client sends to a sidecar that says it reads them): the batch holds them
alike.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.server import validation as check

Floats = npt.NDArray[np.float64]
Integers = npt.NDArray[np.int64]
_Column = TypeVar("_Column", Floats, Integers)


class PointFields(Protocol):
    """A point sent on its own: a `MetricPoint`, or its protobuf message."""

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


class SeriesFields(Protocol):
    """One run's points of one key in columns: a `MetricSeries` message."""

    @property
    def run_id(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def values(self) -> Sequence[float]: ...

    @property
    def timestamps_ms(self) -> Sequence[int]: ...

    @property
    def steps(self) -> Sequence[int]: ...

    @property
    def fixed_timestamps_ms(self) -> Sequence[int]: ...

    @property
    def fixed_steps(self) -> Sequence[int]: ...


@dataclass(frozen=True, slots=True)
class Segment:
    """Points `start` to `stop` of a batch, of one run and one key, and where the request
    sent them: `series[series]` (its timestamps and steps in the fields `stamps_field` and
    `steps_field`), or (`series` -1) `points[first]` onwards."""

    run_id: str
    key: str
    start: int
    stop: int
    series: int = -1
    first: int = 0
    stamps_field: str = "timestamps_ms"
    steps_field: str = "steps"

    def field_path(self, offset: int, field: str) -> str:
        """How the request named `field` of this segment's point `offset`."""
        if self.series < 0:
            return f"points[{self.first + offset}].{field}"
        if field in ("run_id", "key"):
            return f"series[{self.series}].{field}"
        column = {"value": "values", "timestamp_ms": self.stamps_field, "step": self.steps_field}
        return f"series[{self.series}].{column.get(field, field)}[{offset}]"


@dataclass(frozen=True, slots=True)
class RunColumns:
    """One run's points of a batch, in batch order: `keys` is one key for all of them
    (the usual case) or one per point."""

    run_id: str
    keys: str | list[str]
    values: Floats
    timestamps_ms: Integers
    steps: Integers


def _point_segments(points: Sequence[PointFields]) -> Iterator[Segment]:
    """One segment per run of consecutive points of the same run and key."""
    grouped = itertools.groupby(range(len(points)), lambda i: _address(points[i]))
    for (run_id, key), indices in grouped:
        first = next(indices)
        stop = first + 1 + sum(1 for _ in indices)
        yield Segment(run_id, key, first, stop, -1, first)


def _column(index: int, sent: SeriesFields, name: str) -> tuple[str, Sequence[int]]:
    """The field a series sent its column `name` in (`name` or `fixed_<name>`) and the
    column; InvalidArgumentError when it sent both."""
    varint, fixed = getattr(sent, name), getattr(sent, f"fixed_{name}")
    if not len(fixed):
        return name, varint
    if len(varint):
        raise InvalidArgumentError(
            f"series[{index}]",
            f"send {name} or fixed_{name}, not both (got {len(varint)} and {len(fixed)} numbers)",
        )
    return f"fixed_{name}", fixed


@dataclass(frozen=True, slots=True)
class MetricBatch:
    """Metric points of any runs: point i is (its segment's run id and key, values[i],
    timestamps_ms[i], steps[i]); segments cover the points in order, none empty."""

    values: Floats
    timestamps_ms: Integers
    steps: Integers
    segments: tuple[Segment, ...]

    @classmethod
    def from_request(
        cls, points: Sequence[PointFields], series: Sequence[SeriesFields]
    ) -> MetricBatch:
        """The points of a request: those sent one by one first, then each series.

        InvalidArgumentError names a series whose columns differ in length or that sends
        a column in both forms."""
        segments: list[Segment] = []
        values: list[Floats] = []
        stamps: list[Integers] = []
        steps: list[Integers] = []
        if points:
            segments.extend(_point_segments(points))
            count = len(points)
            values.append(np.fromiter((p.value for p in points), np.float64, count))
            stamps.append(np.fromiter((p.timestamp_ms for p in points), np.int64, count))
            steps.append(np.fromiter((p.step for p in points), np.int64, count))
        start = len(points)
        for index, sent in enumerate(series):
            stamps_field, sent_stamps = _column(index, sent, "timestamps_ms")
            steps_field, sent_steps = _column(index, sent, "steps")
            count = len(sent.values)
            if len(sent_stamps) != count or len(sent_steps) != count:
                raise InvalidArgumentError(
                    f"series[{index}]",
                    f"values, {stamps_field} and {steps_field} must have the same length,"
                    f" got {count}, {len(sent_stamps)} and {len(sent_steps)}",
                )
            if not count:
                continue
            segments.append(
                Segment(
                    sent.run_id, sent.key, start, start + count, index, 0, stamps_field, steps_field
                )
            )
            values.append(np.array(sent.values, dtype=np.float64))
            stamps.append(np.array(sent_stamps, dtype=np.int64))
            steps.append(np.array(sent_steps, dtype=np.int64))
            start += count
        return cls(
            _joined(values, np.empty(0, np.float64)),
            _joined(stamps, np.empty(0, np.int64)),
            _joined(steps, np.empty(0, np.int64)),
            tuple(segments),
        )

    @classmethod
    def from_points(cls, points: Iterable[PointFields]) -> MetricBatch:
        """A batch of points sent one by one."""
        return cls.from_request(list(points), ())

    def __len__(self) -> int:
        return len(self.values)

    def field_path(self, index: int, field: str) -> str:
        """How the request named `field` of point `index`, e.g. `series[3].steps[17]`."""
        at = bisect.bisect_right([s.start for s in self.segments], index) - 1
        segment = self.segments[at]
        return segment.field_path(index - segment.start, field)

    def checked(self) -> MetricBatch:
        """The batch with its zero timestamps stamped with now (so that a redelivery is
        an exact duplicate MLflow ignores); InvalidArgumentError names the first bad point
        as its request did."""
        # A training loop repeats a few run ids and keys thousands of times: each distinct
        # one is checked once, and only a bad one is looked for, to name its first point.
        for field, accept in (("run_id", check.run_id), ("key", check.key)):
            seen: set[str] = set()
            for segment in self.segments:
                text: str = getattr(segment, field)
                if text in seen:
                    continue
                seen.add(text)
                try:
                    accept(field, text)
                except InvalidArgumentError as exc:
                    raise InvalidArgumentError(
                        segment.field_path(0, field),
                        exc.problem,
                        reason=exc.reason,
                        metadata=exc.metadata,
                    ) from None
        stamps = self.timestamps_ms
        if not len(stamps) or stamps.min() > 0:
            return self
        negative = np.flatnonzero(stamps < 0)
        if len(negative):
            raise InvalidArgumentError(
                self.field_path(int(negative[0]), "timestamp_ms"), "must not be negative"
            )
        now = now_ms()
        return dataclasses.replace(self, timestamps_ms=np.where(stamps == 0, now, stamps))

    def by_run(self) -> list[RunColumns]:
        """The points run by run, each run's in batch order; a batch of one run (the usual
        message: one trainer, one run) keeps its columns as they are."""
        runs: dict[str, list[Segment]] = {}
        for segment in self.segments:
            runs.setdefault(segment.run_id, []).append(segment)
        if len(runs) == 1:
            ((run_id, segments),) = runs.items()
            return [
                RunColumns(run_id, _keys(segments), self.values, self.timestamps_ms, self.steps)
            ]
        return [
            RunColumns(
                run_id,
                _keys(segments),
                np.concatenate([self.values[s.start : s.stop] for s in segments]),
                np.concatenate([self.timestamps_ms[s.start : s.stop] for s in segments]),
                np.concatenate([self.steps[s.start : s.stop] for s in segments]),
            )
            for run_id, segments in runs.items()
        ]


def _address(point: PointFields) -> tuple[str, str]:
    return point.run_id, point.key


def _joined(parts: list[_Column], empty: _Column) -> _Column:
    if len(parts) == 1:
        return parts[0]
    return cast(_Column, np.concatenate(parts)) if parts else empty


def _keys(segments: list[Segment]) -> str | list[str]:
    first = segments[0].key
    if all(s.key == first for s in segments):
        return first
    return [s.key for s in segments for _ in range(s.stop - s.start)]
