"""The spool and the process lifecycle with real sidecar processes and a real MLflow: a
full disk, one sidecar per data dir, a stop during the first start, drain on stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mlflow
import pytest

from mlflow_sidecar.client.metric_stream import MetricStream
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.support.processes import MlflowServer
from tests.support.sidecar_process import CLI, SidecarProcess, health_ok

MESSAGE_POINTS = 1000


def message(run_id: str, first_step: int, n: int = MESSAGE_POINTS) -> pb.StreamMetricsRequest:
    steps = list(range(first_step, first_step + n))
    request = pb.StreamMetricsRequest()
    request.series.add(
        run_id=run_id,
        key="pnl",
        values=[float(s) for s in steps],
        timestamps_ms=[1_000 + s for s in steps],
        steps=steps,
    )
    return request


class RecordingStub:
    """The real stub, recording the status of every StreamMetrics call that failed."""

    def __init__(self, stub: pb_grpc.ExperimentTrackingServiceStub) -> None:
        self._stub = stub
        self.failures: list[grpc.StatusCode] = []
        self.StreamMetrics = self  # MetricStream calls `StreamMetrics.with_call`

    def with_call(self, requests: Iterator[pb.StreamMetricsRequest], **options: Any) -> object:
        try:
            return self._stub.StreamMetrics.with_call(requests, **options)
        except grpc.RpcError as exc:
            self.failures.append(exc.code())
            raise


def pending(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        return stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=1.0).pending_points


def assert_drained(target: str) -> None:
    """FlushMetrics says every accepted point is in MLflow, none dead-lettered."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        flush = stub.FlushMetrics(pb.FlushMetricsRequest(), timeout=120)
        assert flush.pending_points == 0 and flush.dead_letter_points == 0


