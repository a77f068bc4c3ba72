"""The request ledger and the interceptor that answers repeats from it."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.server.idempotency import (
    IdempotencyInterceptor,
    RequestLedger,
    check_request_id,
    fingerprint,
    older_fingerprints,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb

CREATE = "/mlflow_sidecar.v1.ExperimentTrackingService/CreateExperiment"
GET = "/mlflow_sidecar.v1.ExperimentTrackingService/GetExperiment"


@pytest.fixture()
def ledger(tmp_path):
    opened = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    yield opened
    opened.close()


def test_a_repeat_gets_the_first_answer_without_acting_again(ledger):
    calls = []

    def act() -> bytes:
        calls.append(1)
        return f"answer {len(calls)}".encode()

    assert ledger.once(CREATE, "r1", "print", act) == b"answer 1"
    assert ledger.once(CREATE, "r1", "print", act) == b"answer 1"
    assert calls == [1]


def test_answers_survive_a_restart(tmp_path):
    first = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    first.once(CREATE, "r1", "print", lambda: b"created 7")
    first.close()
    again = RequestLedger(tmp_path / "requests.db", retention_s=3600)
    try:
        assert again.once(CREATE, "r1", "print", lambda: b"created 8") == b"created 7"
    finally:
        again.close()


def test_an_id_used_for_another_request_is_refused(ledger):
    ledger.once(CREATE, "r1", "print-a", lambda: b"a")
    with pytest.raises(InvalidArgumentError) as caught:
        ledger.once(CREATE, "r1", "print-b", lambda: b"b")
    assert caught.value.field == "request_id"
    assert caught.value.reason == "REQUEST_ID_REUSED"


def test_the_same_id_on_another_method_is_another_request(ledger):
    ledger.once(CREATE, "r1", "p", lambda: b"a")
    assert ledger.once(GET, "r1", "q", lambda: b"b") == b"b"


def test_a_failed_call_is_not_recorded(ledger):
    def fail() -> bytes:
        raise RuntimeError("MLflow down")

    with pytest.raises(RuntimeError):
        ledger.once(CREATE, "r1", "p", fail)
    assert ledger.once(CREATE, "r1", "p", lambda: b"second try") == b"second try"


def test_concurrent_repeats_act_once(ledger):
    calls = []
    started = threading.Barrier(4)

    def act() -> bytes:
        calls.append(1)
        time.sleep(0.05)
        return b"one"

    def call() -> None:
        started.wait()
        assert ledger.once(CREATE, "r1", "p", act) == b"one"

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_old_answers_are_forgotten_after_the_retention(tmp_path):
    first = RequestLedger(tmp_path / "requests.db", retention_s=60)
    first.record(CREATE, "old", "p", b"a")
    first._db.execute("UPDATE answers SET recorded_ms = recorded_ms - 61000")
    first.close()
    again = RequestLedger(tmp_path / "requests.db", retention_s=60)
    try:
        assert len(again) == 0
    finally:
        again.close()


def test_an_answer_past_the_retention_is_forgotten_by_a_running_sidecar_too(ledger):
    # A quiet sidecar seldom prunes: a repeat after the retention is a new call all the same.
    calls = []

    def act() -> bytes:
        calls.append(1)
        return f"answer {len(calls)}".encode()

    assert ledger.once(CREATE, "r1", "p", act) == b"answer 1"
    ledger._db.execute("UPDATE answers SET recorded_ms = recorded_ms - 3601000")
    assert ledger.answer(CREATE, "r1", "p", "request_id") is None
    assert ledger.once(CREATE, "r1", "other", act) == b"answer 2"  # not REQUEST_ID_REUSED
    assert ledger.once(CREATE, "r1", "other", act) == b"answer 2"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("a b", "may only contain"), ("x'y", "may only contain"), ("a" * 201, "at most 200")],
)
def test_malformed_request_ids_are_refused(value, problem):
    with pytest.raises(InvalidArgumentError, match=problem) as caught:
        check_request_id("header.request_id", value)
    assert caught.value.field == "header.request_id"


def test_the_fingerprint_ignores_the_request_id_only():
    a = pb.CreateExperimentRequest(name="e", request_id="1")
    assert fingerprint(a) == fingerprint(pb.CreateExperimentRequest(name="e", request_id="2"))
    assert fingerprint(a) != fingerprint(pb.CreateExperimentRequest(name="f", request_id="1"))


def test_start_runs_older_name_of_the_request_id_is_the_same_call():
    alone = pb.StartRunRequest(experiment_id="1", request_id="x")
    both = pb.StartRunRequest(experiment_id="1", request_id="x", client_request_id="x")
    assert fingerprint(alone) == fingerprint(both)
    # A different old id is another request (the service refuses it as contradictory).
    other = pb.StartRunRequest(experiment_id="1", request_id="x", client_request_id="y")
    assert fingerprint(alone) != fingerprint(other)


def _handler(behavior: Any) -> Any:
    return grpc.unary_unary_rpc_method_handler(behavior)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method


def test_the_interceptor_answers_a_repeated_create_from_the_ledger(ledger):
    created = []

    def create(request: pb.CreateExperimentRequest, context: object) -> Any:
        created.append(request.name)
        return pb.CreateExperimentResponse(
            experiment=pb.Experiment(experiment_id=str(len(created)), name=request.name)
        )

    handler = IdempotencyInterceptor(ledger).intercept_service(
        lambda details: _handler(create), _Details(CREATE)
    )
    request = pb.CreateExperimentRequest(name="e", request_id="abc")
    first = handler.unary_unary(request, None)
    second = handler.unary_unary(request, None)
    assert first == second
    assert second.experiment.experiment_id == "1"
    assert created == ["e"]
    # Without a request id every call acts.
    handler.unary_unary(pb.CreateExperimentRequest(name="e"), None)
    assert created == ["e", "e"]


START = "/mlflow_sidecar.v1.ExperimentTrackingService/StartRun"


def test_a_start_run_recorded_by_an_older_sidecar_with_both_ids_is_answered_after_an_upgrade(
    ledger,
):
    # Sidecars before the old name was cleared hashed client_request_id in; the typed
    # client sends both ids, so its repeat after an upgrade is still the same call.
    request = pb.StartRunRequest(experiment_id="1", request_id="x", client_request_id="x")
    recorded = pb.StartRunResponse(run=pb.Run(info=pb.RunInfo(run_id="a" * 32)))
    ledger.record(
        START, "x", fingerprint(request, keep_old_names=True), recorded.SerializeToString()
    )
    started = []

    def start(request: pb.StartRunRequest, context: object) -> Any:
        started.append(1)
        return pb.StartRunResponse()

    handler = IdempotencyInterceptor(ledger).intercept_service(
        lambda details: _handler(start), _Details(START)
    )
    assert handler.unary_unary(request, None) == recorded
    assert started == []
    # Another request under that id is still refused, whichever form was recorded.
    other = pb.StartRunRequest(experiment_id="2", request_id="x", client_request_id="x")
    with pytest.raises(InvalidArgumentError, match="already used"):
        handler.unary_unary(other, None)


def test_only_a_request_whose_old_name_holds_its_id_has_an_older_fingerprint():
    both = pb.StartRunRequest(experiment_id="1", request_id="x", client_request_id="x")
    assert older_fingerprints(both) == (fingerprint(both, keep_old_names=True),)
    assert older_fingerprints(pb.StartRunRequest(experiment_id="1", request_id="x")) == ()
    assert older_fingerprints(pb.CreateExperimentRequest(name="e", request_id="x")) == ()


def test_the_interceptor_leaves_methods_without_request_ids_alone(ledger):
    behavior = lambda request, context: pb.GetExperimentResponse()  # noqa: E731
    handler = _handler(behavior)
    wrapped = IdempotencyInterceptor(ledger).intercept_service(
        lambda details: handler, _Details(GET)
    )
    assert wrapped.unary_unary is behavior


def test_the_interceptor_refuses_a_malformed_request_id(ledger):
    handler = IdempotencyInterceptor(ledger).intercept_service(
        lambda details: _handler(lambda r, c: pb.CreateExperimentResponse()), _Details(CREATE)
    )
    with pytest.raises(InvalidArgumentError) as caught:
        handler.unary_unary(pb.CreateExperimentRequest(name="e", request_id="no spaces"), None)
    assert caught.value.field == "request_id"


def test_a_call_that_took_effect_succeeds_when_the_disk_cannot_hold_its_answer(ledger, caplog):
    # The call's effect is in MLflow: a DISK_FULL answer would say nothing happened.
    page_count = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count={page_count}")  # SQLite's own "disk is full"
    calls = []

    def act() -> bytes:
        calls.append(1)
        return b"x" * 100_000

    assert ledger.once(CREATE, "r1", "print", act) == b"x" * 100_000
    assert "disk is full" in caplog.text
    # Not remembered: a repeat acts again, and the request id tag resolves it in MLflow.
    ledger._db.execute("PRAGMA max_page_count=1073741823")
    assert ledger.once(CREATE, "r1", "print", act) == b"x" * 100_000
    assert len(calls) == 2
    assert ledger.answer(CREATE, "r1", "print", "request_id") == b"x" * 100_000
