"""`MetricStream.log` takes no lock: points logged from many threads while batches are
cut (by the sender, while they are appended) all arrive, once, with their fields
together; and a sender that fell behind catches up in few messages, each within the size
limit and shared among the runs and keys."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.core.errors import FailedPreconditionError
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.support.metric_messages import points_of


class _CollectingCall:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.messages: list[pb.StreamMetricsRequest] = []
        self._gate = gate

    def with_call(
        self, requests: Iterator[pb.StreamMetricsRequest], timeout: float | None = None, **_: object
    ) -> tuple[pb.StreamMetricsResponse, None]:
        if self._gate is not None:
            self._gate.wait()
        batch = list(requests)
        self.messages.extend(batch)
        accepted = sum(len(s.values) for m in batch for s in m.series)
        return pb.StreamMetricsResponse(accepted_points=accepted), None


class _Stub:
    def __init__(self, gate: threading.Event | None = None) -> None:
        self.StreamMetrics = _CollectingCall(gate)


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    # Threads switch every microsecond, so cuts land between any two steps of a log().
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("tiny_switch_interval")
def test_points_from_many_threads_arrive_once_with_their_fields_together() -> None:
    stub = _Stub()
    # Small batches and a 1 ms age: cuts race the appends all the time.
    stream = MetricStream(stub, max_batch_points=37, max_delay_s=0.001)  # type: ignore[arg-type]
    threads, per_thread = 4, 10_000

    def trainer(t: int) -> None:
        for i in range(per_thread):
            n = t * per_thread + i
            # A key of its own and a key all threads share (one row, appended concurrently).
            key = "shared" if i % 2 else f"own-{t}"
            stream.log("run", key, float(n), step=n, timestamp_ms=n + 1)

    workers = [threading.Thread(target=trainer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert stream.close() == threads * per_thread

    sent = [p for m in stub.StreamMetrics.messages for p in points_of(m)]
    assert sorted(p.step for p in sent) == list(range(threads * per_thread))
    assert all(p.value == p.step and p.timestamp_ms == p.step + 1 for p in sent)
    assert {p.key for p in sent if p.step % per_thread % 2} == {"shared"}
    assert all(p.key == f"own-{p.step // per_thread}" for p in sent if not p.step % per_thread % 2)
    # Each thread's own points keep their order.
    for t in range(threads):
        own = [p.step for p in sent if p.key == f"own-{t}"]
        assert own == sorted(own)


def test_a_sender_that_fell_behind_sends_all_it_missed_in_few_fair_messages() -> None:
    gate = threading.Event()
    stub = _Stub(gate)
    limit = 64 * 1024
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=10,
        max_message_bytes=limit,
        max_buffered_points=100_000,
    )
    keys, per_key = ("reward", "loss", "entropy"), 5000
    for step in range(per_key):  # the sidecar takes nothing meanwhile
        for key in keys:
            stream.log("run", key, float(step), step=step, timestamp_ms=1 + step)
    gate.set()
    assert stream.close() == len(keys) * per_key

    messages = stub.StreamMetrics.messages
    assert all(m.ByteSize() <= limit for m in messages)
    # 15,000 points of at most 28 bytes fill a 64 KiB message about seven times.
    assert 6 <= len(messages) <= 8
    # Every message but the last carries each key's share, so no key waits for another.
    assert all({s.key for s in m.series} == set(keys) for m in messages[:-1])
    for key in keys:
        steps = [step for m in messages for s in m.series if s.key == key for step in s.steps]
        assert steps == list(range(per_key))


def test_more_runs_and_keys_than_a_message_holds_still_fill_messages() -> None:
    gate = threading.Event()
    stub = _Stub(gate)
    limit = 4096
    stream = MetricStream(
        stub,  # type: ignore[arg-type]
        max_batch_points=10,
        max_message_bytes=limit,
        max_buffered_points=100_000,
    )
    keys = [f"layer-{i}/grad-norm" for i in range(500)]
    for step in range(4):
        for key in keys:
            stream.log("run", key, float(step), step=step, timestamp_ms=1 + step)
    gate.set()
    assert stream.close() == 4 * len(keys)

    messages = stub.StreamMetrics.messages
    sizes = [m.ByteSize() for m in messages]
    assert max(sizes) <= limit
    # Full messages, not one series of one point each.
    assert len(messages) <= 2 * (sum(sizes) // limit + 1)
    for key in keys:
        steps = [step for m in messages for s in m.series if s.key == key for step in s.steps]
        assert steps == [0, 1, 2, 3]


class _HeldValue:
    """A metric value whose conversion to float waits for `release`: a `log()` holding
    one has found its buffer and waits, right before it adds the point, for as long as
    the test wants."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.reached = threading.Event()
        self.release = threading.Event()

    def __float__(self) -> float:
        self.reached.set()
        assert self.release.wait(10)
        return self.value


