"""`mlflow-sidecar serve` and `health` as separate processes: embedded store, probe, drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import free_port

CLI = str(Path(sys.executable).with_name("mlflow-sidecar"))


def health(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "health", "--target", target, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def wait_serving(target: str, proc: subprocess.Popen[str], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"sidecar exited early: {proc.stdout.read() if proc.stdout else ''}"
            )
        if health(target).returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError("sidecar did not reach SERVING")


@pytest.fixture()
def embedded_sidecar(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path / "data"),
        "MLFLOW_SIDECAR__SERVER__PORT": str(port),
        "MLFLOW_SIDECAR__SERVER__GRACE_S": "2",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    yield f"127.0.0.1:{port}", proc, tmp_path / "data"
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_serve_embedded_reaches_serving_and_drains_on_sigterm(embedded_sidecar):
    target, proc, data_dir = embedded_sidecar
    wait_serving(target, proc)
    result = health(target)
    assert result.returncode == 0
    assert result.stdout.strip() == f"{target}: SERVING"
    assert (data_dir / "mlflow.db").is_file()
    assert (data_dir / "artifacts").is_dir()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    output = proc.stdout.read() if proc.stdout else ""
    assert "received SIGTERM" in output
    assert "stopped" in output
    assert health(target).returncode == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_serve_drains_on_sigint_and_sighup_as_on_sigterm(embedded_sidecar, signum):
    # A closed terminal (SIGHUP) or Ctrl-C stops the sidecar as an orchestrator does.
    target, proc, _data_dir = embedded_sidecar
    wait_serving(target, proc)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 0
    output = proc.stdout.read() if proc.stdout else ""
    assert f"received {signal.Signals(signum).name}" in output
    assert "stopped" in output


def test_health_fails_when_nothing_listens():
    result = health(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
