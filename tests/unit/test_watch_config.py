"""The `watch` settings (WatchModelAlias's pollers): defaults, bounds, and one-line errors
naming the key and its variable."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import ConfigError, load_config


def test_defaults():
    watch = load_config().watch
    assert (watch.poll_interval_s, watch.poll_jitter, watch.heartbeat_s) == (5.0, 0.1, 30.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poll_interval_s", "0.05"),
        ("poll_interval_s", "3600"),
        ("poll_jitter", "0"),
        ("poll_jitter", "0.5"),
        ("heartbeat_s", "0.1"),
        ("heartbeat_s", "3600"),
    ],
)
def test_values_at_the_bounds_are_taken(monkeypatch, key, value):
    monkeypatch.setenv(f"MLFLOW_SIDECAR__WATCH__{key.upper()}", value)
    assert getattr(load_config().watch, key) == float(value)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("poll_interval_s", "0", "greater than or equal to 0.05"),
        ("poll_interval_s", "3601", "less than or equal to 3600"),
        ("poll_interval_s", "soon", "valid number"),
        ("poll_jitter", "-0.1", "greater than or equal to 0"),
        ("poll_jitter", "0.6", "less than or equal to 0.5"),
        ("heartbeat_s", "0.05", "greater than or equal to 0.1"),
        ("heartbeat_s", "3601", "less than or equal to 3600"),
    ],
)
def test_a_value_out_of_bounds_is_one_line_naming_the_key(monkeypatch, key, value, problem):
    env = f"MLFLOW_SIDECAR__WATCH__{key.upper()}"
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert message.startswith(f"invalid config key watch.{key} ({env}): ")
    assert problem in message
    assert "\n" not in message


def test_the_settings_come_from_the_file_too(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("watch:\n  poll_interval_s: 0.5\n  poll_jitter: 0\n  heartbeat_s: 2\n")
    watch = load_config(path).watch
    assert (watch.poll_interval_s, watch.poll_jitter, watch.heartbeat_s) == (0.5, 0.0, 2.0)


def test_an_unknown_watch_key_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__WATCH__POLL_INTERVAL", "1")
    with pytest.raises(ConfigError, match="did you mean MLFLOW_SIDECAR__WATCH__POLL_INTERVAL_S"):
        load_config()
