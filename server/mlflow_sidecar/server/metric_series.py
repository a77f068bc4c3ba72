"""`SeriesBatch`: the series of a StreamMetrics message, read as numpy columns.

A message of series only (what the typed `MetricStream` sends) is read column by column
straight out of protobuf's packed fields into numpy arrays: checking, stamping and
packing them for the spool then costs a few microseconds per thousand points, where a
Python object per number costs tens. A message with points sent one by one (grpcurl's)
goes the general way, as `MetricColumns`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import overload

import numpy as np
import numpy.typing as npt

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.v1 import tracking_pb2 as pb

Floats = npt.NDArray[np.float64]
Integers = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class MetricSeries:
    """One run's points of one key; `index` is its place in the message's `series`."""

    index: int
    run_id: str
    key: str
    values: Floats
    timestamps_ms: Integers
    steps: Integers

    def __len__(self) -> int:
        return len(self.values)


class SeriesBatch(Sequence[MetricPoint]):
    """The non-empty series of one message; a sequence of MetricPoint like any other, but
    the spool's path reads its columns and never builds a point."""

    __slots__ = ("_ends", "series")

    def __init__(self, series: Sequence[MetricSeries]) -> None:
        self.series = tuple(s for s in series if len(s))
        self._ends = list(accumulate(len(s) for s in self.series))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> MetricPoint: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MetricPoint]: ...

    def __getitem__(self, index: int | slice) -> MetricPoint | Sequence[MetricPoint]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("point index out of range")
        which = bisect.bisect_right(self._ends, index)
        series = self.series[which]
        at = index - (self._ends[which - 1] if which else 0)
        return MetricPoint(
            series.run_id,
            series.key,
            float(series.values[at]),
            int(series.timestamps_ms[at]),
            int(series.steps[at]),
        )

    def __iter__(self) -> Iterator[MetricPoint]:
        for series in self.series:
            for value, stamp, step in zip(
                series.values.tolist(),
                series.timestamps_ms.tolist(),
                series.steps.tolist(),
                strict=True,
            ):
                yield MetricPoint(series.run_id, series.key, value, stamp, step)


def stream_message_points(message: pb.StreamMetricsRequest) -> Sequence[MetricPoint]:
    """The points of a StreamMetrics message: a `SeriesBatch` when it holds series only,
    else `MetricColumns` (points one by one first, then each series).

    InvalidArgumentError names a series whose columns differ in length."""
    if message.points:
        return conv.metric_columns_from_pb(message)
    series = []
    for index, sent in enumerate(message.series):
        conv.series_length(index, sent)
        series.append(
            MetricSeries(
                index,
                sent.run_id,
                sent.key,
                np.array(sent.values, dtype=np.float64),
                np.array(sent.timestamps_ms, dtype=np.int64),
                np.array(sent.steps, dtype=np.int64),
            )
        )
    return SeriesBatch(series)
