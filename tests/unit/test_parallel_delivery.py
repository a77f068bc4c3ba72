"""The deliverer's workers: runs in parallel, and one run's series in parallel, each series'
batches one at a time and in order, one backoff for all of them, nothing lost when they
stop mid-batch."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from mlflow_sidecar.core.domain import Metric, MetricPoint
from mlflow_sidecar.core.errors import InvalidArgumentError, UnavailableError
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.spool.deliverer import LogBatch, MetricDeliverer
from mlflow_sidecar.server.spool.delivery_concurrency import DeliveryConcurrency
from mlflow_sidecar.server.spool.shared_backoff import SharedBackoff
from mlflow_sidecar.server.spool.store import SpoolStore, plan_batches
from tests.fakes.mlflow_port import FakeMlflow
from tests.unit.test_spool import delivered, events, fail_next, fake_mlflow, points

# Only a safety net for a broken deliverer: no test waits this long when it passes.
HANG_S = 30
EndRun = Callable[[str, str, int], None]


@pytest.fixture()
def store(tmp_path):
    s = SpoolStore(tmp_path / "spool.db", max_points=10_000, chunk_points=100)
    yield s
    s.close()


def deliverer_for(
    store: SpoolStore,
    log_batch: LogBatch,
    mlflow: FakeMlflow,
    workers: int,
    backoff: SharedBackoff | None = None,
    concurrency: DeliveryConcurrency | None = None,
    metrics: SidecarMetrics | None = None,
) -> MetricDeliverer:
    return MetricDeliverer(
        store,
        log_batch,
        batch_size=100,
        backoff_factor_s=0.01,
        max_backoff_s=0.02,
        workers=workers,
        end_run=mlflow.end_run,
        backoff=backoff,
        concurrency=concurrency,
        metrics=metrics,
    )


def deliver_everything(
    store: SpoolStore,
    log_batch: LogBatch,
    mlflow: FakeMlflow,
    workers: int,
    concurrency: DeliveryConcurrency | None = None,
) -> None:
    """Run a deliverer until the spool is empty."""
    deliverer = deliverer_for(store, log_batch, mlflow, workers, concurrency=concurrency)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("", HANG_S) == 0
    finally:
        deliverer.stop()


class FirstBatches:
    """A `log_batch` whose first call for each of the first `parties` runs waits until all
    of them have called, then goes on to MLflow; other calls go straight through."""

    def __init__(self, mlflow: FakeMlflow, parties: int) -> None:
        self.mlflow = mlflow
        self.parties = parties
        self.arrived = threading.Barrier(parties, timeout=HANG_S)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def first(self, run_id: str) -> bool:
        """True for the first call of one of the first `parties` runs."""
        with self._lock:
            fresh = run_id not in self._seen and len(self._seen) < self.parties
            self._seen.add(run_id)
            return fresh

    def __call__(self, run_id: str, metrics: Sequence[Metric]) -> None:
        if self.first(run_id):
            self.arrived.wait()
        self.mlflow.log_metrics(run_id, metrics)


def test_batches_of_different_runs_are_in_flight_at_once(store):
    runs = ["a", "b", "c"]
    mlflow = fake_mlflow(*runs)
    for run in runs:
        store.append(points(run, 150))
    # Each run's first batch waits for the other two: only parallel delivery gets past it.
    log_batch = FirstBatches(mlflow, parties=3)
    deliver_everything(store, log_batch, mlflow, workers=3)
    assert not log_batch.arrived.broken
    for run in runs:
        assert [m.step for m in delivered(mlflow, run)] == list(range(150))


class InFlight:
    """A `log_batch` that counts the calls under way, in all and per run, around `inner`."""

    def __init__(self, inner: LogBatch) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.most = 0
        self.most_per_run = 0

    def __call__(self, run_id: str, metrics: Sequence[Metric]) -> None:
        with self._lock:
            self.now[run_id] += 1
            self.most = max(self.most, self.now.total())
            self.most_per_run = max(self.most_per_run, self.now[run_id])
        try:
            self.inner(run_id, metrics)
        finally:
            with self._lock:
                self.now[run_id] -= 1


def test_workers_never_exceed_their_number(store):
    runs = [f"r{i}" for i in range(6)]
    mlflow = fake_mlflow(*runs)
    mlflow.slow("log_metrics", 0.002)  # calls long enough to overlap
    for start in (0, 150, 300):
        for run in runs:
            store.append(points(run, 150, start=start))
    log_batch = InFlight(FirstBatches(mlflow, parties=3))
    deliver_everything(store, log_batch, mlflow, workers=3)
    assert log_batch.most == 3  # reached (the first three met), never passed
    for run in runs:
        assert [m.step for m in delivered(mlflow, run)] == list(range(450))


def test_a_runs_batches_go_one_at_a_time_and_in_order(store):
    mlflow = fake_mlflow("a", "b")
    store.append(points("a", 250))
    store.append(points("b", 500))
    held = FirstBatches(mlflow, parties=1)

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        if run_id == "a" and held.first(run_id):
            # "a"'s first batch stays in flight while the other worker, free, delivers
            # every batch of "b" and looks for more work in between.
            assert deliverer.wait_delivered("b", HANG_S) == 0
        mlflow.log_metrics(run_id, metrics)

    counted = InFlight(log_batch)
    deliverer = deliverer_for(store, counted, mlflow, workers=2)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("", HANG_S) == 0
    finally:
        deliverer.stop()
    assert counted.most_per_run == 1
    assert [m.step for m in delivered(mlflow, "a")] == list(range(250))
    assert [m.step for m in delivered(mlflow, "b")] == list(range(500))


class GatedBackoff(SharedBackoff):
    """A shared backoff of a minute on a clock the test moves: its wait ends only when the
    test opens the gate. Counts the workers that sit in it."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(60.0, 60.0, jitter=lambda step: step, clock=lambda: self.now)
        self.gate = threading.Event()
        self.failure = threading.Event()
        self.waiting: set[str] = set()
        self.changed = threading.Condition()

    def failed(self, ticket: int) -> float | None:
        wait = super().failed(ticket)
        self.failure.set()
        return wait

    def pause(self, seconds: float, stop: threading.Event) -> None:
        with self.changed:
            self.waiting.add(threading.current_thread().name)
            self.changed.notify_all()
        self.gate.wait(HANG_S)

    def open(self) -> None:
        self.now += 60.0
        self.gate.set()


