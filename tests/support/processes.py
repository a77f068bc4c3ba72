"""Real processes for tests and benchmarks: an `mlflow server` on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def stop_process_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group `proc` leads (started with `start_new_session`), SIGKILL
    after 15 s; nothing when it is not running."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def mlflow_command() -> list[str]:
    """MLflow's CLI on the interpreter running the tests (`python -m mlflow`: a console
    script may name another interpreter, one without this environment's packages)."""
    return [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """`mlflow server` with a SQL backend and served artifacts, on a fixed loopback port.

    `artifacts` is where artifacts go (a directory in `workdir` unless given, e.g. an
    `s3://` URI); with `serve_artifacts=False` it is the default artifact root that clients
    write to themselves (`--no-serve-artifacts`) instead of the proxy's destination. `env`
    is added to the server's environment (S3 credentials and endpoint, say).

    `stop()` and `start()` again keep the port and the data, as an outage would. `workers`
    is how many server processes answer requests (uvicorn's workers), each with its own
    connections to the backend store. `job_execution=False` leaves out MLflow's job runner
    and its consumers (scorers, trace archival), which the sidecar never uses.
    """

    def __init__(
        self,
        workdir: Path,
        backend_uri: str | None = None,
        *,
        artifacts: str | None = None,
        serve_artifacts: bool = True,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
        job_execution: bool = True,
    ) -> None:
        self.workdir = workdir
        self.workers = workers
        self.job_execution = job_execution
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_uri = backend_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts = artifacts or str(workdir / "artifacts")
        self.serve_artifacts = serve_artifacts
        self.env = dict(env or {})
        self.log_path = workdir / "mlflow-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _artifact_args(self) -> list[str]:
        if self.serve_artifacts:
            return ["--artifacts-destination", self.artifacts]
        return ["--default-artifact-root", self.artifacts, "--no-serve-artifacts"]

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server and wait for /health."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            **self.env,
        }
        if not self.job_execution:
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        # uvicorn restarts a worker that does not answer its health check within 5 s, which
        # one still importing MLflow on a busy machine fails: give workers a minute.
        uvicorn_opts = (
            ["--uvicorn-opts", "--timeout-worker-healthcheck 60"] if self.workers > 1 else []
        )
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    *mlflow_command(),
                    "server",
                    "--backend-store-uri",
                    self.backend_uri,
                    *self._artifact_args(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.workers),
                    *uvicorn_opts,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        try:
            wait_for_http(f"{self.url}/health", timeout_s, self._proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"mlflow server did not start; log:\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop the server and every process it started."""
        proc, self._proc = self._proc, None
        stop_process_group(proc)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the server's processes (SIGSTOP) for the block: it takes no CPU and
        answers nothing until they continue."""
        assert self._proc is not None, "the server is not running"
        os.killpg(self._proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
