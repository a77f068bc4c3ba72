"""Any gRPC language: a Node.js client (@grpc/grpc-js, contracts loaded from protos/ at run
time) drives the tracking and registry happy path against a real sidecar and MLflow
server, client and server streams included; Python then reads what it wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from mlflow_sidecar.v1 import registry_pb2, tracking_pb2

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("node_client") / "happy_path.mjs"


def test_a_node_client_runs_the_happy_path(sidecar, tracking_stub, registry_stub, unique):
    node = shutil.which("node")
    assert node, "Node.js is needed (make test installs the npm packages, the machine has node)"
    assert (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `npm ci` first"
    result = subprocess.run(
        [node, str(SCRIPT), sidecar.target, str(ROOT / "protos"), unique],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout.strip().splitlines()[-1])

    run = tracking_stub.GetRun(tracking_pb2.GetRunRequest(run_id=made["run_id"])).run
    assert run.info.experiment_id == made["experiment_id"]
    assert run.info.status == tracking_pb2.RUN_STATUS_FINISHED
    assert dict(run.data.params) == {"lr": "0.001", "gamma": "0.99"}
    history = tracking_stub.GetMetricHistory(
        tracking_pb2.GetMetricHistoryRequest(run_id=made["run_id"], metric_key="reward")
    )
    assert [(m.step, m.value) for m in history.metrics] == [
        (0, 0.5),
        (1, 1.5),
        (2, 2.5),
        (3, 3.5),
        (4, 4.5),
    ]
    champion = registry_stub.GetModelVersionByAlias(
        registry_pb2.GetModelVersionByAliasRequest(name=made["model"], alias="champion")
    ).model_version
    assert str(champion.version) == made["version"]
    assert champion.run_id == made["run_id"]
