"""What a StreamMetrics message carries, read back as points: for tests of the sender."""

from __future__ import annotations

import grpc
from grpc_status import rpc_status

from mlflow_sidecar.core.conversions import (
    ACCEPTED_POINTS_METADATA,
    MAX_MESSAGE_POINTS_METADATA,
    SERIES_COLUMNS_METADATA,
)
from mlflow_sidecar.core.domain import MetricPoint
from mlflow_sidecar.core.errors import SidecarError, to_rpc_status
from mlflow_sidecar.v1 import tracking_pb2 as pb


def points_of(message: pb.StreamMetricsRequest) -> list[MetricPoint]:
    """The points of a message: those sent one by one, then each series'."""
    points = [MetricPoint(p.run_id, p.key, p.value, p.timestamp_ms, p.step) for p in message.points]
    for series in message.series:
        # Each column in one of its two forms (the other one empty).
        stamps = series.fixed_timestamps_ms or series.timestamps_ms
        steps = series.fixed_steps or series.steps
        points += [
            MetricPoint(series.run_id, series.key, value, stamp, step)
            for value, stamp, step in zip(series.values, stamps, steps, strict=True)
        ]
    return points


class AnsweredCall(grpc.Call):  # type: ignore[misc]
    """A StreamMetrics call that ended well, whose sidecar said in its initial metadata
    which series columns it reads (`forms`; None: it said nothing, as an older one) and
    the most points a message may hold (`max_message_points`; None: not said)."""

    def __init__(self, forms: str | None, *, max_message_points: int | None = None) -> None:
        said = {SERIES_COLUMNS_METADATA: forms, MAX_MESSAGE_POINTS_METADATA: max_message_points}
        self._metadata = tuple(
            (key, str(value)) for key, value in said.items() if value is not None
        )

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def details(self) -> str:
        return ""

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


class RefusedCall(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """A StreamMetrics call the sidecar ended with `error`, after accepting `accepted`
    points of it, as the sidecar's trailers say."""

    def __init__(self, error: SidecarError, accepted: int = 0) -> None:
        status = to_rpc_status(error)
        self._code = error.code
        self._details = status.message
        self._trailers = (
            (ACCEPTED_POINTS_METADATA, str(accepted)),
            (rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),
        )

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, object], ...]:
        return self._trailers
