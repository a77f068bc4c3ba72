"""A trainer whose typed-client call had to wait for the sidecar still exits when its script
ends: the README's pattern (a module-level ClientContainer, default settings), run as a
child process, against a port nothing listens on and against a sidecar that comes up
while the call waits. Against real loopback gRPC servers."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.support.processes import free_port

# The child's whole life is a few seconds of calls; a hang at exit never ends by itself.
EXIT_LIMIT_S = 60

TRAINER = """
import sys

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.errors import UnavailableError

container = ClientContainer()
container.config.from_dict({"target": sys.argv[1], "timeout_s": float(sys.argv[2])})
tracking = container.experiment_tracking()
try:
    print("experiment", tracking.get_experiment("7").name, flush=True)
except UnavailableError as exc:
    print("unavailable", exc.message, flush=True)
print("script ends", flush=True)
"""


class _Tracking(pb_grpc.ExperimentTrackingServiceServicer):
    def GetExperiment(self, request, context):
        return pb.GetExperimentResponse(
            experiment=pb.Experiment(experiment_id=request.experiment_id, name="late")
        )


def _serve(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(_Tracking(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def _run_trainer(target: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, target, str(timeout_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        pytest.fail(f"the trainer did not exit after its script ended; it printed {out!r}")
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.fixture()
def late_port() -> Iterator[tuple[int, threading.Event]]:
    """A port whose server starts once `go` is set (or at teardown, never)."""
    port = free_port()
    go = threading.Event()
    servers: list[grpc.Server] = []

    def start_when_asked() -> None:
        if go.wait(EXIT_LIMIT_S):
            servers.append(_serve(port))

    starter = threading.Thread(target=start_when_asked, daemon=True)
    starter.start()
    yield port, go
    go.set()
    starter.join()
    for server in servers:
        server.stop(0)


def test_a_trainer_exits_after_a_call_that_waited_for_a_sidecar_that_stayed_down():
    done = _run_trainer(f"127.0.0.1:{free_port()}", timeout_s=2)
    assert done.returncode == 0, done.stderr
    assert "unavailable the sidecar at 127.0.0.1:" in done.stdout
    assert done.stdout.endswith("script ends\n")


def test_a_trainer_exits_after_a_call_that_waited_for_the_sidecar_to_come_up(late_port):
    port, go = late_port
    threading.Timer(2.0, go.set).start()
    done = _run_trainer(f"127.0.0.1:{port}", timeout_s=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "experiment late\nscript ends\n"
