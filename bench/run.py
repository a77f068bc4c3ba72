"""Side-by-side benchmarks: the sidecar against calling MLflow directly, in one run.

    make bench            # full run (about 20 minutes on 2 cores)
    make bench-quick      # --quick (about 6 minutes)

Starts a real `mlflow server` (SQLite) and the sidecar as separate processes on loopback,
measures each scenario and its baseline in the same run, prints a table and writes
bench/results.json (numbers, and the spool depth over time) with the ratios the targets
are stated in.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import mlflow
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow.entities import Metric as MlflowMetric
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.alias_watch import alias_watch  # noqa: E402
from bench.model_cache import model_cache, shared_registry  # noqa: E402
from bench.sustained import SustainedSizes, sustained  # noqa: E402
from mlflow_sidecar.client import ClientContainer  # noqa: E402
from mlflow_sidecar.client.metric_stream import (  # noqa: E402
    DEFAULT_BATCH_POINTS,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_POINT_BYTES,
)
from mlflow_sidecar.v1 import tracking_pb2 as pb  # noqa: E402
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc  # noqa: E402
from tests.support.processes import MlflowServer, free_port  # noqa: E402
from tests.support.s3 import MotoS3  # noqa: E402
from tests.support.sidecar_process import SidecarProcess  # noqa: E402

MIB = 1024 * 1024


GROUPS = (
    "metrics",
    "getrun",
    "streams",
    "artifacts",
    "plugin",
    "s3",
    "sustained",
    "model_cache",
    "watch",
)


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.direct_s = 5.0 if quick else 15.0
        self.async_points = 2_000 if quick else 10_000
        # Twice the stream's default buffer (`stream_buffer_points`), so that the figure
        # is the stream's steady pace and not only a burst the buffer takes in.
        self.stream_points = 1_000_000
        # Short runs on a shared 2-core machine are noisy: both sides of the stream
        # comparison run this many times and report their median.
        self.stream_repeats = 1 if quick else 3
        self.delivered_points = 20_000 if quick else 100_000
        self.log_batch_points = 20_000 if quick else 100_000
        self.getrun_calls = 100 if quick else 500
        # GetRun calls a side (idle, under open metric streams) for the p99 comparison.
        self.fairness_calls = 200 if quick else 400
        self.artifact_mb = 32 if quick else 256
        # An even number, so that each side goes first equally often.
        self.artifact_repeats = 2 if quick else 4
        self.s3_mb = 16 if quick else 64
        self.s3_repeats = 2 if quick else 4
        self.watch_moves = 5 if quick else 20
        # Stock `mlflow.log_metric` calls of one trainer loop (the `sidecar://` plugin).
        self.fluent_direct_s = 5.0 if quick else 15.0
        self.fluent_async_calls = 5_000 if quick else 20_000
        self.fluent_sidecar_calls = 20_000 if quick else 100_000
        # Group `sustained`: the backlog delivered (and logged by the log_batch baseline)
        # on each server, and how long the trainers log for the freshness figures.
        self.sustained = SustainedSizes(
            backlog_points=40_000 if quick else 200_000, freshness_s=15.0 if quick else 60.0
        )
        # Group `model_cache`: rounds of a 200 MiB model (a new version each), medians.
        self.model_cache_repeats = 1 if quick else 3


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def points(run_id: str, count: int, key: str = "reward") -> list[tuple[str, str, float, int, int]]:
    base = int(time.time() * 1000)
    return [(run_id, key, float(i), base + i, i) for i in range(count)]


# -- metrics --------------------------------------------------------------------------


def metrics_direct(client: MlflowClient, run_id: str, seconds: float) -> float:
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        client.log_metric(run_id, "direct", float(done), step=done)
        done += 1
    return done / (time.perf_counter() - started)


def metrics_async(client: MlflowClient, run_id: str, count: int) -> float:
    started = time.perf_counter()
    operations = [
        client.log_metric(run_id, "async", float(i), step=i, synchronous=False)
        for i in range(count)
    ]
    for operation in operations:
        if operation is not None:
            operation.wait()
    mlflow.flush_async_logging()
    elapsed = time.perf_counter() - started
    logged = len(client.get_metric_history(run_id, "async"))
    assert logged == count, f"async logging stored {logged} of {count} points"
    return count / elapsed


def metrics_stream(container: ClientContainer, run_id: str, count: int, key: str) -> float:
    # The trainer's numbers exist before the clock starts, as they do for the raw stream.
    data = points(run_id, count, key)
    stream = container.metric_stream()
    started = time.perf_counter()
    for _, k, value, ts, step in data:
        stream.log(run_id, k, value, step=step, timestamp_ms=ts)
    accepted = stream.close()
    elapsed = time.perf_counter() - started
    assert accepted == count, f"accepted {accepted} of {count}"
    return count / elapsed


def paused_stream(
    server: MlflowServer, container: ClientContainer, run_id: str, count: int
) -> float:
    """`metrics_stream` while MLflow is stopped: the spool takes the points, delivery waits."""
    with server.paused():
        return metrics_stream(container, run_id, count, "paused")


def metrics_delivered(container: ClientContainer, run_id: str, count: int) -> float:
    tracking = container.experiment_tracking()
    started = time.perf_counter()
    metrics_stream(container, run_id, count, "delivered")
    result = tracking.flush_metrics(timeout_s=600)
    elapsed = time.perf_counter() - started
    assert result.pending_points == 0, result
    return count / elapsed


# Runs the points of the serial/parallel delivery comparison are spread over: more than
# the default `spool.delivery_workers`, so every worker has a run.
DELIVERY_RUNS = 8


def metrics_delivered_over_runs(
    container: ClientContainer, run_ids: list[str], count: int
) -> tuple[int, float]:
    """`metrics_delivered` with the points spread over several runs: (points, seconds from
    the first `log` until FlushMetrics says all are in MLflow)."""
    per_run = count // len(run_ids)
    data = [p for run_id in run_ids for p in points(run_id, per_run, "spread")]
    tracking = container.experiment_tracking()
    stream = container.metric_stream()
    started = time.perf_counter()
    for run_id, k, value, ts, step in data:
        stream.log(run_id, k, value, step=step, timestamp_ms=ts)
    accepted = stream.close()
    result = tracking.flush_metrics(timeout_s=600)
    elapsed = time.perf_counter() - started
    assert accepted == len(data) and result.pending_points == 0, (accepted, result)
    return len(data), elapsed


def delivery_serial_vs_parallel(
    results: dict[str, float],
    serial: ClientContainer,
    parallel: ClientContainer,
    new_runs: Callable[[int], list[str]],
    count: int,
) -> None:
    """Delivered points/s of a sidecar with one delivery worker and of one with the default
    number, to the same MLflow, in rounds that alternate A B B A so that drift in the
    machine's load falls on both alike."""
    totals = {"serial": [0, 0.0], "parallel": [0, 0.0]}
    for side in ("serial", "parallel", "parallel", "serial"):
        container = serial if side == "serial" else parallel
        done, seconds = metrics_delivered_over_runs(container, new_runs(DELIVERY_RUNS), count)
        totals[side][0] += done
        totals[side][1] += seconds
    for side, (done, seconds) in totals.items():
        key = f"metrics_delivered_{side}_per_s"
        results[key] = done / seconds
        print(f"  {key:36s} {results[key]:14.1f}", flush=True)