def test_mlflow_pushing_back_on_one_worker_makes_every_worker_wait(store):
    runs = ["a", "b", "c", "d"]
    mlflow = fake_mlflow(*runs)
    for run in runs:
        store.append(points(run, 200))
    gated = GatedBackoff()
    arrived = FirstBatches(mlflow, parties=4)

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        if arrived.first(run_id):
            arrived.arrived.wait()
            if run_id == "a":
                raise UnavailableError("MLflow asks to slow down")
            # The other three answer after MLflow turned "a" away.
            assert gated.failure.wait(HANG_S)
        mlflow.log_metrics(run_id, metrics)

    deliverer = deliverer_for(store, log_batch, mlflow, workers=4, backoff=gated)
    deliverer.start()
    try:
        with gated.changed:
            assert gated.changed.wait_for(lambda: len(gated.waiting) == 4, HANG_S)
        # Every worker waits; only the batches under way when "a" failed went through.
        assert sorted(call["run_id"] for call in mlflow.effects("log_metrics")) == [
            "b",
            "c",
            "d",
        ]
        gated.open()
        assert deliverer.wait_delivered("", HANG_S) == 0
    finally:
        deliverer.stop()
    for run in runs:
        assert [m.step for m in delivered(mlflow, run)] == list(range(200))  # once each


def test_failures_of_sends_under_way_together_lengthen_the_backoff_once():
    backoff = SharedBackoff(1.0, 8.0, jitter=lambda step: step, clock=lambda: 0.0)
    together = backoff.ticket()
    assert backoff.failed(together) == 1.0
    assert backoff.failed(together) is None  # the same outage, seen by another worker
    assert backoff.failed(backoff.ticket()) == 2.0
    assert backoff.failed(backoff.ticket()) == 4.0
    backoff.succeeded()
    assert backoff.failed(backoff.ticket()) == 1.0


def test_each_run_ends_after_its_own_last_point(store):
    runs = ["r0", "r1", "r2", "r3"]
    mlflow = fake_mlflow(*runs)
    for run in runs:
        store.append(points(run, 250))
        store.record_end(run, "FINISHED", 7_000, applied=False)
    deliverer = deliverer_for(store, mlflow.log_metrics, mlflow, workers=4)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("", HANG_S) == 0
        for run in runs:
            assert deliverer.wait_delivered(run, HANG_S) == 0
    finally:
        deliverer.stop()
    for run in runs:
        of_run = [e for e in events(mlflow) if e[1] == run]
        assert of_run == [
            ("batch", run, 100),
            ("batch", run, 100),
            ("batch", run, 50),
            ("end", run, "FINISHED", 7_000),
        ]


