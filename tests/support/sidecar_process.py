"""The sidecar as a separate process (`mlflow-sidecar serve`), for kill and restart tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from tests.support.processes import free_port

CLI = str(Path(sys.executable).with_name("mlflow-sidecar"))


def health_ok(target: str) -> bool:
    """True when `mlflow-sidecar health` says SERVING."""
    # MLflow's own variables configure the CLI too: the test process's (MLflow sets
    # MLFLOW_REGISTRY_URI to a `sidecar://` URI a client was made with) would fail it.
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_KEYS}
    result = subprocess.run(
        [CLI, "health", "--target", target, "--timeout", "1"],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


class SidecarProcess:
    """`mlflow-sidecar serve` on a fixed port and data dir; start, kill and start again."""

    def __init__(
        self, data_dir: Path, tracking_uri: str = "", *, stdout_path: Path | None = None, **env: str
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = data_dir / "sidecar.log"
        # Where stdout goes when it must not mix with the log (stderr); else the log.
        self.stdout_path = stdout_path
        # MLflow's own variables configure the sidecar too; the test process's (some set by
        # in-process sidecars) must not leak into this one. Pass them in `env` to test them.
        inherited = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV_KEYS}
        self.env = {
            **inherited,
            "MLFLOW_SIDECAR__DATA_DIR": str(data_dir),
            "MLFLOW_SIDECAR__SERVER__PORT": str(self.port),
            "MLFLOW_SIDECAR__SERVER__GRACE_S": "2",
            **env,
        }
        if tracking_uri:
            self.env["MLFLOW_SIDECAR__MLFLOW__TRACKING_URI"] = tracking_uri
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process without waiting."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            if self.stdout_path is None:
                self.proc = subprocess.Popen(
                    [CLI, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
                return
            with self.stdout_path.open("ab") as out:
                self.proc = subprocess.Popen([CLI, "serve"], env=self.env, stdout=out, stderr=log)

    def start(self, timeout_s: float = 90) -> None:
        """Start and wait for SERVING."""
        self.launch()
        self.wait_serving(timeout_s)

    def wait_serving(self, timeout_s: float = 90) -> None:
        """Wait for a launched process to say SERVING: launch several, then wait for each,
        and they start side by side."""
        assert self.proc is not None, "the sidecar was not launched"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log_tail()}")
            if health_ok(self.target):
                return
            time.sleep(0.2)
        raise TimeoutError(f"sidecar did not reach SERVING: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash or an OOM kill would do."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM and wait for the drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the sidecar's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