def metrics_log_batch(client: MlflowClient, run_id: str, count: int) -> float:
    batch = [MlflowMetric(k, v, ts, step) for _, k, v, ts, step in points(run_id, count, "batch")]
    started = time.perf_counter()
    for i in range(0, count, 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000], synchronous=True)
    return count / (time.perf_counter() - started)


# The typed stream's messages when the trainer outruns its sender, as in this benchmark:
# one series per run and key, filled up to DEFAULT_MAX_MESSAGE_BYTES.
RAW_MESSAGE_POINTS = (DEFAULT_MAX_MESSAGE_BYTES - 128) // MAX_POINT_BYTES


def grpc_raw_stream(count: int, per_message: int = RAW_MESSAGE_POINTS) -> float:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "raw_grpc_server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            data = points("0" * 32, count, "raw")

            def messages():
                # The same messages the typed client sends (to a sidecar that reads
                # fixed-width columns, as every sidecar of this version does), filled the
                # fastest way Python has: columns per run and key, packed by protobuf in C.
                for i in range(0, count, per_message):
                    columns: dict[tuple[str, str], tuple[list, list, list]] = {}
                    for r, k, v, ts, s in data[i : i + per_message]:
                        series = columns.get((r, k))
                        if series is None:
                            series = columns[(r, k)] = ([], [], [])
                        series[0].append(v)
                        series[1].append(ts)
                        series[2].append(s)
                    message = pb.StreamMetricsRequest()
                    add = message.series.add
                    for (r, k), (values, stamps, steps) in columns.items():
                        add(
                            run_id=r,
                            key=k,
                            values=values,
                            fixed_timestamps_ms=stamps,
                            fixed_steps=steps,
                        )
                    yield message

            started = time.perf_counter()
            reply = stub.StreamMetrics(messages())
            elapsed = time.perf_counter() - started
            assert reply.accepted_points == count
            return count / elapsed
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