def test_stopping_while_workers_are_mid_batch_loses_nothing(store):
    runs = ["a", "b", "c"]
    mlflow = fake_mlflow(*runs)
    for run in runs:
        store.append(points(run, 250))
    # The test is a party too: it knows when all three first batches are under way.
    under_way = threading.Barrier(4, timeout=HANG_S)
    finish = threading.Event()
    held = FirstBatches(mlflow, parties=3)

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        if held.first(run_id):
            under_way.wait()
            assert finish.wait(HANG_S)
        mlflow.log_metrics(run_id, metrics)

    deliverer = deliverer_for(store, log_batch, mlflow, workers=3)
    deliverer.start()
    under_way.wait()
    deliverer.stop(timeout_s=0)  # asked to stop while the three batches are in flight
    finish.set()
    deliverer.stop(timeout_s=HANG_S)
    # The batches in flight were confirmed and forgotten; no other batch was begun.
    assert len(mlflow.effects("log_metrics")) == 3
    assert store.pending() == 3 * 150

    again = deliverer_for(store, mlflow.log_metrics, mlflow, workers=3)
    again.start()
    try:
        assert again.wait_delivered("", HANG_S) == 0
    finally:
        again.stop()
    for run in runs:
        assert [m.step for m in delivered(mlflow, run)] == list(range(250))


def test_a_flush_of_every_run_waits_for_the_ends_that_follow_their_points(store):
    mlflow = fake_mlflow("r0")
    store.append(points("r0", 250))
    store.record_end("r0", "KILLED", 7_000, applied=False)
    gate = threading.Event()
    ended: list[str] = []

    def end_run(run_id: str, status: str, end_time_ms: int) -> None:
        assert gate.wait(HANG_S)
        ended.append(run_id)

    deliverer = ending_deliverer(store, mlflow, end_run)
    deliverer.start()
    try:
        waiter = threading.Thread(target=deliverer.wait_delivered, args=("", HANG_S))
        waiter.start()
        waiter.join(1.0)
        # Every point may be in MLflow by now; the end is not, so the flush still waits.
        assert waiter.is_alive()
        gate.set()
        waiter.join(HANG_S)
        assert not waiter.is_alive()
        assert ended == ["r0"]
    finally:
        gate.set()
        deliverer.stop()


@pytest.mark.parametrize("run_id", ["r0", ""])
def test_a_flush_that_times_out_before_an_end_is_applied_is_not_complete(store, run_id):
    from mlflow_sidecar.server.services.metric_ingest import MetricIngest

    mlflow = fake_mlflow("r0")
    store.append(points("r0", 250))
    store.record_end("r0", "KILLED", 7_000, applied=False)
    gate = threading.Event()

    def end_run(run_id: str, status: str, end_time_ms: int) -> None:
        assert gate.wait(HANG_S)

    deliverer = ending_deliverer(store, mlflow, end_run)
    ingest = MetricIngest(store, deliverer, flush_timeout_s=HANG_S)
    deliverer.start()
    try:
        # Every point reaches MLflow; the end waits at the gate, past the flush's budget.
        deadline = time.monotonic() + HANG_S
        while store.pending("r0") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.pending("r0") == 0
        result = ingest.flush(run_id, timeout_s=0.3)
        assert (result.pending_points, result.pending_run_ends) == (0, 1)
        assert not result.complete
        gate.set()
        after = ingest.flush(run_id, timeout_s=HANG_S)
        assert (after.pending_points, after.pending_run_ends, after.complete) == (0, 0, True)
    finally:
        gate.set()
        deliverer.stop()


def ending_deliverer(store: SpoolStore, mlflow: FakeMlflow, end_run: EndRun) -> MetricDeliverer:
    """Two workers in batches of 100 over `mlflow`, ending runs with `end_run`."""
    return MetricDeliverer(
        store,
        mlflow.log_metrics,
        batch_size=100,
        backoff_factor_s=0.01,
        max_backoff_s=0.05,
        workers=2,
        end_run=end_run,
    )


# -- one run's series in parallel ------------------------------------------------------


def series(run_id: str, key: str, n: int, start: int = 0) -> MetricBatch:
    """One message with `n` points of one series (a run and key), steps from `start`."""
    return MetricBatch.from_points(
        MetricPoint(run_id, key, float(i), 1_000 + i, i) for i in range(start, start + n)
    )


