"""`server.max_streaming_rpcs` leaves workers for unary calls, or the config is refused."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS, ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MLFLOW_SIDECAR") or name in MLFLOW_ENV_KEYS:
            monkeypatch.delenv(name)


def test_unset_it_is_three_quarters_of_the_workers() -> None:
    assert load_config().server.workers == 64
    assert load_config().server.max_streaming_rpcs == 48
    assert load_config(server={"workers": 4}).server.max_streaming_rpcs == 3
    # A single stream at least, and always a worker left for unary calls.
    assert load_config(server={"workers": 2}).server.max_streaming_rpcs == 1


def test_unset_it_also_stays_below_the_call_limit() -> None:
    config = load_config(server={"workers": 64, "max_concurrent_rpcs": 20})
    assert config.server.max_streaming_rpcs == 19


def test_a_value_below_the_workers_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__WORKERS", "8")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__MAX_STREAMING_RPCS", "7")
    assert load_config().server.max_streaming_rpcs == 7


@pytest.mark.parametrize("streams", ["8", "9"])
def test_as_many_streams_as_workers_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch, streams: str
) -> None:
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__WORKERS", "8")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__MAX_STREAMING_RPCS", streams)
    with pytest.raises(ConfigError) as refused:
        load_config()
    message = str(refused.value)
    assert "\n" not in message
    assert "server.max_streaming_rpcs" in message
    assert "MLFLOW_SIDECAR__SERVER__MAX_STREAMING_RPCS" in message
    assert "must be below server.workers (8)" in message


def test_as_many_streams_as_calls_in_progress_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"must be below server.max_concurrent_rpcs \(10\)"):
        load_config(server={"workers": 64, "max_concurrent_rpcs": 10, "max_streaming_rpcs": 10})


def test_one_worker_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_config(server={"workers": 1})
