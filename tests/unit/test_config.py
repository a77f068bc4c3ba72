"""Configuration: defaults, YAML, env overrides, and one clear line for a bad key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_sidecar.server.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("MLFLOW_SIDECAR"):
            monkeypatch.delenv(name)


def test_defaults_serve_one_machine_with_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    config = load_config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50051)
    assert config.embedded
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert config.registry_uri == config.tracking_uri
    assert config.artifact_root == tmp_path / "artifacts"


def test_env_overrides_nested_keys(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "50052")
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", "/var/lib/sidecar")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://mlflow:5000")
    config = load_config()
    assert config.server.port == 50052
    assert config.data_dir == Path("/var/lib/sidecar")
    assert config.tracking_uri == "http://mlflow:5000"
    assert not config.embedded


def test_yaml_file_and_env_precedence(tmp_path, monkeypatch):
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  port: 6000\n  workers: 4\nretry:\n  max_tries: 3\n")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "6001")
    config = load_config(path)
    assert config.server.port == 6001  # env wins over the file
    assert config.server.workers == 4
    assert config.retry.max_tries == 3


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MLFLOW_SIDECAR__SERVER__PORT": "abc"}, "server.port"),
        ({"MLFLOW_SIDECAR__SERVER__PORT": "70000"}, "server.port"),
        ({"MLFLOW_SIDECAR__RETRY__MAX_TRIES": "0"}, "retry.max_tries"),
        ({"MLFLOW_SIDECAR__LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_invalid_values_name_the_key(monkeypatch, env, key):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert f"invalid config key {key} " in message
    assert "\n" not in message


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_config(path)


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_secrets_are_not_shown(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__PASSWORD", "hunter2")
    config = load_config()
    assert "hunter2" not in repr(config)
    assert config.mlflow.password.get_secret_value() == "hunter2"


def test_serve_exits_non_zero_with_one_line_for_a_bad_key(tmp_path):
    cli = Path(sys.executable).with_name("mlflow-sidecar")
    result = subprocess.run(
        [str(cli), "serve"],
        env={
            "MLFLOW_SIDECAR__SERVER__PORT": "not-a-port",
            "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "server.port" in lines[0] and "MLFLOW_SIDECAR__SERVER__PORT" in lines[0]


def test_drain_on_stop_must_fit_the_grace_period(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "5")
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__DRAIN_ON_STOP_S", "6")
    with pytest.raises(ConfigError) as refused:
        load_config()
    assert "spool" in str(refused.value) and "server.grace_s" in str(refused.value)
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__DRAIN_ON_STOP_S", "5")
    assert load_config().spool.drain_on_stop_s == 5


def test_an_unset_drain_shrinks_to_a_shorter_grace(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "2")
    assert load_config().spool.drain_on_stop_s == 2
    monkeypatch.delenv("MLFLOW_SIDECAR__SERVER__GRACE_S")
    assert load_config().spool.drain_on_stop_s == 8
