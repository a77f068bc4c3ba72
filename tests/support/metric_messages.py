"""What a StreamMetrics message carries, read back as points: for tests of the sender."""

from __future__ import annotations

from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.v1 import tracking_pb2 as pb


def points_of(message: pb.StreamMetricsRequest) -> list[MetricPoint]:
    """The points of a message: those sent one by one, then each series'."""
    points = [MetricPoint(p.run_id, p.key, p.value, p.timestamp_ms, p.step) for p in message.points]
    for series in message.series:
        points += [
            MetricPoint(series.run_id, series.key, value, stamp, step)
            for value, stamp, step in zip(
                series.values, series.timestamps_ms, series.steps, strict=True
            )
        ]
    return points
