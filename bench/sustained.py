"""Sustained end-to-end figures (group `sustained` of bench/run.py).

Delivered capacity: a backlog of points streamed into a sidecar's spool, timed until the
spool is empty again, against a single-threaded `MlflowClient.log_batch(1000)` loop to the
same server; on an mlflow server with SQLite, and on one with four workers on PostgreSQL.

Freshness: trainers log at a fixed total rate (half the delivered capacity on SQLite) for
a minute; one of them logs a marker every tick whose value is the wall time of its `log`
call, and a plain MlflowClient polls `get_metric_history` for the markers: the time from
`log` to visible in MLflow, p50 and p99. The spool's depth is sampled every second.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric as MlflowMetric
from mlflow.tracking import MlflowClient

from mlflow_sidecar.client import ClientContainer
from tests.support.postgres import PostgresCluster
from tests.support.processes import MlflowServer, free_port
from tests.support.sidecar_process import SidecarProcess

# The backlog's shape: a few runs of a few keys, as several trainers' points are.
RUNS = 4
KEYS = 5
LOG_BATCH = 1000
PG_WORKERS = 4
TRAINERS = 4
TICK_S = 0.1
MARKER_KEY = "freshness_mark"
# How often the sampler asks MLflow for the markers: the resolution of a freshness figure.
POLL_S = 0.05
DEPTH_EVERY_S = 1.0
# (points, seconds) of one round of a capacity measurement.
Round = tuple[int, float]
# Bounds, not measures: how long a drain or the last markers may take on a busy machine.
DRAIN_WAIT_S = 1800.0
MARKER_WAIT_S = 120.0
STARTUP_WAIT_S = 240.0


@dataclass(frozen=True)
class SustainedSizes:
    """Points of each backlog (and of its log_batch baseline), and the freshness run."""

    backlog_points: int
    freshness_s: float


@dataclass
class Deployment:
    """An mlflow server, a sidecar in front of it with its Prometheus port, a typed client
    to the sidecar and a plain client to the server."""

    server: MlflowServer
    sidecar: SidecarProcess
    metrics_url: str
    container: ClientContainer
    client: MlflowClient
    experiment_id: str = field(default="")

    def new_runs(self, count: int) -> list[str]:
        return [self.client.create_run(self.experiment_id).info.run_id for _ in range(count)]


def scrape(metrics_url: str, name: str) -> float:
    """One gauge's value from the sidecar's Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"{name} is not among the sidecar's metrics")


def spool_depth(metrics_url: str) -> int:
    return int(scrape(metrics_url, "mlflow_sidecar_spool_pending_points"))


@contextlib.contextmanager
def deployed(work: Path, backend_uri: str | None = None, workers: int = 1) -> Iterator[Deployment]:
    """An mlflow server (without job execution, which the sidecar never uses) and a
    sidecar in front of it, both stopped on the way out whatever happened."""
    with contextlib.ExitStack() as cleanup:
        server = MlflowServer(work / "mlflow", backend_uri, workers=workers, job_execution=False)
        cleanup.callback(server.stop)
        server.start(timeout_s=STARTUP_WAIT_S)
        metrics_port = free_port()
        sidecar = SidecarProcess(
            work / "sidecar", server.url, MLFLOW_SIDECAR__METRICS__PORT=str(metrics_port)
        )
        cleanup.callback(sidecar.stop)
        sidecar.start(timeout_s=STARTUP_WAIT_S)
        container = ClientContainer()
        container.config.from_dict({"target": sidecar.target, "timeout_s": 600})
        cleanup.callback(container.shutdown_resources)
        client = MlflowClient(tracking_uri=server.url)
        deployment = Deployment(
            server, sidecar, f"http://127.0.0.1:{metrics_port}/metrics", container, client
        )
        deployment.experiment_id = client.create_experiment("sustained")
        yield deployment


