"""The checks for creates that land late: when they run, what a failing one does, and
what stopping says."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from mlflow_sidecar.server.mlflow_gateway.late_writes import CHECK_AFTER_TIMEOUTS, LateWriteChecks


class _Check:
    def __init__(self, answers: list[int | Exception]) -> None:
        self._answers = answers
        self.calls = 0
        self.done = threading.Event()

    def __call__(self) -> int:
        self.calls += 1
        answer = self._answers[min(self.calls, len(self._answers)) - 1]
        if self.calls >= len(self._answers):
            self.done.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_a_check_is_made_at_each_multiple_of_the_request_timeout() -> None:
    checks = LateWriteChecks(0.01, lambda _kind, _n: None)
    assert list(checks.delays_s) == pytest.approx([0.01 * n for n in CHECK_AFTER_TIMEOUTS])
    check = _Check([0] * len(CHECK_AFTER_TIMEOUTS))
    checks.schedule("run", "run r1", check)
    assert check.done.wait(10)
    _wait_for(lambda: checks.pending() == 0)
    assert check.calls == len(CHECK_AFTER_TIMEOUTS)
    checks.stop(1.0)


def test_removals_are_counted_by_kind_and_a_failed_check_is_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    removed: list[tuple[str, int]] = []
    checks = LateWriteChecks(0.01, lambda kind, n: removed.append((kind, n)))
    check = _Check([RuntimeError("MLflow is unavailable"), 1, 0, 0, 0])
    with caplog.at_level(logging.INFO):
        checks.schedule("model_version", "version 3 of model 'm'", check)
        assert check.done.wait(10)
        _wait_for(lambda: checks.pending() == 0)
    assert removed == [("model_version", 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not look for a late create" in m and "unavailable" in m for m in messages)
    assert any(
        "removed 1 model_version(s)" in m and "version 3 of model 'm'" in m for m in messages
    )
    checks.stop(1.0)


def test_stopping_drops_the_checks_not_made_and_says_how_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checks = LateWriteChecks(3600, lambda _kind, _n: None)
    check = _Check([0])
    checks.schedule("run", "run r1", check)
    with caplog.at_level(logging.WARNING):
        checks.stop(1.0)
    assert check.calls == 0
    assert checks.pending() == 0
    assert any(
        f"{len(CHECK_AFTER_TIMEOUTS)} checks for late creates" in r.getMessage()
        for r in caplog.records
    )
    # Scheduled after the stop: nothing runs.
    checks.schedule("run", "run r2", check)
    assert checks.pending() == 0


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