def typed_stream(
    results: dict[str, float],
    server: MlflowServer,
    new_run: Callable[[], str],
    work: Path,
    sizes: Sizes,
) -> float:
    """The typed stream's points/s, while MLflow takes them and while it is stopped, to a
    sidecar of its own (default settings, the same MLflow) that is killed afterwards: its
    millions of points would take MLflow minutes to take in, and no other scenario needs
    them. The raw gRPC loop, its baseline, runs in rounds that alternate with the stream's
    (A B B A ...): both meet the same load, that sidecar delivering the earlier rounds'
    points to MLflow meanwhile. Returns that sidecar's peak RSS (MiB)."""
    sidecar = SidecarProcess(
        work / "sidecar-stream", server.url, MLFLOW_SIDECAR__METRICS__PORT=str(free_port())
    )
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "timeout_s": 600})
    try:
        rounds: dict[str, list[float]] = {"stream": [], "raw": []}
        for i in range(sizes.stream_repeats):
            for side in ("stream", "raw") if i % 2 == 0 else ("raw", "stream"):
                rounds[side].append(
                    metrics_stream(container, new_run(), sizes.stream_points, "stream")
                    if side == "stream"
                    else grpc_raw_stream(sizes.stream_points)
                )
        results["metrics_sidecar_stream_per_s"] = statistics.median(rounds["stream"])
        results["grpc_raw_stream_per_s"] = statistics.median(rounds["raw"])
        # Not a target: the same while the MLflow server (which shares this machine's two
        # cores) is stopped, so that delivery takes no CPU.
        results["metrics_sidecar_stream_mlflow_paused_per_s"] = median_of(
            sizes.stream_repeats,
            lambda: paused_stream(server, container, new_run(), sizes.stream_points),
        )
        for key in (
            "metrics_sidecar_stream_per_s",
            "grpc_raw_stream_per_s",
            "metrics_sidecar_stream_mlflow_paused_per_s",
        ):
            print(f"  {key:36s} {results[key]:14.1f}", flush=True)
        assert sidecar.proc is not None
        return peak_rss_mb(sidecar.proc.pid)
    finally:
        container.shutdown_resources()
        sidecar.kill()