def steps(mlflow: FakeMlflow, run_id: str, key: str) -> list[int]:
    """A series' steps in the order MLflow took them."""
    return [m.step for m in delivered(mlflow, run_id) if m.key == key]


def test_plan_keeps_series_apart_and_none_ahead_of_its_earlier_points():
    chunks = [(1, 60, "a"), (2, 60, "b"), (3, 60, "a"), (4, 10, "a\nb"), (5, 10, "c")]
    assert plan_batches(chunks, limit=100, most=3) == [[1, 5], [2]]
    # One batch per call, as before: the oldest chunk first, then what fits.
    assert plan_batches(chunks, limit=100, most=1) == [[1, 5]]
    assert plan_batches(chunks, limit=1000, most=3) == [[1, 2, 3, 4, 5]]


def test_chunks_that_mix_series_never_go_in_parallel():
    chunks = [(i, 50, "a\nb") for i in range(1, 9)]
    assert plan_batches(chunks, limit=100, most=4) == [[1, 2]]


@pytest.mark.parametrize("seed", range(200))
def test_no_plan_lets_a_series_overtake_itself(seed):
    rng = random.Random(seed)
    keys = ["a", "b", "c", "d"]
    chunks = [
        (i, rng.randint(1, 120), "\n".join(sorted(rng.sample(keys, rng.choice([1, 1, 1, 2])))))
        for i in range(1, rng.randint(2, 30))
    ]
    limit, most = rng.choice([50, 100, 300]), rng.randint(1, 4)
    plan = plan_batches(chunks, limit, most)
    assert plan and plan[0][0] == 1 and len(plan) <= most
    batch_of = {chunk_id: n for n, batch in enumerate(plan) for chunk_id in batch}
    for batch in plan:
        assert batch == sorted(batch)
        assert len(batch) == 1 or sum(c[1] for c in chunks if c[0] in batch) <= limit
    for key in keys:
        with_key = [c[0] for c in chunks if key in c[2].split("\n")]
        sent = [chunk_id for chunk_id in with_key if chunk_id in batch_of]
        # What goes now is the series' oldest chunks, all in one batch (in order there).
        assert sent == with_key[: len(sent)]
        assert len({batch_of[chunk_id] for chunk_id in sent}) <= 1


def test_the_series_of_one_run_are_in_flight_at_once(store):
    mlflow = fake_mlflow("a")
    for key in ("loss", "reward", "entropy"):
        store.append(series("a", key, 300))
    # The first two calls wait for each other: only batches of one run sent at once pass.
    met = threading.Barrier(2, timeout=HANG_S)
    calls = Counter[str]()

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        calls["all"] += 1
        if calls["all"] <= 2:
            met.wait()
        mlflow.log_metrics(run_id, metrics)

    counted = InFlight(log_batch)
    deliver_everything(store, counted, mlflow, workers=3)
    assert not met.broken
    assert 2 <= counted.most_per_run <= 3
    for key in ("loss", "reward", "entropy"):
        assert steps(mlflow, "a", key) == list(range(300))
    assert len(delivered(mlflow, "a")) == 900  # each point once


def test_a_runs_mixed_messages_go_one_batch_at_a_time(store):
    mlflow = fake_mlflow("a")
    mlflow.slow("log_metrics", 0.002)
    for start in range(0, 600, 100):
        store.append(
            MetricBatch.from_points(
                MetricPoint("a", key, float(i), 1_000 + i, i)
                for i in range(start, start + 100)
                for key in ("loss", "reward")
            )
        )
    counted = InFlight(mlflow.log_metrics)
    deliver_everything(store, counted, mlflow, workers=4)
    assert counted.most_per_run == 1
    assert steps(mlflow, "a", "loss") == steps(mlflow, "a", "reward") == list(range(600))


def test_a_series_that_fails_is_sent_again_alone_and_the_others_once(store):
    mlflow = fake_mlflow("a")
    for start in (0, 100, 200):
        for key in ("loss", "reward"):
            store.append(series("a", key, 100, start))
    failed = threading.Event()
    sent = Counter[str]()
    lock = threading.Lock()

    def log_batch(run_id: str, metrics: Sequence[Metric]) -> None:
        with lock:
            first_reward = metrics[0].key == "reward" and not failed.is_set()
            failed.set() if first_reward else None
        if first_reward:
            raise UnavailableError("MLflow is restarting")
        with lock:
            sent.update(m.key for m in metrics)
        mlflow.log_metrics(run_id, metrics)

    deliver_everything(store, log_batch, mlflow, workers=2)
    assert failed.is_set()
    assert steps(mlflow, "a", "loss") == steps(mlflow, "a", "reward") == list(range(300))
    assert sent == {"loss": 300, "reward": 300}


