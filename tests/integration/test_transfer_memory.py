"""Peak memory of a sidecar process while a 1 GiB artifact goes up and comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from tests.support.files import MIB, random_file, sha256_of
from tests.support.processes import free_port

GIB = 1024 * MIB
PEAK_RSS_LIMIT = 400 * MIB


def vm_kib(pid: int, field: str) -> int:
    """A `Vm*` line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def wait_serving(target: str, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"the sidecar on {target} did not report SERVING")


@pytest.fixture()
def sidecar_process(mlflow_server, tmp_path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`mlflow-sidecar serve` as its own process, configured through the environment."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SIDECAR__SERVER__PORT": str(port),
        "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path / "sidecar-data"),
        "MLFLOW_SIDECAR__MLFLOW__TRACKING_URI": mlflow_server.url,
    }
    executable = Path(sys.executable).with_name("mlflow-sidecar")
    with (tmp_path / "sidecar.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(executable), "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, proc)
        yield proc, target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def test_sidecar_peak_rss_stays_under_400_mib_for_a_1_gib_round_trip(
    sidecar_process, mlflow_server, tmp_path, unique
):
    """Reads the SERVER's memory, not the test's: the peak resident set (VmHWM in
    /proc/<pid>/status) of the separate `mlflow-sidecar serve` process, after it has
    received a 1 GiB upload, stored it in MLflow, fetched it back and streamed it out."""
    proc, target = sidecar_process
    container = ClientContainer()
    container.config.from_dict({"target": target})
    source = random_file(tmp_path / "one_gib.bin", GIB)
    stored: list[Path] = []
    try:
        tracking = container.experiment_tracking()
        experiment = tracking.create_experiment(f"rss-{unique}")
        run_id = tracking.start_run(experiment.experiment_id).run_id
        idle_kib = vm_kib(proc.pid, "VmRSS")

        info = tracking.upload_artifact(run_id, source, "big/one_gib.bin")
        local = tracking.download_artifact(run_id, "big/one_gib.bin", tmp_path / "down")

        peak_kib = vm_kib(proc.pid, "VmHWM")
        assert info.size_bytes == GIB
        assert sha256_of(local) == sha256_of(source) == info.sha256
        print(f"sidecar RSS: idle {idle_kib // 1024} MiB, peak {peak_kib // 1024} MiB")
        assert peak_kib * 1024 < PEAK_RSS_LIMIT, f"peak RSS {peak_kib // 1024} MiB"
        stored = [p for p in Path(mlflow_server.artifacts).rglob("one_gib.bin") if run_id in str(p)]
    finally:
        container.shutdown_resources()
        # A gigabyte per run would pile up in pytest's kept temp directories.
        for path in [source, tmp_path / "down" / "big" / "one_gib.bin", *stored]:
            path.unlink(missing_ok=True)
