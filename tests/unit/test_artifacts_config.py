"""The `artifacts` config section and the client's transfer settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.client.settings import ClientSettings
from mlflow_sidecar.server.config import ConfigError, load_config


def test_defaults(tmp_path):
    config = load_config(data_dir=tmp_path)
    assert config.artifacts.chunk_bytes == 1024 * 1024
    assert config.artifacts.max_upload_bytes == 8 * 1024**3
    assert config.staging_dir == tmp_path / "tmp"


@pytest.mark.parametrize("chunk_bytes", [64 * 1024 - 1, 1024 * 1024 + 1])
def test_chunk_size_is_bounded(tmp_path, chunk_bytes):
    with pytest.raises(ConfigError, match=r"artifacts\.chunk_bytes"):
        load_config(data_dir=tmp_path, artifacts={"chunk_bytes": chunk_bytes})


def test_chunks_must_fit_the_server_message_limit(tmp_path):
    with pytest.raises(ConfigError, match="max_message_bytes"):
        load_config(
            data_dir=tmp_path,
            server={"max_message_bytes": 512 * 1024},
            artifacts={"chunk_bytes": 512 * 1024},
        )
    fits = load_config(
        data_dir=tmp_path,
        server={"max_message_bytes": 512 * 1024},
        artifacts={"chunk_bytes": 256 * 1024},
    )
    assert fits.artifacts.chunk_bytes == 256 * 1024
    # Left unset, the chunk size shrinks to fit the message limit.
    small = load_config(data_dir=tmp_path, server={"max_message_bytes": 64 * 1024})
    assert small.artifacts.chunk_bytes == 63 * 1024


def test_limits_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__ARTIFACTS__MAX_UPLOAD_BYTES", "12345")
    assert load_config(data_dir=tmp_path).artifacts.max_upload_bytes == 12345


def test_client_chunks_must_fit_its_message_limit():
    with pytest.raises(ValidationError, match="max_message_bytes"):
        ClientSettings(max_message_bytes=64 * 1024, chunk_bytes=64 * 1024)
    assert ClientSettings().upload_chunk_bytes == 1024 * 1024
    assert ClientSettings().transfer_timeout_s == 3600.0
    # Left unset, the chunk size shrinks to fit a small message limit.
    assert ClientSettings(max_message_bytes=64 * 1024).upload_chunk_bytes == 63 * 1024


def test_client_container_passes_the_transfer_settings():
    container = ClientContainer()
    container.config.from_dict({"max_message_bytes": 64 * 1024, "transfer_timeout_s": 5.0})
    tracking = container.experiment_tracking()
    assert (tracking._chunk_bytes, tracking._transfer_timeout) == (63 * 1024, 5.0)
    container.shutdown_resources()


@pytest.mark.parametrize("chunk_bytes", [0, 1024 * 1024 + 1])
def test_grpc_client_refuses_an_out_of_range_chunk_size(chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes"):
        GrpcExperimentTracking(stub=None, chunk_bytes=chunk_bytes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "uri", ["S3://bucket/prefix", "s3://bucket/prefix?versionId=1", "s3://bucket/../other"]
)
def test_an_allowed_uri_under_which_no_location_passes_is_refused(tmp_path, uri):
    # Every location under it is UNSAFE_URI (an upper-case scheme among them): the entry
    # was taken, and every run stored there was PERMISSION_DENIED all the same.
    with pytest.raises(ConfigError, match=r"artifacts\.allowed_uris.*no location under it"):
        load_config(data_dir=tmp_path, artifacts={"allowed_uris": [uri]})


def test_the_config_check_of_allowed_uris_leaves_grpc_unloaded(tmp_path):
    # serve sets grpc's log verbosity after the configuration loads, before grpc does.
    import subprocess
    import sys

    code = (
        "import sys; from mlflow_sidecar.server.config import load_config;"
        f" load_config(data_dir={str(tmp_path)!r}, artifacts={{'allowed_uris': ['s3://b/p']}});"
        " assert 'grpc' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