def exit_after_sigterm(sidecar: SidecarProcess, timeout_s: float = 120) -> int:
    assert sidecar.proc is not None
    sidecar.proc.send_signal(signal.SIGTERM)
    return sidecar.proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "20m") -> Iterator[Path]:
    """A real file system of `size` (tmpfs) at `path`: writes past it fail with ENOSPC."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.decode().strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_refuses_then_every_acknowledged_point_arrives_once(
    own_mlflow: MlflowServer, tmp_path: Path, unique: str
) -> None:
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment(f"disk-{unique}")).info.run_id
    with small_disk(tmp_path / "disk") as disk:
        sidecar = SidecarProcess(
            disk / "sidecar",
            own_mlflow.url,
            MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S="1",
            # No space kept free: the disk's own ENOSPC (the next test keeps it).
            MLFLOW_SIDECAR__SPOOL__MIN_FREE_BYTES="0",
        )
        sidecar.start()
        try:
            own_mlflow.stop()  # an outage: the spool keeps every point, and grows
            # Leave about 2 MiB free, so the spool fills the disk within a few messages.
            ballast = disk / "ballast"
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with ballast.open("wb") as out:
                out.write(b"\0" * (free - 2 * 1024 * 1024))
            acknowledged: list[int] = []
            refusal: grpc.RpcError | None = None
            with grpc.insecure_channel(sidecar.target) as channel:
                stub = pb_grpc.ExperimentTrackingServiceStub(channel)
                for index in range(1000):
                    first = index * MESSAGE_POINTS
                    try:
                        reply = stub.StreamMetrics(iter([message(run_id, first)]), timeout=30)
                    except grpc.RpcError as exc:
                        refusal = exc
                        break
                    assert reply.accepted_points == MESSAGE_POINTS
                    acknowledged.extend(range(first, first + MESSAGE_POINTS))
                assert refusal is not None, "the disk never filled"
                assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "disk is full" in (refusal.details() or "")
                assert acknowledged, "nothing was accepted before the disk filled"

                # The typed stream, meanwhile, keeps its points and retries with backoff.
                later = range(10_000_000, 10_000_000 + 5 * MESSAGE_POINTS)
                recording = RecordingStub(stub)
                stream = MetricStream(recording, retry_budget_s=120)  # type: ignore[arg-type]
                for step in later:
                    stream.log(run_id, "pnl", float(step), step=step, timestamp_ms=1_000 + step)
                flushed = threading.Thread(target=stream.close, daemon=True)
                flushed.start()
                flushed.join(2)  # give it time to meet the full disk
                ballast.unlink()  # space returns
                flushed.join(120)
                assert not flushed.is_alive()
                assert stream.accepted == len(later)
                assert grpc.StatusCode.RESOURCE_EXHAUSTED in recording.failures
                acknowledged.extend(later)

            own_mlflow.start()
            assert_drained(sidecar.target)
        finally:
            sidecar.stop()
    history = plain.get_metric_history(run_id, "pnl")
    steps = sorted(m.step for m in history)
    assert steps == sorted(acknowledged)  # every acknowledged point, exactly once


def _stream_until_refused(target: str, run_id: str, first: int) -> tuple[list[int], str]:
    """Messages until the sidecar refuses one: the steps it acknowledged, the refusal."""
    acknowledged: list[int] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        for index in range(10_000):
            start = first + index * MESSAGE_POINTS
            try:
                stub.StreamMetrics(iter([message(run_id, start)]), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                return acknowledged, exc.details() or ""
            acknowledged.extend(range(start, start + MESSAGE_POINTS))
    raise AssertionError("the sidecar never refused a message")


def test_the_spool_never_fills_the_disk_itself_and_drains_on_a_disk_that_stays_full(
    own_mlflow: MlflowServer, tmp_path: Path, unique: str
) -> None:
    # Nobody frees space here: accepting stops short of the disk's end (spool.min_free_bytes,
    # 64 MiB), so delivery can record what MLflow took and the spool drains, and its freed
    # pages take new points, instead of a spool that filled the disk refusing everything.
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment(f"reserve-{unique}")).info.run_id
    with small_disk(tmp_path / "disk", "100m") as disk:
        sidecar = SidecarProcess(
            disk / "sidecar", own_mlflow.url, MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S="1"
        )
        sidecar.log_path = tmp_path / "sidecar.log"  # a container's log is not on its volume
        sidecar.start()
        try:
            own_mlflow.stop()
            keep_free = 64 * 1024 * 1024
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "ballast").write_bytes(b"\0" * (free - keep_free - 3 * 1024 * 1024))
            acknowledged, refusal = _stream_until_refused(sidecar.target, run_id, 0)
            assert acknowledged, "nothing was accepted before the space kept free"
            assert "stay free for delivery (spool.min_free_bytes)" in refusal
            assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > keep_free // 2

            own_mlflow.start()
            assert_drained(sidecar.target)
            # The disk is as full as before, and the spool takes as many points again.
            again, _ = _stream_until_refused(sidecar.target, run_id, 10_000_000)
            assert len(again) >= len(acknowledged) // 2
            assert_drained(sidecar.target)
        finally:
            sidecar.stop()
    steps = sorted(m.step for m in plain.get_metric_history(run_id, "pnl"))
    assert steps == sorted(acknowledged + again)  # every acknowledged point, exactly once


def test_a_second_sidecar_on_one_data_dir_exits_2_naming_the_first(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    first = SidecarProcess(tmp_path / "data", mlflow_server.url)
    first.start()
    try:
        assert first.proc is not None
        # An upload of the first sidecar in flight: the second must not clean it up.
        in_flight = tmp_path / "data" / "tmp" / "transfer-upload-inflight"
        in_flight.mkdir(parents=True)
        (in_flight / "part").write_bytes(b"half an upload")
        second = SidecarProcess(tmp_path / "data", mlflow_server.url)
        result = subprocess.run(
            [CLI, "serve"], env=second.env, capture_output=True, timeout=120, check=False
        )
        assert result.returncode == 2
        lines = result.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and f"pid {first.proc.pid}" in lines[0], lines
        assert (in_flight / "part").read_bytes() == b"half an upload"
        assert health_ok(first.target)
    finally:
        first.stop()


def test_sigterm_during_the_first_start_leaves_a_store_that_starts(tmp_path: Path) -> None:
    data = tmp_path / "embedded"
    sidecar = SidecarProcess(data)  # no tracking URI: the embedded store in the data dir
    sidecar.launch()
    assert sidecar.proc is not None
    deadline = time.monotonic() + 120
    while not list(data.glob("mlflow.db.partial-*")):
        assert sidecar.proc.poll() is None, sidecar.log_tail()
        assert time.monotonic() < deadline, "the store's creation was never seen"
        time.sleep(0.005)
    sidecar.proc.send_signal(signal.SIGTERM)  # mid-migration
    sidecar.proc.wait(timeout=60)
    assert not (data / "mlflow.db").exists()
    sidecar.start()  # a clean restart creates the store whole and serves
    try:
        assert health_ok(sidecar.target)
        assert not list(data.glob("mlflow.db.partial-*"))
    finally:
        sidecar.stop()


def test_sigterm_delivers_pending_points_before_exit(
    own_mlflow: MlflowServer, tmp_path: Path, unique: str
) -> None:
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment(f"drain-{unique}")).info.run_id
    sidecar = SidecarProcess(
        tmp_path / "sidecar",
        own_mlflow.url,
        # spool.drain_on_stop_s left unset: it follows the grace (88 s here), as the
        # Kubernetes manifests count on.
        MLFLOW_SIDECAR__SERVER__GRACE_S="90",
        MLFLOW_SIDECAR__RETRY__MAX_BACKOFF_S="1",
    )
    sidecar.start()
    try:
        own_mlflow.stop()  # the points wait in the spool
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            for first in range(0, 20_000, MESSAGE_POINTS):
                stub.StreamMetrics(iter([message(run_id, first)]), timeout=30)
        assert pending(sidecar.target) == 20_000
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        own_mlflow.start()  # reachable again while the sidecar drains
        assert sidecar.proc.wait(timeout=150) == 0
    finally:
        sidecar.stop()
    assert "every accepted metric point was delivered before stopping" in sidecar.log_tail(200)
    history = plain.get_metric_history(run_id, "pnl")
    assert sorted(m.step for m in history) == list(range(20_000))


def test_sigterm_says_how_many_points_are_left_when_mlflow_stays_down(
    own_mlflow: MlflowServer, tmp_path: Path, unique: str
) -> None:
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    run_id = plain.create_run(plain.create_experiment(f"left-{unique}")).info.run_id
    sidecar = SidecarProcess(
        tmp_path / "sidecar", own_mlflow.url, MLFLOW_SIDECAR__SPOOL__DRAIN_ON_STOP_S="1"
    )
    sidecar.start()
    try:
        own_mlflow.stop()
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            stub.StreamMetrics(iter([message(run_id, 0, 3000)]), timeout=30)
        assert exit_after_sigterm(sidecar) == 0
    finally:
        sidecar.stop()
        own_mlflow.start()
    errors = [line for line in sidecar.log_tail(200).splitlines() if "ERROR" in line]
    assert any("3000 metric points are left in the spool" in line for line in errors), errors


def _signalable_threads(pid: int) -> list[int]:
    """The ids of the process's threads other than its main one that do not block
    SIGTERM: the threads the kernel may hand a SIGTERM sent to the process."""
    bit = 1 << (signal.SIGTERM - 1)
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        status = (task / "status").read_text()
        blocked = int(
            next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16
        )
        if tid != pid and not blocked & bit:
            found.append(tid)
    return found


def test_sigterm_taken_by_another_thread_than_the_main_one_still_stops_the_sidecar(
    tmp_path: Path,
) -> None:
    # The kernel hands a process's SIGTERM to any thread that does not block it; the
    # sidecar stops whichever thread takes it. Sent to one such thread on purpose here.
    sidecar = SidecarProcess(tmp_path / "data")
    sidecar.start()
    assert sidecar.proc is not None
    tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    threads = _signalable_threads(sidecar.proc.pid)
    assert threads, "the sidecar runs threads besides its main one"
    try:
        assert tgkill(sidecar.proc.pid, threads[0], signal.SIGTERM) == 0
        assert sidecar.proc.wait(timeout=60) == 0
    finally:
        sidecar.kill()
    assert "received SIGTERM" in sidecar.log_path.read_text()
