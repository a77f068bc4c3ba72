"""What the installed distribution tells about itself: `mlflow-sidecar --version` prints
pyproject's version, and the license pyproject names ships with it in full."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from mlflow_sidecar.server.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml names no version"
    return match.group(1)


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"mlflow-sidecar {_pyproject_version()}\n"


def test_the_version_is_semver() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata.version("mlflow-sidecar"))


def test_the_distribution_carries_the_apache_license() -> None:
    distribution = metadata.distribution("mlflow-sidecar")
    assert distribution.metadata["License"] == "Apache-2.0"
    shipped = [f for f in distribution.files or [] if f.name == "LICENSE"]
    assert len(shipped) == 1, distribution.files
    text = shipped[0].read_text()
    assert text == (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
