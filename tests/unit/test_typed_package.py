"""The installed package is typed (PEP 561): a trainer's mypy sees the client's real types,
not `Any`. mypy runs outside the repository, so it finds the package only as installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """\
from mlflow_sidecar.client import ExperimentTracking, Metric
from mlflow_sidecar.v1 import tracking_pb2


def start(tracking: ExperimentTracking) -> None:
    reveal_type(tracking.start_run("1"))


reveal_type(Metric("reward", 1.0))
reveal_type(tracking_pb2.StartRunRequest().run_name)
"""


def test_mypy_sees_the_installed_client_types(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--cache-dir",
            str(tmp_path / "cache"),
            "probe.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    revealed = [
        line.split("Revealed type is ", 1)[1]
        for line in result.stdout.splitlines()
        if "Revealed type is" in line
    ]
    assert revealed == [
        '"mlflow_sidecar.core.domain.Run"',
        '"mlflow_sidecar.core.domain.Metric"',
        '"str"',
    ], result.stdout
    assert result.returncode == 0, result.stdout
