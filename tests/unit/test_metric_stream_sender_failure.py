"""A metric stream whose sender thread fails unexpectedly fails the stream: a flush or
close that waited for the sender raises, instead of waiting for a thread that is gone."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import InternalError
from mlflow_sidecar.v1 import tracking_pb2 as pb


class _Broken:
    def with_call(self, requests: Iterator[pb.StreamMetricsRequest]) -> object:
        # A stub of another shape than the stream's (no `timeout`): a TypeError, as any bug.
        raise AssertionError("never reached")


class _Stub:
    def __init__(self) -> None:
        self.StreamMetrics = _Broken()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_close_raises_when_the_sender_died() -> None:
    stream = MetricStream(_Stub(), retry_budget_s=600, max_delay_s=0.01)  # type: ignore[arg-type]
    stream.log("run", "loss", 1.0, step=0)
    outcome: list[BaseException] = []

    def close() -> None:
        try:
            stream.close()
        except BaseException as exc:
            outcome.append(exc)

    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "close() waited for a sender that is gone"
    assert len(outcome) == 1 and isinstance(outcome[0], InternalError), outcome
    assert "TypeError" in outcome[0].message
    with pytest.raises(InternalError):
        stream.log("run", "loss", 2.0, step=1)
