"""The deployment examples parse and keep the promises their README makes."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_pod_runs_the_sidecar_with_probes_and_a_spool_volume():
    pod = yaml.safe_load((ROOT / "deploy/kubernetes/trainer-pod.yaml").read_text())
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"][:2] == ["mlflow-sidecar", "health"]
    assert {"name": "sidecar-data", "mountPath": "/data"} in sidecar["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes["sidecar-data"]
    env = {e["name"]: e for e in sidecar["env"]}
    assert "MLFLOW_SIDECAR__SERVER__HOST" not in env  # loopback: no auth needed inside the pod


def test_compose_has_postgres_s3_mlflow_and_an_authenticated_sidecar():
    compose = yaml.safe_load((ROOT / "deploy/compose/docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "sidecar"} <= set(services)
    assert "postgresql://" in services["mlflow"]["command"]
    assert "s3://" in services["mlflow"]["command"]
    sidecar_env = services["sidecar"]["environment"]
    assert sidecar_env["MLFLOW_SIDECAR__SERVER__HOST"] == "0.0.0.0"
    assert sidecar_env["MLFLOW_SIDECAR__AUTH__TOKENS"]