def fluent_loop(
    uri: str, mode: str, count: int, seconds: float, registry_uri: str = ""
) -> dict[str, float]:
    """One trainer loop of stock `mlflow.log_metric` calls in a fresh process (MLflow's
    fluent API keeps process-wide state): calls, loop seconds, seconds until delivered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # The loop's closing flush waits for delivery; on a loaded machine that can take longer
    # than the client's default deadline, and the figure is the time it takes.
    env["MLFLOW_SIDECAR_CLIENT_TIMEOUT_S"] = "900"
    if registry_uri:
        env["MLFLOW_REGISTRY_URI"] = registry_uri
    script = str(ROOT / "bench" / "fluent_log_metric.py")
    done = subprocess.run(
        [sys.executable, script, uri, mode, str(count), str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the fluent loop failed: {done.stderr[-2000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def fluent(results: dict[str, float], server: MlflowServer, target: str, sizes: Sizes) -> None:
    """`mlflow.log_metric` per call as the trainer's loop sees it: synchronous to the
    server (MLflow's default), MLflow's async logging (loop time; delivery follows), and
    through `sidecar://` (loop time, and until `end_run` saw every point delivered).

    The baselines get a registry URI: without one MLflow looks for a Spark session in
    every fluent call, which the plugin spares `sidecar://` users by default; so the
    ratios measure the sidecar, not that lookup."""
    forever = 10**9
    direct = fluent_loop(server.url, "sync", forever, sizes.fluent_direct_s, server.url)
    results["plugin_fluent_direct_per_s"] = direct["calls"] / direct["loop_s"]
    print(f"  {'plugin_fluent_direct_per_s':36s} {results['plugin_fluent_direct_per_s']:14.1f}")
    hurried = fluent_loop(server.url, "async", sizes.fluent_async_calls, 3600, server.url)
    results["plugin_fluent_async_per_s"] = hurried["calls"] / hurried["loop_s"]
    results["plugin_fluent_async_delivered_per_s"] = hurried["calls"] / hurried["delivered_s"]
    print(f"  {'plugin_fluent_async_per_s':36s} {results['plugin_fluent_async_per_s']:14.1f}")
    sidecar = fluent_loop(f"sidecar://{target}", "sync", sizes.fluent_sidecar_calls, 3600)
    results["plugin_fluent_sidecar_per_s"] = sidecar["calls"] / sidecar["loop_s"]
    results["plugin_fluent_sidecar_delivered_per_s"] = sidecar["calls"] / sidecar["delivered_s"]
    print(f"  {'plugin_fluent_sidecar_per_s':36s} {results['plugin_fluent_sidecar_per_s']:14.1f}")


def median_of(times: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(times))


# -- reads ----------------------------------------------------------------------------


GETRUN_BLOCK = 50


def getrun(results, client, tracking, run_id: str, calls: int) -> None:
    client.log_batch(run_id, metrics=[MlflowMetric("m", 1.0, 0, 0)])
    sides = {
        "getrun_direct_p50_ms": lambda: client.get_run(run_id),
        "getrun_sidecar_p50_ms": lambda: tracking.get_run(run_id),
    }
    samples: dict[str, list[float]] = {key: [] for key in sides}
    for call in sides.values():
        for _ in range(20):
            call()  # warm up connections and caches
    # Blocks of calls, each side first in every other pair of blocks (A B B A ...): the
    # load of this shared machine drifts by more than the margin, and this way it falls on
    # both sides alike instead of on whichever ran second.
    for block in range(max(1, calls // GETRUN_BLOCK)):
        order = list(sides) if block % 2 == 0 else list(reversed(sides))
        for key in order:
            samples[key] += [timed(sides[key]) * 1000 for _ in range(GETRUN_BLOCK)]
    for key, taken in samples.items():
        results[key] = statistics.median(taken)
    for key in ("getrun_direct_p50_ms", "getrun_sidecar_p50_ms"):
        print(f"  {key:36s} {results[key]:14.3f}", flush=True)


# -- unary calls under streams --------------------------------------------------------

OPEN_STREAMS = 20
# A trainer's pace: one message of a few keys every batch delay (0.2 s).
STREAM_KEYS = 5
STREAM_PERIOD_S = 0.2
FAIRNESS_BLOCK = 100


class OpenStreams:
    """`count` StreamMetrics calls, each on its own channel as from its own trainer, open
    and sending a message every STREAM_PERIOD_S until `close`."""

    def __init__(self, target: str, run_id: str, count: int) -> None:
        self._stop = threading.Event()
        self._channels = [grpc.insecure_channel(target) for _ in range(count)]
        self._sent = [0] * count
        self._started = [threading.Event() for _ in range(count)]
        self._futures = [
            pb_grpc.ExperimentTrackingServiceStub(channel).StreamMetrics.future(
                self._messages(run_id, i), timeout=600
            )
            for i, channel in enumerate(self._channels)
        ]
        for started in self._started:
            assert started.wait(60), "a stream did not start"

    def _messages(self, run_id: str, index: int):
        step = 0
        while not self._stop.is_set():
            now = int(time.time() * 1000)
            yield pb.StreamMetricsRequest(
                points=[
                    pb.MetricPoint(
                        run_id=run_id, key=f"s{index}_k{k}", value=1.0, timestamp_ms=now, step=step
                    )
                    for k in range(STREAM_KEYS)
                ]
            )
            self._sent[index] += STREAM_KEYS
            self._started[index].set()
            step += 1
            self._stop.wait(STREAM_PERIOD_S)

    def close(self) -> None:
        """End every call; each must have been served whole (none refused)."""
        self._stop.set()
        for future, sent in zip(self._futures, self._sent, strict=True):
            assert future.result().accepted_points == sent, "a stream was not served whole"
        for channel in self._channels:
            channel.close()


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def getrun_under_streams(results, tracking, target: str, run_id: str, calls: int) -> None:
    """GetRun p99 with no other calls, and with OPEN_STREAMS metric streams open and
    sending, in blocks that alternate A B B A (the machine's load drifts)."""
    for _ in range(20):
        tracking.get_run(run_id)  # warm up
    samples: dict[bool, list[float]] = {False: [], True: []}
    for block in range(2 * max(1, calls // FAIRNESS_BLOCK)):
        under = block % 4 in (1, 2)
        streams = OpenStreams(target, run_id, OPEN_STREAMS) if under else None
        samples[under] += [
            timed(lambda: tracking.get_run(run_id)) * 1000 for _ in range(FAIRNESS_BLOCK)
        ]
        if streams is not None:
            streams.close()
    results["getrun_idle_p99_ms"] = p99(samples[False])
    results["getrun_under_streams_p99_ms"] = p99(samples[True])
    for key in ("getrun_idle_p99_ms", "getrun_under_streams_p99_ms"):
        print(f"  {key:36s} {results[key]:14.3f}", flush=True)


# -- artifacts ------------------------------------------------------------------------


def make_file(path: Path, size_mb: int) -> str:
    digest = hashlib.sha256()
    chunk = os.urandom(MIB)
    with path.open("wb") as out:
        for _ in range(size_mb):
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def start_sidecar(sidecar: SidecarProcess) -> float:
    """Seconds from process start to a SERVING health answer (probed in-process, so the
    probe's own start-up is not counted)."""
    started = time.perf_counter()
    sidecar.launch()
    request = health_pb2.HealthCheckRequest()
    # grpc waits out a reconnect backoff (1 s at first) after a refused connection; a
    # probe with the default would measure its own backoff rather than the sidecar.
    probing = [
        ("grpc.initial_reconnect_backoff_ms", 20),
        ("grpc.min_reconnect_backoff_ms", 20),
        ("grpc.max_reconnect_backoff_ms", 100),
    ]
    with grpc.insecure_channel(sidecar.target, options=probing) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - started < 120:
            try:
                if (
                    stub.Check(request, timeout=0.5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"sidecar did not reach SERVING: {sidecar.log_tail()}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


TARGETS: list[tuple[str, Callable[[dict[str, float]], bool], str]] = [
    (
        "stream >= 300x direct",
        lambda r: r["metrics_sidecar_stream_per_s"] >= 300 * r["metrics_direct_per_s"],
        "",
    ),
    (
        "stream >= 5x async",
        lambda r: r["metrics_sidecar_stream_per_s"] >= 5 * r["metrics_async_per_s"],
        "",
    ),
    (
        "stream >= 0.5x raw gRPC",
        lambda r: r["metrics_sidecar_stream_per_s"] >= 0.5 * r["grpc_raw_stream_per_s"],
        "",
    ),
    (
        "delivered >= 0.8x log_batch",
        lambda r: r["metrics_sidecar_delivered_per_s"] >= 0.8 * r["metrics_log_batch_direct_per_s"],
        "",
    ),
    (
        "getrun sidecar <= direct + 1 ms",
        lambda r: r["getrun_sidecar_p50_ms"] <= r["getrun_direct_p50_ms"] + 1,
        "",
    ),
    (
        f"GetRun p99 under {OPEN_STREAMS} streams <= 3x idle",
        lambda r: r["getrun_under_streams_p99_ms"] <= 3 * r["getrun_idle_p99_ms"],
        "",
    ),
    (
        "upload >= 0.8x direct",
        lambda r: r["upload_sidecar_mb_s"] >= 0.8 * r["upload_direct_mb_s"],
        "",
    ),
    (
        "download >= 0.8x direct",
        lambda r: r["download_sidecar_mb_s"] >= 0.8 * r["download_direct_mb_s"],
        "",
    ),
    (
        "S3 upload >= 0.8x direct",
        lambda r: r["upload_s3_sidecar_mb_s"] >= 0.8 * r["upload_s3_direct_mb_s"],
        "",
    ),
    (
        "S3 download >= 0.8x direct",
        lambda r: r["download_s3_sidecar_mb_s"] >= 0.8 * r["download_s3_direct_mb_s"],
        "",
    ),
    (
        "delivered to 4-worker PostgreSQL >= 2x log_batch",
        lambda r: (
            r["metrics_delivered_pg_parallel_per_s"] >= 2 * r["metrics_log_batch_pg_direct_per_s"]
        ),
        "",
    ),
    (
        "delivered to SQLite >= 0.9x log_batch",
        lambda r: (
            r["metrics_delivered_sqlite_per_s"] >= 0.9 * r["metrics_log_batch_sqlite_direct_per_s"]
        ),
        "",
    ),
    (
        "freshness p99 <= 2 s at 50% of delivered capacity",
        lambda r: r["freshness_p99_ms"] <= 2000,
        "",
    ),
    (
        "sidecar:// log_metric >= 300x direct",
        lambda r: r["plugin_fluent_sidecar_per_s"] >= 300 * r["plugin_fluent_direct_per_s"],
        "",
    ),
    (
        "sidecar:// log_metric >= 2x MLflow async",
        lambda r: r["plugin_fluent_sidecar_per_s"] >= 2 * r["plugin_fluent_async_per_s"],
        "",
    ),
    (
        "cached model download >= 5x cold",
        lambda r: r["model_download_cached_mb_s"] >= 5 * r["model_download_cold_mb_s"],
        "",
    ),
    (
        "cached model download >= 3x direct",
        lambda r: r["model_download_cached_mb_s"] >= 3 * r["model_download_direct_mb_s"],
        "",
    ),
    (
        "cached model download, shared volume >= 5x cold",
        lambda r: r["model_download_cached_shared_mb_s"] >= 5 * r["model_download_cold_mb_s"],
        "",
    ),
    (
        "cached model download, shared volume >= 3x direct",
        lambda r: r["model_download_cached_shared_mb_s"] >= 3 * r["model_download_direct_mb_s"],
        "",
    ),
    (
        "cached model download >= 5x cold, S3",
        lambda r: r["model_download_s3_cached_mb_s"] >= 5 * r["model_download_s3_cold_mb_s"],
        "",
    ),
    (
        "cached model download >= 3x direct, S3",
        lambda r: r["model_download_s3_cached_mb_s"] >= 3 * r["model_download_s3_direct_mb_s"],
        "",
    ),
    (
        "cached model download, shared volume >= 3x direct, S3",
        lambda r: (
            r["model_download_s3_cached_shared_mb_s"] >= 3 * r["model_download_s3_direct_mb_s"]
        ),
        "",
    ),
    ("peak RSS <= 400 MiB", lambda r: r["sidecar_peak_rss_mb"] <= 400, ""),
    (
        "alias watch max <= poll interval + 1 s",
        lambda r: r["alias_watch_latency_max_ms"] <= (r["alias_watch_poll_interval_s"] + 1) * 1000,
        "",
    ),
    ("start <= 3 s", lambda r: r["sidecar_start_s"] <= 3, ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, about 6 minutes")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        help="run only these groups of scenarios (start-up and peak RSS are always measured)",
    )
    args = parser.parse_args()
    groups = set(args.only)
    sizes = Sizes(args.quick)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    results: dict[str, float] = {}
    # Figures over time (not single numbers): written to results.json, summarised in the table.
    series: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        work = Path(tmp)
        # MLflow's job runner (several polling consumer processes) serves features the
        # sidecar never uses; left on, it takes CPU from both sides of every comparison.
        server = MlflowServer(work / "mlflow", job_execution=False)
        server.start()
        sidecar = SidecarProcess(
            work / "sidecar", server.url, MLFLOW_SIDECAR__METRICS__PORT=str(free_port())
        )
        # The same sidecar with one delivery worker: the baseline of parallel delivery.
        serial_sidecar = SidecarProcess(
            work / "sidecar-serial",
            server.url,
            MLFLOW_SIDECAR__METRICS__PORT=str(free_port()),
            MLFLOW_SIDECAR__SPOOL__DELIVERY_WORKERS="1",
        )
        stream_peak_rss_mb = 0.0
        try:
            results["sidecar_start_s"] = start_sidecar(sidecar)
            assert sidecar.proc is not None
            client = MlflowClient(tracking_uri=server.url)
            exp = client.create_experiment("bench")
            run = lambda: client.create_run(exp).info.run_id  # noqa: E731
            container = ClientContainer()
            container.config.from_dict({"target": sidecar.target, "timeout_s": 600})

            steps = [
                ("metrics_direct_per_s", lambda: metrics_direct(client, run(), sizes.direct_s)),
                ("metrics_async_per_s", lambda: metrics_async(client, run(), sizes.async_points)),
                (
                    "metrics_log_batch_direct_per_s",
                    lambda: metrics_log_batch(client, run(), sizes.log_batch_points),
                ),
                (
                    # Not a target: the ceiling with messages of one batch each, which is
                    # what the typed stream sends when its sender keeps up.
                    "grpc_raw_stream_batch_messages_per_s",
                    lambda: median_of(
                        sizes.stream_repeats,
                        lambda: grpc_raw_stream(sizes.stream_points, DEFAULT_BATCH_POINTS),
                    ),
                ),
                (
                    "metrics_sidecar_delivered_per_s",
                    lambda: metrics_delivered(container, run(), sizes.delivered_points),
                ),
            ]
            if "metrics" in groups:
                stream_peak_rss_mb = typed_stream(results, server, run, work, sizes)
            for key, step in steps if "metrics" in groups else []:
                results[key] = step()
                print(f"  {key:36s} {results[key]:14.1f}", flush=True)
                # Each scenario starts with an empty spool and an idle deliverer.
                flushed = container.experiment_tracking().flush_metrics(timeout_s=1800)
                assert flushed.complete, flushed
            if "metrics" in groups:
                serial_sidecar.start()
                serial = ClientContainer()
                serial.config.from_dict({"target": serial_sidecar.target, "timeout_s": 600})
                delivery_serial_vs_parallel(
                    results,
                    serial,
                    container,
                    lambda n: [run() for _ in range(n)],
                    sizes.delivered_points,
                )
                serial.shutdown_resources()
                serial_sidecar.stop()

            tracking = container.experiment_tracking()
            if "getrun" in groups:
                getrun(results, client, tracking, run(), sizes.getrun_calls)

            if "streams" in groups:
                getrun_under_streams(results, tracking, sidecar.target, run(), sizes.fairness_calls)

            if "artifacts" in groups:
                artifacts(
                    results, client, tracking, run, work, sizes.artifact_mb, sizes.artifact_repeats
                )
            if "plugin" in groups:
                fluent(results, server, sidecar.target, sizes)
            if "s3" in groups:
                s3(results, work / "s3", sizes)
            if "sustained" in groups:
                sustained(results, series, work / "sustained", sizes.sustained)
            if "model_cache" in groups:
                with shared_registry(sidecar.target, sidecar.data_dir / "models") as shared:
                    model_cache(
                        results,
                        container.model_registry(),
                        shared,
                        server.url,
                        exp,
                        work / "model-cache",
                        sizes.model_cache_repeats,
                    )
                model_cache_s3(results, work / "model-cache-s3", sizes)
            if "watch" in groups:
                alias_watch(results, server, work, sizes.watch_moves)
            results["sidecar_peak_rss_mb"] = max(peak_rss_mb(sidecar.proc.pid), stream_peak_rss_mb)
            container.shutdown_resources()
        finally:
            serial_sidecar.stop()
            sidecar.stop()
            server.stop()

    report(results, args.quick)
    Path(args.out).write_text(json.dumps({**results, **series}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


def artifact_round(
    client, tracking, run, work: Path, source: Path, attempt: int
) -> list[tuple[str, float]]:
    """One upload and download each way, to fresh runs and directories: (key, seconds).

    Odd attempts go through the sidecar first: whichever goes second inherits the first
    one's dirty pages and warm caches, which is worth a tenth of the ratio here."""
    direct_run, sidecar_run = run(), run()
    direct_dst, sidecar_dst = work / f"direct-{attempt}", work / f"sidecar-{attempt}"
    direct_dst.mkdir()
    sidecar_dst.mkdir()
    uploads: list[tuple[str, Callable[[], object]]] = [
        ("upload_direct_mb_s", lambda: client.log_artifact(direct_run, str(source))),
        (
            "upload_sidecar_mb_s",
            lambda: tracking.upload_artifact(sidecar_run, source, "artifact.bin"),
        ),
    ]
    downloads: list[tuple[str, Callable[[], object]]] = [
        (
            "download_direct_mb_s",
            lambda: client.download_artifacts(direct_run, "artifact.bin", str(direct_dst)),
        ),
        (
            "download_sidecar_mb_s",
            lambda: tracking.download_artifact(sidecar_run, "artifact.bin", sidecar_dst),
        ),
    ]
    if attempt % 2:
        uploads.reverse()
        downloads.reverse()
    return [(key, timed(transfer)) for key, transfer in uploads + downloads]


def artifacts(
    results, client, tracking, run, work: Path, size_mb: int, repeats: int, prefix: str = ""
) -> None:
    """Upload and download the same file directly and through the sidecar, alternating,
    `repeats` times each; the medians go in `results` (keys with `prefix` after the
    direction: `upload_<prefix>direct_mb_s`, ...)."""
    work.mkdir(parents=True, exist_ok=True)
    source = work / "artifact.bin"
    digest = make_file(source, size_mb)
    times: dict[str, list[float]] = {
        "upload_direct_mb_s": [],
        "upload_sidecar_mb_s": [],
        "download_direct_mb_s": [],
        "download_sidecar_mb_s": [],
    }
    for attempt in range(repeats):
        for key, seconds in artifact_round(client, tracking, run, work, source, attempt):
            times[key].append(seconds)
        assert sha256_of(work / f"direct-{attempt}" / "artifact.bin") == digest
        assert sha256_of(work / f"sidecar-{attempt}" / "artifact.bin") == digest
        shutil.rmtree(work / f"direct-{attempt}")
        shutil.rmtree(work / f"sidecar-{attempt}")
    for key, seconds in times.items():
        direction, _, side = key.partition("_")
        named = f"{direction}_{prefix}{side}"
        results[named] = size_mb / statistics.median(seconds)
        print(f"  {named:36s} {results[named]:14.1f}", flush=True)


@contextlib.contextmanager
def s3_stack(work: Path) -> Iterator[tuple[MlflowServer, ClientContainer, MlflowClient, str]]:
    """moto's S3 server, an `mlflow server` whose artifacts go there (`--artifacts-destination
    s3://…`) and a sidecar in front of it, all started here: (server, the sidecar's client
    container, a plain MLflow client of the server, an experiment id)."""
    moto = MotoS3(work / "moto")
    moto.start()
    server = MlflowServer(
        work / "mlflow", artifacts="s3://bench/artifacts", env=moto.env, job_execution=False
    )
    sidecar = SidecarProcess(work / "sidecar", server.url)
    container = ClientContainer()
    try:
        moto.create_bucket("bench")
        server.start()
        sidecar.start()
        container.config.from_dict({"target": sidecar.target, "timeout_s": 600})
        client = MlflowClient(tracking_uri=server.url)
        yield server, container, client, client.create_experiment("bench-s3")
    finally:
        container.shutdown_resources()
        sidecar.stop()
        server.stop()
        moto.stop()


def s3(results: dict[str, float], work: Path, sizes: Sizes) -> None:
    """The artifact rounds again against the S3 stack: `log_artifact` and
    `download_artifacts` to that server against the sidecar's typed client to it."""
    with s3_stack(work) as (_server, container, client, exp):
        run = lambda: client.create_run(exp).info.run_id  # noqa: E731
        tracking = container.experiment_tracking()
        artifacts(
            results, client, tracking, run, work / "files", sizes.s3_mb, sizes.s3_repeats, "s3_"
        )


def model_cache_s3(results: dict[str, float], work: Path, sizes: Sizes) -> None:
    """The model cache rounds against the S3 stack, where a deployment keeps its models."""
    with (
        s3_stack(work) as (server, container, _client, exp),
        shared_registry(container.config.target(), work / "sidecar" / "models") as shared,
    ):
        model_cache(
            results,
            container.model_registry(),
            shared,
            server.url,
            exp,
            work / "model-cache",
            sizes.model_cache_repeats,
            prefix="s3_",
        )


def report(results: dict[str, float], quick: bool) -> None:
    print()
    print(
        f"mlflow-sidecar benchmark ({'quick' if quick else 'full'}) on {platform.node()},"
        f" {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{'key':40s} {'value':>14s}")
    for key in sorted(results):
        print(f"{key:40s} {results[key]:14.2f}")
    r = results
    ratios = {}
    if "metrics_direct_per_s" in r:
        stream = r["metrics_sidecar_stream_per_s"]
        ratios["stream / direct"] = stream / r["metrics_direct_per_s"]
        ratios["stream / async"] = stream / r["metrics_async_per_s"]
        ratios["stream / raw gRPC"] = stream / r["grpc_raw_stream_per_s"]
        ratios["stream / raw gRPC, one batch per message"] = (
            stream / r["grpc_raw_stream_batch_messages_per_s"]
        )
        ratios["stream, MLflow stopped / raw gRPC"] = (
            r["metrics_sidecar_stream_mlflow_paused_per_s"] / r["grpc_raw_stream_per_s"]
        )
        ratios["delivered / log_batch"] = (
            r["metrics_sidecar_delivered_per_s"] / r["metrics_log_batch_direct_per_s"]
        )
        ratios["delivered, parallel / serial"] = (
            r["metrics_delivered_parallel_per_s"] / r["metrics_delivered_serial_per_s"]
        )
    if "upload_s3_direct_mb_s" in r:
        ratios["S3 upload sidecar / direct"] = (
            r["upload_s3_sidecar_mb_s"] / r["upload_s3_direct_mb_s"]
        )
        ratios["S3 download sidecar / direct"] = (
            r["download_s3_sidecar_mb_s"] / r["download_s3_direct_mb_s"]
        )
    if "metrics_delivered_sqlite_per_s" in r:
        ratios["delivered / log_batch, SQLite"] = (
            r["metrics_delivered_sqlite_per_s"] / r["metrics_log_batch_sqlite_direct_per_s"]
        )
        ratios["delivered / log_batch, 4-worker PostgreSQL"] = (
            r["metrics_delivered_pg_parallel_per_s"] / r["metrics_log_batch_pg_direct_per_s"]
        )
        ratios["delivered / log_batch, 4-worker PostgreSQL, one run"] = (
            r["metrics_delivered_pg_one_run_per_s"] / r["metrics_log_batch_pg_one_run_direct_per_s"]
        )
        ratios["freshness rate logged / delivered, SQLite"] = (
            r["freshness_logged_per_s"] / r["metrics_delivered_sqlite_per_s"]
        )
    if "plugin_fluent_direct_per_s" in r:
        sidecar = r["plugin_fluent_sidecar_per_s"]
        ratios["sidecar:// log_metric / direct"] = sidecar / r["plugin_fluent_direct_per_s"]
        ratios["sidecar:// log_metric / MLflow async"] = sidecar / r["plugin_fluent_async_per_s"]
    if "getrun_idle_p99_ms" in r:
        ratios["GetRun p99 under streams / idle"] = (
            r["getrun_under_streams_p99_ms"] / r["getrun_idle_p99_ms"]
        )
    if "alias_watch_latency_max_ms" in r:
        interval_ms = r["alias_watch_poll_interval_s"] * 1000
        ratios["alias watch max / poll interval"] = r["alias_watch_latency_max_ms"] / interval_ms
        ratios["alias watch p50 / polling MLflow p50"] = (
            r["alias_watch_latency_p50_ms"] / r["alias_poll_direct_latency_p50_ms"]
        )
    if "upload_direct_mb_s" in r:
        ratios["upload sidecar / direct"] = r["upload_sidecar_mb_s"] / r["upload_direct_mb_s"]
        ratios["download sidecar / direct"] = r["download_sidecar_mb_s"] / r["download_direct_mb_s"]
    if "model_download_cached_mb_s" in r:
        cached = r["model_download_cached_mb_s"]
        ratios["model download cached / cold"] = cached / r["model_download_cold_mb_s"]
        ratios["model download cached / direct"] = cached / r["model_download_direct_mb_s"]
        ratios["model download cached / raw gRPC"] = cached / r["grpc_raw_model_download_mb_s"]
        shared = r["model_download_cached_shared_mb_s"]
        ratios["model download shared / cold"] = shared / r["model_download_cold_mb_s"]
        ratios["model download shared / direct"] = shared / r["model_download_direct_mb_s"]
    if "model_download_s3_cached_mb_s" in r:
        cached = r["model_download_s3_cached_mb_s"]
        ratios["model download cached / cold, S3"] = cached / r["model_download_s3_cold_mb_s"]
        ratios["model download cached / direct, S3"] = cached / r["model_download_s3_direct_mb_s"]
        shared = r["model_download_s3_cached_shared_mb_s"]
        ratios["model download shared / direct, S3"] = shared / r["model_download_s3_direct_mb_s"]
    print()
    for name, value in ratios.items():
        print(f"{name:40s} {value:14.2f}x")
    print()
    for name, check, _ in TARGETS:
        try:
            verdict = "PASS" if check(results) else "MISS"
        except KeyError:  # its scenario was left out with --only
            verdict = "----"
        print(f"{verdict}  {name}")


if __name__ == "__main__":
    sys.exit(main())
