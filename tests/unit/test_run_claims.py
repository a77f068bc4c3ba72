"""RunClaims: one worker per run, and a `held` run waits for one step, not a backlog."""

from __future__ import annotations

import threading
import time

import pytest

from mlflow_sidecar.server.spool.run_claims import RunClaims


def test_held_waits_for_the_step_in_progress_not_for_the_whole_backlog():
    claims = RunClaims(lambda: ["busy"])
    stop = threading.Event()
    steps: list[float] = []

    def worker() -> None:  # a run with an endless backlog: claim, send, release, again
        while not stop.is_set():
            run_id = claims.claim()
            if run_id is None:
                continue
            time.sleep(0.02)
            steps.append(time.monotonic())
            claims.release(run_id)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while not steps:
            time.sleep(0.01)
        with claims.held("busy", timeout_s=5.0):
            done = len(steps)
            time.sleep(0.1)
            assert len(steps) == done, "a worker delivered the run while it was held"
    finally:
        stop.set()
        thread.join(5)


def test_held_gives_up_after_its_timeout_and_leaves_the_run_to_the_workers():
    claims = RunClaims(lambda: ["r"])
    assert claims.claim() == "r"
    with pytest.raises(TimeoutError), claims.held("r", timeout_s=0.1):
        pass
    claims.release("r")
    assert claims.claim() == "r"
