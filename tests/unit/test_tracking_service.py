"""TrackingService rules, with a fake gateway."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from mlflow_sidecar.core.conversions import run_from_pb, run_to_pb
from mlflow_sidecar.core.domain import LifecycleStage, Metric, MetricPoint, RunStatus
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.idempotency import REQUEST_ID_TAG
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.fakes.mlflow_port import FakeMlflow
from tests.support.files import wait_until
from tests.support.tracking_service import tracking_service_on


@pytest.fixture()
def gateway() -> FakeMlflow:
    return FakeMlflow()


@pytest.fixture()
def deliveries_open(gateway: FakeMlflow) -> threading.Event:
    """Set: the spool delivers; cleared: deliveries wait until it is set again."""
    gate = threading.Event()
    gate.set()
    gateway.on_call("log_metrics", lambda: gate.wait(30) or pytest.fail("held back too long"))
    return gate


@pytest.fixture()
def service(gateway: FakeMlflow, tmp_path) -> Iterator[TrackingService]:
    with tracking_service_on(gateway, tmp_path) as (service, _staging):
        yield service


@pytest.fixture()
def run_id(service: TrackingService) -> str:
    exp = service.create_experiment("exp")
    return service.start_run(exp.experiment_id).run_id


def test_create_experiment_get_if_exists_survives_a_race(service, gateway):
    first = service.create_experiment("e")
    # Another caller creates the experiment between our look-up and our create:
    gateway.fail("create_experiment", AlreadyExistsError("exists"))
    assert service.create_experiment("e", get_if_exists=True) == first
    with pytest.raises(AlreadyExistsError):
        service.create_experiment("e")


def test_start_run_with_the_same_request_id_returns_one_run(service, gateway):
    exp = service.create_experiment("e").experiment_id
    first = service.start_run(exp, client_request_id="req-1")
    second = service.start_run(exp, client_request_id="req-1")
    assert first.run_id == second.run_id
    assert len(gateway.runs) == 1
    assert gateway.runs[first.run_id].tags[REQUEST_ID_TAG] == "req-1"
    assert REQUEST_ID_TAG not in first.tags  # bookkeeping, not one of the user's tags


def test_start_run_retried_after_a_lost_answer_finds_the_first_run(service, gateway):
    exp = service.create_experiment("e").experiment_id
    gateway.fail(
        "find_or_create_run",
        UnavailableError("connection reset after the run was created"),
        after_effect=True,
    )
    with pytest.raises(UnavailableError):
        service.start_run(exp, client_request_id="req-2")
    retried = service.start_run(exp, client_request_id="req-2")
    assert list(gateway.runs) == [retried.run_id]


def test_concurrent_start_runs_with_one_request_id_make_one_run(service, gateway):
    exp = service.create_experiment("e").experiment_id
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(service.start_run(exp, client_request_id="same").run_id)
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(gateway.runs) == 1


def test_start_run_parent_must_exist_in_the_same_experiment(service):
    exp = service.create_experiment("e").experiment_id
    other = service.create_experiment("f").experiment_id
    parent = service.start_run(other)
    with pytest.raises(InvalidArgumentError) as err:
        service.start_run(exp, parent_run_id=parent.run_id)
    assert err.value.field == "parent_run_id"
    with pytest.raises(NotFoundError):
        service.start_run(exp, parent_run_id="missing")


def test_start_run_refuses_a_parent_tag_that_contradicts_parent_run_id(service, gateway):
    exp = service.create_experiment("e").experiment_id
    parent, other = service.start_run(exp), service.start_run(exp)
    runs = len(gateway.runs)
    with pytest.raises(InvalidArgumentError, match="give the parent once") as err:
        service.start_run(
            exp, parent_run_id=parent.run_id, tags={"mlflow.parentRunId": other.run_id}
        )
    assert err.value.field == "parent_run_id"
    assert len(gateway.runs) == runs
    # The same parent twice is one parent.
    child = service.start_run(
        exp, parent_run_id=parent.run_id, tags={"mlflow.parentRunId": parent.run_id}
    )
    assert gateway.get_run(child.run_id).tags["mlflow.parentRunId"] == parent.run_id


def test_log_params_write_once(service, gateway, run_id):
    service.log_params(run_id, {"lr": "0.1"})
    service.log_params(run_id, {"lr": "0.1"})
    with pytest.raises(FailedPreconditionError) as err:
        service.log_params(run_id, {"lr": "0.2", "new": "x"})
    assert err.value.reason == ErrorReason.PARAM_VALUE_CHANGED
    assert err.value.metadata == {"key": "lr"}
    # Nothing of a refused call is written.
    assert gateway.get_run(run_id).params == {"lr": "0.1"}


def test_log_params_racing_a_call_that_logs_the_same_value_succeeds(service, gateway, run_id):
    # Another call (a retry of this one, another worker logging the same hyperparameters)
    # logs `lr` between this call's read of the run and its write, and MLflow's SQL store
    # refuses this call's whole batch as their inserts race.
    def race() -> None:
        gateway.on_call("log_batch", None)
        gateway.log_batch(run_id, params={"lr": "0.1"})
        gateway.fail("log_batch", InvalidArgumentError("", "MLflow's database refused the request"))

    gateway.on_call("log_batch", race)
    service.log_params(run_id, {"lr": "0.1", "gamma": "0.99"})
    assert gateway.get_run(run_id).params == {"lr": "0.1", "gamma": "0.99"}


def test_log_params_are_split_into_mlflow_batches_of_100(service, gateway, run_id):
    service.log_params(run_id, {f"p{i}": str(i) for i in range(250)})
    assert [len(b["params"]) for b in gateway.effects("log_batch")] == [100, 100, 50]


def test_log_metrics_are_split_into_batches_of_1000_and_stamped(service, gateway, run_id):
    accepted = service.log_metrics(run_id, [Metric("m", float(i), step=i) for i in range(2500)])
    assert accepted == 2500
    assert [len(b["metrics"]) for b in gateway.effects("log_batch")] == [1000, 1000, 500]
    assert all(m.timestamp_ms > 0 for b in gateway.effects("log_batch") for m in b["metrics"])


def test_log_metrics_is_not_held_back_by_the_space_the_spool_keeps_free(gateway, run_id, tmp_path):
    """spool.min_free_bytes guards the spool's writes: StreamMetrics is refused below it,
    LogMetrics, which writes to MLflow directly, is not (README, spool.min_free_bytes)."""
    store = SpoolStore(tmp_path / "tight.db", max_points=10_000, min_free_bytes=10**18)
    deliverer = MetricDeliverer(
        store, gateway.log_metrics, batch_size=1000, backoff_factor_s=0.01, max_backoff_s=0.05
    )
    ingest = MetricIngest(store, deliverer, flush_timeout_s=5)
    tight = TrackingService(gateway, ingest, Staging(load_config(data_dir=tmp_path / "d")))
    try:
        assert tight.log_metrics(run_id, [Metric("m", 1.0, step=1)]) == 1
        with pytest.raises(ResourceExhaustedError) as refused:
            tight.enqueue_metrics([MetricPoint(run_id, "m", 2.0, 1_000, 2)])
        assert refused.value.reason == ErrorReason.DISK_FULL
    finally:
        store.close()


def test_log_metrics_rejects_bad_points_before_writing_any(service, gateway, run_id):
    points = [Metric("ok", 1.0), Metric("bad key!", 2.0)]
    with pytest.raises(InvalidArgumentError) as err:
        service.log_metrics(run_id, points)
    assert err.value.field == "metrics[1].key"
    assert gateway.effects("log_batch") == []


def test_end_run_accepts_only_terminal_statuses(service, run_id):
    with pytest.raises(InvalidArgumentError) as err:
        service.end_run_with_pending(run_id, RunStatus.RUNNING)
    assert err.value.field == "status"
    run, pending = service.end_run_with_pending(run_id, RunStatus.KILLED)
    assert (run.info.status, pending) == (RunStatus.KILLED, 0)


def test_points_for_an_ended_run_are_refused_by_log_and_stream_alike(service, run_id):
    service.end_run_with_pending(run_id, RunStatus.FINISHED)
    with pytest.raises(FailedPreconditionError) as logged:
        service.log_metrics(run_id, [Metric("loss", 1.0, 1_000, 1)])
    with pytest.raises(FailedPreconditionError) as streamed:
        service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    assert logged.value.reason == streamed.value.reason == "RUN_ENDED"
    assert service.flush_metrics(run_id, timeout_s=0).dead_letter_points == 0


def test_end_run_with_a_backlog_answers_at_once_and_ends_after_the_last_point(
    service, gateway, deliveries_open, run_id
):
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED, end_time_ms=5_000)
    assert run.info.status is RunStatus.RUNNING
    assert pending == 1
    assert service.flush_metrics(run_id, timeout_s=0).pending_points == 1
    deliveries_open.set()
    assert service.flush_metrics(run_id, timeout_s=5).pending_points == 0
    ended = gateway.get_run(run_id).info
    assert ended.status is RunStatus.FINISHED and ended.end_time_ms == 5_000
    history = gateway.get_metric_history(run_id, "loss", page_size=10, page_token="")
    assert [m.step for m in history.items] == [1]


def test_an_end_run_refused_as_the_run_is_deleted_leaves_the_end_recorded_before_it(
    service, gateway, deliveries_open, run_id
):
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    service.end_run_with_pending(run_id, RunStatus.FINISHED, end_time_ms=5_000)
    gateway.delete_run(run_id)  # in MLflow, while the backlog waits
    with pytest.raises(FailedPreconditionError):
        service.end_run_with_pending(run_id, RunStatus.FAILED, end_time_ms=6_000)
    end = service._ingest.end_of(run_id)
    assert end is not None and (end.status, end.end_time_ms) == ("FINISHED", 5_000)
    deliveries_open.set()


def test_end_run_while_mlflow_is_down_answers_only_what_it_knows(
    service, gateway, deliveries_open, run_id
):
    # MLflow's view of the run is unknown: the answer claims neither its experiment nor
    # that it is active (it may have been deleted meanwhile).
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    gateway.outage()
    run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
    assert pending == 1
    assert run.info.run_id == run_id and run.info.status is RunStatus.RUNNING
    assert run.info.lifecycle_stage is LifecycleStage.UNKNOWN
    assert run_to_pb(run).info.lifecycle_stage == pb.LIFECYCLE_STAGE_UNSPECIFIED
    assert run_from_pb(run_to_pb(run)).info.lifecycle_stage is LifecycleStage.UNKNOWN
    gateway.recover()
    deliveries_open.set()


def test_end_run_may_wait_for_delivery_within_its_deadline(
    service, gateway, deliveries_open, run_id
):
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    with call_deadline.deadline_scope(0.3), pytest.raises(DeadlineExceededError) as err:
        service.end_run_with_pending(run_id, wait_for_delivery=True)
    assert err.value.reason == "RUN_END_PENDING"
    deliveries_open.set()
    with call_deadline.deadline_scope(5):
        run, _ = service.end_run_with_pending(run_id, wait_for_delivery=True)
        assert run.info.status is RunStatus.FINISHED


def test_end_run_waiting_for_delivery_is_bounded_by_its_deadline_not_the_flush_timeout(
    gateway, deliveries_open, tmp_path
):
    # spool.flush_timeout_s is FlushMetrics' default wait; EndRun's wait is its deadline's.
    with tracking_service_on(gateway, tmp_path, flush_timeout_s=0.05) as (service, _):
        run_id = service.start_run(service.create_experiment("exp").experiment_id).run_id
        deliveries_open.clear()
        service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
        opening = threading.Timer(0.5, deliveries_open.set)
        opening.start()
        try:
            with call_deadline.deadline_scope(60):
                run, pending = service.end_run_with_pending(run_id, wait_for_delivery=True)
        finally:
            opening.cancel()
        assert run.info.status is RunStatus.FINISHED
        assert pending == 0


def test_end_run_waiting_for_delivery_follows_points_mlflow_refused_as_invalid(
    service, gateway, deliveries_open, run_id
):
    # Refused as invalid, a batch is dead-lettered alone: the run is there, so the end is
    # applied after the rest, and FlushMetrics counts what MLflow did not take.
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "bad", 1.0, 1_000, 1)])
    gateway.fail("log_metrics", InvalidArgumentError("metrics", "refused"), times=1)
    deliveries_open.set()
    with call_deadline.deadline_scope(30):
        run, pending = service.end_run_with_pending(run_id, wait_for_delivery=True)
    assert (run.info.status, pending) == (RunStatus.FINISHED, 0)
    flushed = service.flush_metrics(run_id, timeout_s=0)
    assert (flushed.dead_letter_points, flushed.held_run_ends) == (1, 0)


def test_end_run_waiting_for_delivery_says_when_mlflow_refused_the_run_for_good(
    service, gateway, run_id, monkeypatch
):
    checked = threading.Event()
    checking = service._require_active

    def check_then_let_the_backlog_go(run: str):
        answer = checking(run)
        checked.set()
        return answer

    def delete_the_run_once_checked() -> None:
        checked.wait(30)
        gateway.delete_run(run_id)  # deleted in MLflow while its backlog is delivered

    monkeypatch.setattr(service, "_require_active", check_then_let_the_backlog_go)
    gateway.on_call("log_metrics", delete_the_run_once_checked)
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    with call_deadline.deadline_scope(30), pytest.raises(FailedPreconditionError) as err:
        service.end_run_with_pending(run_id, wait_for_delivery=True)
    assert err.value.reason == "RUN_END_HELD"
    assert err.value.metadata == {"dead_letter_points": "1"}
    assert "spool requeue" in err.value.message
    flushed = service.flush_metrics(run_id, timeout_s=0)
    assert (flushed.dead_letter_points, flushed.held_run_ends) == (1, 1)

    # Ended again while MLflow cannot be reached: the call fails, and the held end stays
    # as it was, waiting for requeue, not for the deliverer (which would apply it before
    # the run's dead letters once MLflow has the run again).
    gateway.fail("get_run", UnavailableError("MLflow is down"), times=None)
    gateway.fail("end_run", UnavailableError("MLflow is down"), times=None)
    with pytest.raises(UnavailableError):
        service.end_run_with_pending(run_id, status=RunStatus.FAILED)
    flushed = service.flush_metrics(run_id, timeout_s=0)
    assert (flushed.held_run_ends, flushed.pending_run_ends) == (1, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"filter_string": "x" * 10_001}, "filter"),
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
    ],
)
def test_search_validation(service, kwargs, field):
    with pytest.raises(InvalidArgumentError) as err:
        service.search_experiments(**kwargs)
    assert err.value.field == field


# -- deleted experiments ------------------------------------------------------------------


def test_create_on_the_name_of_a_deleted_experiment_names_the_way_out(service, gateway):
    deleted = service.create_experiment("gone")
    service.delete_experiment(deleted.experiment_id)
    for get_if_exists in (False, True):
        with pytest.raises(FailedPreconditionError) as err:
            service.create_experiment("gone", get_if_exists=get_if_exists)
        assert err.value.reason == "EXPERIMENT_NOT_ACTIVE"
        assert err.value.metadata == {"experiment_id": deleted.experiment_id}
        assert "RestoreExperiment" in err.value.message
        assert deleted.experiment_id in err.value.message
        assert "another name" in err.value.message
    restored = service.restore_experiment(deleted.experiment_id)
    assert service.create_experiment("gone", get_if_exists=True) == restored


def test_delete_and_restore_check_their_ids(service):
    for call in (service.delete_experiment, service.restore_experiment):
        with pytest.raises(InvalidArgumentError) as err:
            call("")
        assert err.value.field == "experiment_id"
    for call in (service.delete_run, service.restore_run):
        with pytest.raises(InvalidArgumentError) as err:
            call(" ")
        assert err.value.field == "run_id"


def test_a_deleted_run_refuses_writes_until_restored(service, run_id):
    service.delete_run(run_id)
    with pytest.raises(FailedPreconditionError):
        service.log_params(run_id, {"lr": "1"})
    restored = service.restore_run(run_id)
    assert restored.info.lifecycle_stage.name == "ACTIVE"
    service.log_params(run_id, {"lr": "1"})


@pytest.mark.parametrize("key", ["mlflow_sidecar.request_id", "mlflow_sidecar.anything"])
def test_the_sidecars_own_tag_keys_are_refused_on_every_tag_path(service, gateway, key):
    experiment_id = service.create_experiment("tags").experiment_id
    run_id = service.start_run(experiment_id).info.run_id
    calls = {
        "tags": lambda: service.create_experiment("other", tags={key: "x"}),
        "tags.key": lambda: service.set_run_tags(run_id, {"ok": "1", key: "x"}),
        "key": lambda: service.delete_run_tag(run_id, key),
    }
    for field, call in calls.items():
        with pytest.raises(InvalidArgumentError, match="the sidecar's own") as err:
            call()
        assert err.value.field.startswith(field.split(".")[0])
    assert "ok" not in service.get_run(run_id).tags


def test_a_start_run_id_found_on_a_run_of_another_name_is_refused(service, gateway):
    # The ledger (in front of the service) forgot the id: its tag still tells the calls apart.
    experiment_id = service.create_experiment("reuse").experiment_id
    first = service.start_run(experiment_id, run_name="ppo-1", request_id="rid-1")
    again = service.start_run(experiment_id, run_name="ppo-1", request_id="rid-1")
    assert again.info.run_id == first.info.run_id
    with pytest.raises(InvalidArgumentError) as err:
        service.start_run(experiment_id, run_name="ppo-2", request_id="rid-1")
    assert (err.value.reason, err.value.field) == ("REQUEST_ID_REUSED", "request_id")
    unnamed = service.start_run(experiment_id, client_request_id="rid-1")
    assert unnamed.info.run_id == first.info.run_id
    assert len(gateway.runs) == 1


def test_a_resumed_run_is_running_again_keeps_its_end_time_and_takes_points(
    service, gateway, run_id
):
    service.end_run_with_pending(run_id, RunStatus.KILLED, end_time_ms=5_000)
    resumed = service.resume_run(run_id)
    assert (resumed.info.status, resumed.info.end_time_ms) == (RunStatus.RUNNING, 5_000)
    service.log_metrics(run_id, [Metric("loss", 1.0, 1_000, 1)])
    service.enqueue_metrics([MetricPoint(run_id, "loss", 0.5, 2_000, 2)])
    run, _ = service.end_run_with_pending(run_id, RunStatus.FINISHED, wait_for_delivery=True)
    assert run.info.status is RunStatus.FINISHED
    history = gateway.get_metric_history(run_id, "loss", page_size=10, page_token="")
    assert [m.step for m in history.items] == [1, 2]


def test_resuming_twice_or_a_running_run_changes_nothing(service, gateway, run_id):
    assert service.resume_run(run_id).info.status is RunStatus.RUNNING
    service.end_run_with_pending(run_id)
    calls = gateway.calls["set_running"]
    assert service.resume_run(run_id).info.status is RunStatus.RUNNING
    assert service.resume_run(run_id).info.status is RunStatus.RUNNING
    assert gateway.calls["set_running"] == calls + 1


def test_resume_cancels_an_end_still_waiting_for_its_backlog(service, gateway, run_id):
    refusing = threading.Event()
    refusing.set()

    def refuse_while_set() -> None:
        if refusing.is_set():
            raise UnavailableError("MLflow's log_batch fails for now")

    gateway.on_call("log_metrics", refuse_while_set)
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    _, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
    assert pending == 1
    assert service.resume_run(run_id).info.status is RunStatus.RUNNING
    service.enqueue_metrics([MetricPoint(run_id, "loss", 0.5, 2_000, 2)])
    refusing.clear()
    flushed = service.flush_metrics(run_id, timeout_s=5)
    assert (flushed.pending_points, flushed.pending_run_ends) == (0, 0)
    assert gateway.get_run(run_id).info.status is RunStatus.RUNNING
    history = gateway.get_metric_history(run_id, "loss", page_size=10, page_token="")
    assert [m.step for m in history.items] == [1, 2]


def test_resume_waits_for_an_end_being_applied_so_it_cannot_land_after(service, gateway, run_id):
    applying = threading.Event()
    end_may_go = threading.Event()

    def hold_the_end() -> None:
        applying.set()
        end_may_go.wait(30)

    gateway.on_call("end_run", hold_the_end)
    gateway.on_call("log_metrics", lambda: end_may_go.wait(30))
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    service.end_run_with_pending(run_id, RunStatus.FINISHED)
    end_may_go.set()  # the point goes; the end is applied right after
    gateway.on_call("log_metrics", None)
    end_may_go.clear()
    assert applying.wait(10)
    resumed: list[RunStatus] = []
    resumer = threading.Thread(
        target=lambda: resumed.append(service.resume_run(run_id).info.status)
    )
    resumer.start()
    resumer.join(0.3)
    assert resumer.is_alive(), "resume did not wait for the end being applied"
    end_may_go.set()
    resumer.join(10)
    assert resumed == [RunStatus.RUNNING]
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    assert gateway.get_run(run_id).info.status is RunStatus.RUNNING
    service.enqueue_metrics([MetricPoint(run_id, "loss", 0.5, 2_000, 2)])


def test_resume_that_cannot_wait_for_delivery_changes_nothing(service, gateway, run_id):
    sending = threading.Event()
    deliveries_open = threading.Event()

    def hold_the_send() -> None:
        sending.set()
        deliveries_open.wait(30)

    gateway.on_call("log_metrics", hold_the_send)
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    service.end_run_with_pending(run_id, RunStatus.FINISHED)
    # A worker is sending the run's point (held back): the resume waits for it in vain.
    assert sending.wait(10)
    with call_deadline.deadline_scope(0.3), pytest.raises(DeadlineExceededError):
        service.resume_run(run_id)
    with pytest.raises(FailedPreconditionError) as refused:
        service.enqueue_metrics([MetricPoint(run_id, "loss", 0.5, 2_000, 2)])
    assert refused.value.reason == "RUN_ENDED"
    deliveries_open.set()


def test_resume_refuses_deleted_missing_and_malformed_runs(service, run_id):
    service.delete_run(run_id)
    with pytest.raises(FailedPreconditionError) as deleted:
        service.resume_run(run_id)
    assert deleted.value.reason == ErrorReason.RUN_NOT_ACTIVE
    with pytest.raises(NotFoundError):
        service.resume_run("0" * 32)
    with pytest.raises(InvalidArgumentError) as malformed:
        service.resume_run("")
    assert malformed.value.field == "run_id"


def test_an_end_with_a_backlog_is_recorded_while_mlflow_is_down(service, gateway, run_id):
    gateway.outage()
    service.enqueue_metrics([MetricPoint(run_id, "loss", float(s), 1_000, s) for s in range(5)])
    run, pending = service.end_run_with_pending(run_id, RunStatus.KILLED, end_time_ms=7_000)
    assert (run.run_id, run.info.status, pending) == (run_id, RunStatus.RUNNING, 5)
    with call_deadline.deadline_scope(0.3), pytest.raises(DeadlineExceededError) as waited:
        service.end_run_with_pending(
            run_id, RunStatus.KILLED, end_time_ms=7_000, wait_for_delivery=True
        )
    assert waited.value.reason == "RUN_END_PENDING"
    assert service.flush_metrics(run_id, timeout_s=0).pending_run_ends == 1
    gateway.recover()
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    ended = gateway.get_run(run_id).info
    assert (ended.status, ended.end_time_ms) == (RunStatus.KILLED, 7_000)
    history = gateway.get_metric_history(run_id, "loss", page_size=10, page_token="")
    assert [m.step for m in history.items] == [0, 1, 2, 3, 4]


def test_an_end_without_a_backlog_while_mlflow_is_down_is_recorded_and_applied_later(
    service, gateway, run_id
):
    # As with a backlog: the trainer that ends its run during an outage and exits leaves
    # it ended once MLflow is back.
    gateway.outage()
    run, pending = service.end_run_with_pending(run_id, RunStatus.KILLED, end_time_ms=7_000)
    assert (run.info.run_id, run.info.status, pending) == (run_id, RunStatus.RUNNING, 0)
    assert run.info.lifecycle_stage is LifecycleStage.UNKNOWN
    assert service.flush_metrics(run_id, timeout_s=0).pending_run_ends == 1
    gateway.recover()
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    ended = gateway.get_run(run_id).info
    assert (ended.status, ended.end_time_ms) == (RunStatus.KILLED, 7_000)


def test_points_refused_while_an_end_waited_for_mlflow_are_after_an_end_that_holds(
    service, gateway, run_id
):
    # A point that came while MLflow was asked to end the run was refused as after the
    # end: the end must then take effect, not be taken back when MLflow fails.
    refusals: list[str] = []

    def a_point_arrives_while_mlflow_is_asked() -> None:
        try:
            service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
        except FailedPreconditionError as exc:
            refusals.append(exc.reason)
        raise UnavailableError("MLflow is down")

    gateway.on_call("set_terminated", a_point_arrives_while_mlflow_is_asked)
    run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
    assert (run.info.status, pending) == (RunStatus.RUNNING, 0)
    assert refusals == ["RUN_ENDED"]
    gateway.on_call("set_terminated", None)
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    assert gateway.get_run(run_id).info.status is RunStatus.FINISHED


def test_an_end_with_a_backlog_is_recorded_before_a_hung_mlflow_is_asked(service, gateway, run_id):
    def hung() -> None:
        raise DeadlineExceededError("MLflow did not answer within the call's deadline")

    gateway.on_call("log_metrics", hung)
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    gateway.on_call("get_run", hung)
    run, pending = service.end_run_with_pending(run_id, RunStatus.FAILED, end_time_ms=9_000)
    assert (run.info.status, pending) == (RunStatus.RUNNING, 1)
    gateway.on_call("get_run", None)
    gateway.on_call("log_metrics", None)
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    ended = gateway.get_run(run_id).info
    assert (ended.status, ended.end_time_ms) == (RunStatus.FAILED, 9_000)


def test_an_end_with_a_backlog_answers_while_mlflow_hangs_past_the_deadline(
    service, gateway, deliveries_open, run_id
):
    # MLflow hangs (answers nothing, fails nothing): EndRun answers with the end recorded
    # instead of waiting until its deadline, which the trainer would read as a failure.
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    released = threading.Event()
    finished: list[bool] = []

    def hangs() -> None:
        released.wait(30)
        finished.append(True)

    gateway.on_call("get_run", hangs)
    try:
        with call_deadline.deadline_scope(30):
            run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
        assert not finished  # answered while MLflow was still hung
        assert (run.info.run_id, run.info.status, pending) == (run_id, RunStatus.RUNNING, 1)
    finally:
        released.set()
        gateway.on_call("get_run", None)
        deliveries_open.set()
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0
    assert gateway.get_run(run_id).info.status == RunStatus.FINISHED


def test_an_end_with_a_backlog_of_a_deleted_run_is_refused_and_not_recorded(
    service, gateway, deliveries_open, run_id
):
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    service.delete_run(run_id)
    with pytest.raises(FailedPreconditionError) as deleted:
        service.end_run_with_pending(run_id)
    assert deleted.value.reason == ErrorReason.RUN_NOT_ACTIVE
    assert service.flush_metrics(run_id, timeout_s=0).pending_run_ends == 0
    deliveries_open.set()


def test_points_arriving_while_an_end_without_backlog_reaches_mlflow_are_refused(
    service, gateway, run_id
):
    # Once EndRun found no backlog, a point that got in before MLflow ended the run would
    # land after the end, uncounted by the answer's pending_points.
    refusals: list[str] = []

    def a_point_arrives() -> None:
        try:
            service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
        except FailedPreconditionError as exc:
            refusals.append(exc.reason)

    gateway.on_call("set_terminated", a_point_arrives)
    run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
    assert (run.info.status, pending) == (RunStatus.FINISHED, 0)
    assert refusals == ["RUN_ENDED"]
    assert service.flush_metrics(run_id, timeout_s=0).pending_points == 0


def test_an_end_that_mlflow_refused_leaves_the_run_taking_points(service, gateway, run_id):
    gateway.fail("set_terminated", FailedPreconditionError("the run is not active"), times=1)
    with pytest.raises(FailedPreconditionError):
        service.end_run_with_pending(run_id)
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    assert service.flush_metrics(run_id, timeout_s=5).pending_points == 0


def test_an_earlier_end_stays_recorded_when_a_second_end_fails(service, gateway, run_id):
    service.end_run_with_pending(run_id, RunStatus.FINISHED, end_time_ms=5_000)
    gateway.fail("set_terminated", FailedPreconditionError("the run is not active"), times=1)
    with pytest.raises(FailedPreconditionError):
        service.end_run_with_pending(run_id, RunStatus.KILLED, end_time_ms=6_000)
    with pytest.raises(FailedPreconditionError) as refused:
        service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    assert "FINISHED" in refused.value.message
    assert service.flush_metrics(run_id, timeout_s=0).pending_run_ends == 0


def test_a_second_end_while_the_deliverer_applies_the_first_is_the_one_mlflow_keeps(
    service, gateway, deliveries_open, run_id
):
    # The first end waits for the run's backlog; the deliverer is applying it in MLflow
    # when a second EndRun comes. The second one answered, so it is the run's status.
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    assert service.end_run_with_pending(run_id, RunStatus.FINISHED, end_time_ms=5_000)[1] == 1
    applying, landing = threading.Event(), threading.Event()
    gateway.on_call("end_run", lambda: (applying.set(), landing.wait(30)))
    deliveries_open.set()
    assert applying.wait(10)
    answered: list[RunStatus] = []

    def end_again() -> None:
        with call_deadline.deadline_scope(30):
            run, _ = service.end_run_with_pending(run_id, RunStatus.FAILED, end_time_ms=6_000)
        answered.append(run.info.status)

    second = threading.Thread(target=end_again)
    second.start()
    second.join(2)  # time for the second end to land, had it gone ahead of the first
    landing.set()
    second.join(30)
    assert wait_until(lambda: gateway.in_flight["end_run"] == 0)  # the first end landed
    assert answered == [RunStatus.FAILED]
    stored = gateway.get_run(run_id).info
    assert (stored.status, stored.end_time_ms) == (RunStatus.FAILED, 6_000)
    assert service.flush_metrics(run_id, timeout_s=5).pending_run_ends == 0


def test_a_run_ended_with_a_backlog_then_deleted_is_ended_when_restored(
    service, gateway, deliveries_open, run_id
):
    # As in MLflow: end, delete, restore leaves the run ended, not RUNNING.
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    _, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED, end_time_ms=5_000)
    assert pending == 1
    service.delete_run(run_id)
    assert service.flush_metrics(run_id, timeout_s=0).pending_run_ends == 0
    deliveries_open.set()
    flushed = service.flush_metrics(run_id, timeout_s=5)
    assert (flushed.pending_points, flushed.dead_letter_points) == (0, 1)
    restored = service.restore_run(run_id).info
    assert (restored.status, restored.end_time_ms) == (RunStatus.FINISHED, 5_000)


def test_a_param_another_call_logged_meanwhile_is_a_changed_param(service, gateway, run_id):
    # Two ranks log one new param with different values at once: the one MLflow refuses
    # hears what a call after the other hears.
    def the_other_call_first() -> None:
        gateway.on_call("log_batch", None)
        gateway.log_batch(run_id, params={"seed": "1"})

    gateway.on_call("log_batch", the_other_call_first)
    with pytest.raises(FailedPreconditionError) as refused:
        service.log_params(run_id, {"seed": "2"})
    assert refused.value.reason == "PARAM_VALUE_CHANGED"
    assert refused.value.metadata["key"] == "seed"
    assert gateway.get_run(run_id).params == {"seed": "1"}


def test_an_end_with_a_backlog_asks_a_hung_mlflow_once_not_once_per_question(
    service, gateway, deliveries_open, run_id
):
    # The answer waits for MLflow one short while in all, not a while per question.
    deliveries_open.clear()
    service.enqueue_metrics([MetricPoint(run_id, "loss", 1.0, 1_000, 1)])
    gateway.slow("get_run", 3)
    asked_before = gateway.calls["get_run"]
    with call_deadline.deadline_scope(0.4):
        run, pending = service.end_run_with_pending(run_id, RunStatus.FINISHED)
    assert (run.info.status, pending) == (RunStatus.RUNNING, 1)
    assert gateway.calls["get_run"] - asked_before == 1
    gateway.slow("get_run", 0)
    deliveries_open.set()
