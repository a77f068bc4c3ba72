"""A flush waits within its caller's deadline, leaving the answer time to travel back."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.services.metric_ingest import wait_within


@pytest.mark.parametrize(
    ("wanted", "left", "waits"),
    [
        (5.0, None, 5.0),  # no deadline: as long as asked
        (5.0, 60.0, 5.0),  # the deadline is far: as long as asked
        (60.0, 30.0, 29.0),  # a tenth of it, at most 1 s, goes to the answer
        (60.0, 5.0, 4.5),
        (60.0, 0.5, 0.4),  # at least 0.1 s
        (60.0, 0.05, 0.0),  # no time left to wait at all
    ],
)
def test_a_wait_leaves_its_answer_time(wanted: float, left: float | None, waits: float) -> None:
    assert wait_within(wanted, left) == pytest.approx(waits)