def backlog(run_ids: list[str], count: int) -> list[tuple[str, str, float, int, int]]:
    """`count` points spread over the runs and KEYS keys, step by step."""
    base = int(time.time() * 1000)
    per_run = count // len(run_ids)
    return [
        (run_id, f"k{i % KEYS}", float(i), base + i, i // KEYS)
        for run_id in run_ids
        for i in range(per_run)
    ]


def log_batch_loop(deployment: Deployment, count: int, run_count: int = RUNS) -> Round:
    """One thread calling `log_batch` with LOG_BATCH points a call: (points, seconds)."""
    runs = deployment.new_runs(run_count)
    data = backlog(runs, count)
    calls = [
        (data[i][0], [MlflowMetric(k, v, ts, s) for _, k, v, ts, s in data[i : i + LOG_BATCH]])
        for i in range(0, len(data), LOG_BATCH)
    ]
    started = time.perf_counter()
    for run_id, metrics in calls:
        deployment.client.log_batch(run_id, metrics=metrics, synchronous=True)
    elapsed = time.perf_counter() - started
    check_delivered(deployment.client, runs, len(data))
    return len(data), elapsed


def delivered(deployment: Deployment, count: int, run_count: int = RUNS) -> Round:
    """A backlog from the first `log` until FlushMetrics says the spool is empty again:
    (points, seconds). FlushMetrics waits in the sidecar, so the wait costs neither side
    CPU, as polling would."""
    runs = deployment.new_runs(run_count)
    data = backlog(runs, count)
    stream = deployment.container.metric_stream()
    tracking = deployment.container.experiment_tracking()
    started = time.perf_counter()
    for run_id, key, value, ts, step in data:
        stream.log(run_id, key, value, step=step, timestamp_ms=ts)
    accepted = stream.close()
    flushed = tracking.flush_metrics(timeout_s=DRAIN_WAIT_S)
    elapsed = time.perf_counter() - started
    assert accepted == len(data), f"accepted {accepted} of {len(data)}"
    assert flushed.pending_points == 0, f"the spool did not drain: {flushed}"
    assert flushed.dead_letter_points == 0, f"points were dead-lettered: {flushed}"
    assert spool_depth(deployment.metrics_url) == 0
    check_delivered(deployment.client, runs, len(data))
    return len(data), elapsed


def check_delivered(client: MlflowClient, runs: list[str], count: int) -> None:
    """MLflow holds every point of every run and key."""
    per_key = count // len(runs) // KEYS
    for run_id in runs:
        for k in range(KEYS):
            held = len(client.get_metric_history(run_id, f"k{k}"))
            assert held == per_key, f"MLflow holds {held} of {per_key} points of {run_id} k{k}"


def capacity(
    results: dict[str, float],
    deployment: Deployment,
    count: int,
    direct_key: str,
    key: str,
    run_count: int = RUNS,
) -> None:
    """The log_batch baseline and the sidecar's delivered rate on one server: two rounds
    a side, alternating A B B A, so that the server's growing tables and the machine's
    drift in load fall on both sides alike; each side's points over its rounds' time."""
    measures: dict[str, Callable[[], Round]] = {
        direct_key: lambda: log_batch_loop(deployment, count, run_count),
        key: lambda: delivered(deployment, count, run_count),
    }
    rounds: dict[str, list[Round]] = {direct_key: [], key: []}
    for name in (direct_key, key, key, direct_key):
        rounds[name].append(measures[name]())
    for name, taken in rounds.items():
        results[name] = sum(points for points, _ in taken) / sum(seconds for _, seconds in taken)
        print(f"  {name:36s} {results[name]:14.1f}", flush=True)


@dataclass
class Freshness:
    """What a freshness run saw: markers logged (wall ms of the `log` call), the lag of
    each one seen in MLflow, the spool depth every second, points logged."""

    marks: dict[int, float] = field(default_factory=dict)
    lags_ms: dict[int, float] = field(default_factory=dict)
    depths: list[float] = field(default_factory=list)
    logged: int = 0
    logging_s: float = 0.0
    errors: list[BaseException] = field(default_factory=list)


def trainer(
    deployment: Deployment,
    run_id: str,
    rate_per_s: float,
    stop: threading.Event,
    on_tick: Callable[[int, Callable[..., None]], None] | None,
    counts: list[int],
    index: int,
) -> None:
    """Logs `rate_per_s` points a second over KEYS keys, a tick's worth every TICK_S on a
    fixed schedule (late ticks catch up), until `stop`; then closes its stream."""
    per_tick = rate_per_s * TICK_S
    stream = deployment.container.metric_stream()
    started = time.monotonic()
    owed = 0.0
    tick = 0
    step = 0
    while not stop.is_set():
        owed += per_tick
        while owed >= 1:
            stream.log(run_id, f"k{step % KEYS}", float(step), step=step // KEYS)
            step += 1
            owed -= 1
        if on_tick is not None:
            on_tick(tick, stream.log)
        tick += 1
        stop.wait(max(0.0, started + tick * TICK_S - time.monotonic()))
    counts[index] = step
    stream.close()


def freshness(deployment: Deployment, rate_per_s: float, seconds: float) -> Freshness:
    """TRAINERS trainer threads at `rate_per_s` in total for `seconds`; markers from the
    first one; a sampler polling MLflow for them; the spool's depth every second."""
    runs = deployment.new_runs(TRAINERS)
    seen = Freshness()
    lock = threading.Lock()

    def mark(tick: int, log: Callable[..., None]) -> None:
        now = float(int(time.time() * 1000))
        with lock:
            seen.marks[tick] = now
        log(runs[0], MARKER_KEY, now, step=tick, timestamp_ms=int(now))

    stop_trainers = threading.Event()
    stop_sampling = threading.Event()

    def sample_markers() -> None:
        sampler = MlflowClient(tracking_uri=deployment.server.url)
        while not stop_sampling.is_set():
            history = sampler.get_metric_history(runs[0], MARKER_KEY)
            now = time.time() * 1000
            with lock:
                for metric in history:
                    if metric.step not in seen.lags_ms:
                        seen.lags_ms[metric.step] = now - metric.value
            stop_sampling.wait(POLL_S)

    def sample_depth() -> None:
        while not stop_sampling.is_set():
            seen.depths.append(float(spool_depth(deployment.metrics_url)))
            stop_sampling.wait(DEPTH_EVERY_S)

    def recording(work: Callable[[], None]) -> Callable[[], None]:
        # A thread's failure must fail the run, not leave a figure short of samples.
        def run() -> None:
            try:
                work()
            except BaseException as error:
                seen.errors.append(error)
                stop_trainers.set()
                stop_sampling.set()

        return run

    counts = [0] * TRAINERS
    trainers = [
        threading.Thread(
            target=recording(
                functools.partial(
                    trainer,
                    deployment,
                    runs[i],
                    rate_per_s / TRAINERS,
                    stop_trainers,
                    mark if i == 0 else None,
                    counts,
                    i,
                )
            )
        )
        for i in range(TRAINERS)
    ]
    samplers = [
        threading.Thread(target=recording(sample_markers)),
        threading.Thread(target=recording(sample_depth)),
    ]
    for thread in samplers:
        thread.start()
    started = time.perf_counter()
    for thread in trainers:
        thread.start()
    try:
        stop_trainers.wait(seconds)
    finally:
        stop_trainers.set()
        seen.logging_s = time.perf_counter() - started
        for thread in trainers:
            thread.join()
        deadline = time.monotonic() + MARKER_WAIT_S
        while time.monotonic() < deadline:
            with lock:
                if len(seen.lags_ms) >= len(seen.marks):
                    break
            time.sleep(POLL_S)
        stop_sampling.set()
        for thread in samplers:
            thread.join()
    if seen.errors:
        raise seen.errors[0]
    seen.logged = sum(counts) + len(seen.marks)
    assert len(seen.lags_ms) == len(seen.marks), (
        f"{len(seen.marks) - len(seen.lags_ms)} markers never became visible"
    )
    return seen


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def sustained(
    results: dict[str, float], series: dict[str, list[float]], work: Path, sizes: SustainedSizes
) -> None:
    """Delivered capacity and its baseline on SQLite, then freshness at half that capacity
    on the same server; then delivered capacity and its baseline on PostgreSQL."""
    with deployed(work / "sqlite") as sqlite:
        capacity(
            results,
            sqlite,
            sizes.backlog_points,
            "metrics_log_batch_sqlite_direct_per_s",
            "metrics_delivered_sqlite_per_s",
        )
        rate = results["metrics_delivered_sqlite_per_s"] / 2
        seen = freshness(sqlite, rate, sizes.freshness_s)
    lags = sorted(seen.lags_ms.values())
    results["freshness_rate_per_s"] = rate
    results["freshness_logged_per_s"] = seen.logged / seen.logging_s
    results["freshness_markers"] = float(len(lags))
    results["freshness_p50_ms"] = statistics.median(lags)
    results["freshness_p99_ms"] = p99(lags)
    results["spool_depth_max"] = max(seen.depths)
    series["spool_depth_samples"] = seen.depths
    for key in ("freshness_rate_per_s", "freshness_p50_ms", "freshness_p99_ms", "spool_depth_max"):
        print(f"  {key:36s} {results[key]:14.1f}", flush=True)

    cluster = PostgresCluster()
    try:
        cluster.start()
        with deployed(work / "postgres", cluster.create_database(), PG_WORKERS) as postgres:
            capacity(
                results,
                postgres,
                sizes.backlog_points,
                "metrics_log_batch_pg_direct_per_s",
                "metrics_delivered_pg_parallel_per_s",
            )
            # One trainer's run: its series go in parallel, not its runs.
            capacity(
                results,
                postgres,
                sizes.backlog_points,
                "metrics_log_batch_pg_one_run_direct_per_s",
                "metrics_delivered_pg_one_run_per_s",
                run_count=1,
            )
    finally:
        cluster.stop()
