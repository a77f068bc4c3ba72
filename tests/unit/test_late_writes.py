"""The checks for creates that land late: when they run, what a failing one does, and
what stopping says."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mlflow_sidecar.server.mlflow_gateway.late_writes import (
    CHECK_AFTER_TIMEOUTS,
    SAVED_CHECKS_NAME,
    LateWriteChecks,
)


class _Check:
    def __init__(self, answers: list[int | Exception]) -> None:
        self._answers = answers
        self.calls = 0
        self.done = threading.Event()

    def __call__(self, **_args: object) -> int:
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
    checks.handle("run", check)
    checks.schedule("run", "run r1", {"answered": "r1"})
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
    checks.handle("model_version", check)
    with caplog.at_level(logging.INFO):
        checks.schedule("model_version", "version 3 of model 'm'", {"answered": 3})
        assert check.done.wait(10)
        _wait_for(lambda: checks.pending() == 0)
    assert removed == [("model_version", 1)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("could not look for a late create" in m and "unavailable" in m for m in messages)
    assert any(
        "removed 1 model_version(s)" in m and "version 3 of model 'm'" in m for m in messages
    )
    checks.stop(1.0)


def test_without_a_place_to_keep_them_stopping_drops_the_checks_and_says_how_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    checks = LateWriteChecks(3600, lambda _kind, _n: None)
    check = _Check([0])
    checks.handle("run", check)
    checks.schedule("run", "run r1", {"answered": "r1"})
    with caplog.at_level(logging.WARNING):
        checks.stop(1.0)
    assert check.calls == 0
    assert checks.pending() == 0
    assert any(
        f"{len(CHECK_AFTER_TIMEOUTS)} checks for late creates" in r.getMessage()
        for r in caplog.records
    )
    # Scheduled after the stop: nothing runs.
    checks.schedule("run", "run r2", {"answered": "r2"})
    assert checks.pending() == 0


def test_checks_a_stop_left_are_made_after_the_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = tmp_path / SAVED_CHECKS_NAME
    first = LateWriteChecks(0.1, lambda _kind, _n: None, saved_at=saved)
    never = _Check([0])
    first.handle("run", never)
    first.schedule("run", "run r1", {"experiment_id": "1", "answered": "r1"})
    with caplog.at_level(logging.INFO):
        first.stop(1.0)
    assert never.calls == 0
    assert any("kept in" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)

    seen: list[dict[str, object]] = []
    removed: list[tuple[str, int]] = []
    again = LateWriteChecks(0.1, lambda kind, n: removed.append((kind, n)), saved_at=saved)

    def check(**args: object) -> int:
        seen.append(args)
        return 1 if len(seen) == 1 else 0

    again.handle("run", check)
    again.start()
    _wait_for(lambda: again.pending() == 0)
    assert seen == [{"experiment_id": "1", "answered": "r1"}] * len(CHECK_AFTER_TIMEOUTS)
    assert removed == [("run", 1)]
    # Every check made: nothing is left for a third start.
    third = LateWriteChecks(0.1, lambda _kind, _n: None, saved_at=saved)
    third.handle("run", check)
    third.start()
    assert third.pending() == 0
    for checks in (again, third):
        checks.stop(1.0)


def test_checks_kept_where_they_cannot_be_read_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = tmp_path / SAVED_CHECKS_NAME
    saved.write_text("{not json")
    checks = LateWriteChecks(0.1, lambda _kind, _n: None, saved_at=saved)
    checks.handle("run", _Check([0]))
    with caplog.at_level(logging.WARNING):
        checks.start()
    assert checks.pending() == 0
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    checks.stop(1.0)


def test_checks_that_cannot_be_kept_still_run_and_a_stop_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved = tmp_path / "missing-dir" / SAVED_CHECKS_NAME
    checks = LateWriteChecks(3600, lambda _kind, _n: None, saved_at=saved)
    checks.handle("run", _Check([0]))
    with caplog.at_level(logging.WARNING):
        checks.schedule("run", "run r1", {"answered": "r1"})
        assert checks.pending() == len(CHECK_AFTER_TIMEOUTS)
        checks.stop(1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot keep the checks" in m for m in messages)
    assert any("keeps its second entity" in m for m in messages)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)