def test_slots_taken_for_one_runs_series_never_exceed_the_workers(store):
    runs = ["a", "b"]
    mlflow = fake_mlflow(*runs)
    mlflow.slow("log_metrics", 0.003)
    for run in runs:
        for key in ("k1", "k2", "k3", "k4", "k5"):
            store.append(series(run, key, 250))
    counted = InFlight(mlflow.log_metrics)
    deliver_everything(store, counted, mlflow, workers=3)
    assert counted.most <= 3
    for run in runs:
        for key in ("k1", "k2", "k3", "k4", "k5"):
            assert steps(mlflow, run, key) == list(range(250))


class Recorded(DeliveryConcurrency):
    """The deliverer's slots, recording how each call ended."""

    def __init__(self, most: int) -> None:
        super().__init__(most)
        self.ends: list[tuple[int, bool]] = []
        self._ends_lock = threading.Lock()

    def sent(self, points: int, *, pushed_back: bool = False) -> None:
        with self._ends_lock:
            self.ends.append((points, pushed_back))
        super().sent(points, pushed_back=pushed_back)


def test_the_limit_learns_of_every_confirmed_point_and_every_push_back(store):
    runs = ["a", "b"]
    mlflow = fake_mlflow(*runs)
    for run in runs:
        store.append(points(run, 300))
    fail_next(mlflow, UnavailableError("busy"))
    slots = Recorded(2)
    deliver_everything(store, mlflow.log_metrics, mlflow, workers=2, concurrency=slots)
    assert sum(points for points, _ in slots.ends) == 600
    assert [pushed for _, pushed in slots.ends].count(True) == 1


def test_a_refusal_for_good_is_not_a_push_back(store):
    mlflow = fake_mlflow("a")
    store.append(points("a", 100))
    fail_next(mlflow, InvalidArgumentError("", "bad point"))
    slots = Recorded(2)
    deliver_everything(store, mlflow.log_metrics, mlflow, workers=2, concurrency=slots)
    assert slots.ends == [(0, False)]
    assert slots.limit == 2


def test_a_lowered_limit_holds_the_workers_to_it(store):
    runs = [f"r{i}" for i in range(4)]
    mlflow = fake_mlflow(*runs)
    mlflow.slow("log_metrics", 0.002)  # calls long enough to overlap
    for run in runs:
        store.append(points(run, 400))
    slots = DeliveryConcurrency(4)
    assert slots.try_acquire()
    slots.sent(0, pushed_back=True)  # MLflow pushed back: two calls at most
    counted = InFlight(mlflow.log_metrics)
    deliver_everything(store, counted, mlflow, workers=4, concurrency=slots)
    assert counted.most <= 2
    for run in runs:
        assert [m.step for m in delivered(mlflow, run)] == list(range(400))


def test_more_calls_in_flight_than_workers_is_refused(store):
    with pytest.raises(ValueError, match="need as many workers"):
        deliverer_for(
            store, fake_mlflow().log_metrics, fake_mlflow(), 2, concurrency=DeliveryConcurrency(3)
        )


def test_the_limit_in_force_is_published(store):
    metrics = SidecarMetrics()
    slots = DeliveryConcurrency(3)
    mlflow = fake_mlflow()
    deliverer_for(store, mlflow.log_metrics, mlflow, 3, concurrency=slots, metrics=metrics)
    assert metrics.registry.get_sample_value("mlflow_sidecar_delivery_calls_limit") == 3
    assert slots.try_acquire()
    slots.sent(0, pushed_back=True)
    assert metrics.registry.get_sample_value("mlflow_sidecar_delivery_calls_limit") == 1


def test_the_deliverers_retries_are_counted_with_the_other_mlflow_retries(store):
    metrics = SidecarMetrics()
    mlflow = fake_mlflow("a")
    store.append(points("a", 150))
    mlflow.outage()
    deliverer = deliverer_for(store, mlflow.log_metrics, mlflow, 2, metrics=metrics)
    deliverer.start()
    try:
        assert deliverer.wait_delivered("a", 0.5) > 0
        retries = metrics.registry.get_sample_value("mlflow_sidecar_mlflow_retries_total")
        assert retries is not None and retries >= 1
        mlflow.recover()
        assert deliverer.wait_delivered("a", HANG_S) == 0
    finally:
        deliverer.stop()
