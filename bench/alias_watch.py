"""Alias watch latency (group `watch` of bench/run.py).

A sidecar polls the model every `POLL_INTERVAL_S`; five typed-client watches of its
champion run side by side, and the alias moves several times, each move at a random phase
of the poll interval. The latency of a move is the time from SetModelAlias returning to a
watch yielding the change, for every watch. The baseline, in the same run: one client that
polls MLflow itself (`get_model_version_by_alias`) at the same interval, as inference would
without the sidecar.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from mlflow_sidecar.client import AliasWatch, ClientContainer
from tests.support.processes import MlflowServer
from tests.support.sidecar_process import SidecarProcess

POLL_INTERVAL_S = 1.0
WATCHES = 5
MODEL = "bench-champion"
ALIAS = "champion"
# Bounds, not measures: how long a move may take to show on a busy machine.
MOVE_WAIT_S = 60.0


class Arrivals:
    """When each reader first saw each version: (reader, version) -> monotonic time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[int, int], float] = {}

    def saw(self, reader: int, version: int) -> None:
        with self._lock:
            self._seen.setdefault((reader, version), time.monotonic())

    def of(self, version: int, readers: range) -> list[float] | None:
        with self._lock:
            found = [self._seen.get((reader, version)) for reader in readers]
        return None if None in found else found  # type: ignore[return-value]


def _read(watch: AliasWatch, reader: int, arrivals: Arrivals) -> None:
    for change in watch:
        arrivals.saw(reader, change.version)


def _poll_directly(client: MlflowClient, arrivals: Arrivals, stop: threading.Event) -> None:
    """The baseline: the alias asked of MLflow every interval by the client itself."""
    while not stop.wait(POLL_INTERVAL_S):
        found = client.get_model_version_by_alias(MODEL, ALIAS)
        arrivals.saw(WATCHES, int(found.version))


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def alias_watch(results: dict[str, float], server: MlflowServer, work: Path, moves: int) -> None:
    """Fill `alias_watch_latency_{p50,max}_ms`, the direct polling baseline's
    `alias_poll_direct_latency_{p50,max}_ms`, and `alias_watch_poll_interval_s`."""
    client = MlflowClient(tracking_uri=server.url)
    client.create_registered_model(MODEL)
    run = client.create_run(client.create_experiment("bench-watch")).info.run_id
    for _ in range(moves + 1):
        client.create_model_version(MODEL, f"runs:/{run}/model", run_id=run)
    client.set_registered_model_alias(MODEL, ALIAS, "1")
    sidecar = SidecarProcess(
        work / "sidecar-watch",
        server.url,
        MLFLOW_SIDECAR__WATCH__POLL_INTERVAL_S=str(POLL_INTERVAL_S),
    )
    container = ClientContainer()
    arrivals = Arrivals()
    stop = threading.Event()
    watches: list[AliasWatch] = []
    try:
        sidecar.start()
        container.config.from_dict({"target": sidecar.target})
        registry = container.model_registry()
        watches = [registry.watch(MODEL, [ALIAS]) for _ in range(WATCHES)]
        threads = [
            threading.Thread(target=_read, args=(w, i, arrivals), daemon=True)
            for i, w in enumerate(watches)
        ]
        threads.append(
            threading.Thread(target=_poll_directly, args=(client, arrivals, stop), daemon=True)
        )
        for thread in threads:
            thread.start()
        watched: list[float] = []
        direct: list[float] = []
        for version in range(2, moves + 2):
            time.sleep(random.uniform(0, POLL_INTERVAL_S))  # a random phase of the polls
            registry.set_model_alias(MODEL, ALIAS, version)
            moved = time.monotonic()
            deadline = moved + MOVE_WAIT_S
            while (seen := arrivals.of(version, range(WATCHES + 1))) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"version {version} did not reach every reader")
                time.sleep(0.01)
            watched += [(at - moved) * 1000 for at in seen[:WATCHES]]
            direct.append((seen[WATCHES] - moved) * 1000)
        results["alias_watch_poll_interval_s"] = POLL_INTERVAL_S
        results["alias_watch_latency_p50_ms"] = statistics.median(watched)
        results["alias_watch_latency_max_ms"] = max(watched)
        results["alias_poll_direct_latency_p50_ms"] = statistics.median(direct)
        results["alias_poll_direct_latency_max_ms"] = max(direct)
        results["alias_watch_latency_p90_ms"] = _percentile(watched, 0.9)
        for key in (
            "alias_watch_latency_p50_ms",
            "alias_watch_latency_p90_ms",
            "alias_watch_latency_max_ms",
            "alias_poll_direct_latency_p50_ms",
            "alias_poll_direct_latency_max_ms",
        ):
            print(f"  {key:36s} {results[key]:14.1f}", flush=True)
    finally:
        stop.set()
        for watch in watches:
            watch.close()
        container.shutdown_resources()
        sidecar.stop()
