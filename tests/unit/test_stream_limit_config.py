"""`server.max_streaming_rpcs` and `server.max_waiting_streams` leave workers for unary
calls, or the config is refused; `server.stream_wait_s` is bounded."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS, ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MLFLOW_SIDECAR") or name in MLFLOW_ENV_KEYS:
            monkeypatch.delenv(name)


def test_unset_they_are_half_and_a_quarter_of_the_workers() -> None:
    server = load_config().server
    assert (server.workers, server.max_streaming_rpcs, server.max_waiting_streams) == (64, 32, 16)
    assert server.stream_wait_s == 10
    small = load_config(server={"workers": 4}).server
    assert (small.max_streaming_rpcs, small.max_waiting_streams) == (2, 1)
    # A single stream at least, and always a worker left for unary calls.
    smallest = load_config(server={"workers": 2}).server
    assert (smallest.max_streaming_rpcs, smallest.max_waiting_streams) == (1, 0)


def test_unset_the_line_takes_what_the_streams_leave() -> None:
    server = load_config(server={"workers": 8, "max_streaming_rpcs": 6}).server
    assert server.max_waiting_streams == 1


def test_unset_they_also_stay_below_the_call_limit() -> None:
    config = load_config(server={"workers": 64, "max_concurrent_rpcs": 20})
    assert config.server.max_streaming_rpcs == 19
    assert config.server.max_waiting_streams == 0


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


def test_a_line_that_leaves_no_worker_for_unary_calls_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__WORKERS", "8")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__MAX_STREAMING_RPCS", "4")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__MAX_WAITING_STREAMS", "4")
    with pytest.raises(ConfigError) as refused:
        load_config()
    message = str(refused.value)
    assert "MLFLOW_SIDECAR__SERVER__MAX_WAITING_STREAMS" in message
    assert "must be below server.workers (8)" in message
    assert "at most 3 here" in message


def test_no_line_is_taken() -> None:
    assert load_config(server={"max_waiting_streams": 0}).server.max_waiting_streams == 0


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_waiting_streams", -2), ("stream_wait_s", -1), ("stream_wait_s", 3601)],
)
def test_out_of_range_values_are_refused(setting: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"server\.{setting}"):
        load_config(server={setting: value})


def test_one_call_in_progress_is_refused() -> None:
    """No stream limit below a limit of one call exists: the derived one would equal it."""
    with pytest.raises(ConfigError) as refused:
        load_config(server={"max_concurrent_rpcs": 1})
    message = str(refused.value)
    assert "server.max_concurrent_rpcs" in message and "greater than or equal to 2" in message


def test_the_smallest_call_limit_derives_a_stream_limit_below_it() -> None:
    server = load_config(server={"max_concurrent_rpcs": 2}).server
    assert (server.max_streaming_rpcs, server.max_waiting_streams) == (1, 0)