@pytest.mark.parametrize("known_key", [True, False], ids=["known key", "new key"])
def test_a_log_racing_close_is_sent_or_raises(known_key: bool) -> None:
    stub = _Stub()
    stream = MetricStream(stub)  # type: ignore[arg-type]
    if known_key:
        stream.log("run", "loss", 1.0, step=1, timestamp_ms=1)
    held = _HeldValue(2.0)
    outcome: list[BaseException | None] = []

    def trainer() -> None:
        try:
            stream.log("run", "loss", held, step=2, timestamp_ms=2)  # type: ignore[arg-type]
        except FailedPreconditionError as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    logging = threading.Thread(target=trainer)
    logging.start()
    assert held.reached.wait(10)
    # close() runs all the way while the log() has its buffer and has not added its point.
    accepted = stream.close()
    held.release.set()
    logging.join(10)

    sent = [p.step for m in stub.StreamMetrics.messages for p in points_of(m)]
    (error,) = outcome
    if error is None:
        assert 2 in sent, "log() returned, but close() never sent its point"
    else:
        assert error.reason == "CLIENT_CLOSED"
        assert 2 not in sent
    assert accepted == len(sent)


@pytest.mark.usefixtures("tiny_switch_interval")
def test_runs_and_keys_opened_while_the_sender_checks_for_a_due_batch_cost_no_point() -> None:
    # A long-lived stream (the sidecar:// plugin keeps one per process) logs to ever new
    # runs: the sender's check for a due batch meets runs and keys being opened.
    stub = _Stub()
    stream = MetricStream(stub, max_batch_points=10_000, max_delay_s=0.001)  # type: ignore[arg-type]
    threads, runs = 2, 3_000

    def trainer(t: int) -> None:
        for i in range(runs):
            stream.log(f"{t:02d}{i:030d}", f"k{i % 7}", float(i), step=i, timestamp_ms=1)

    workers = [threading.Thread(target=trainer, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stream.close()
    got = sorted((p.run_id, p.step) for m in stub.StreamMetrics.messages for p in points_of(m))
    assert got == sorted((f"{t:02d}{i:030d}", i) for t in range(threads) for i in range(runs))


def test_ctrl_c_during_a_flush_loses_no_point() -> None:
    # SIGINT lands while the flush's cut has taken points out of their rows: the caller
    # gets KeyboardInterrupt, and the points still go, by the close that follows.
    stub = _Stub()
    stream = MetricStream(stub, max_batch_points=1_000_000, max_delay_s=60)  # type: ignore[arg-type]
    for i in range(5_000):
        stream.log("r1", "loss", float(i), step=i)
    take = type(stream._core)._take_points
    interrupted = threading.Event()

    def taken_then_interrupted(*args: object, **kwargs: object) -> object:
        rows = take(*args, **kwargs)
        if not interrupted.is_set():
            interrupted.set()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
            time.sleep(0.2)  # the main thread handles it meanwhile, wherever it is
        return rows

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(stream._core), "_take_points", staticmethod(taken_then_interrupted))
        with pytest.raises(KeyboardInterrupt):
            stream.flush()
    assert stream.close() == 5_000
    sent = [p.step for m in stub.StreamMetrics.messages for p in points_of(m)]
    assert sorted(sent) == list(range(5_000))
