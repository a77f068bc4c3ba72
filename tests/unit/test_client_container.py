"""ClientContainer: configuration, composition into a host container, overriding for tests."""

from __future__ import annotations

import pytest
from dependency_injector import containers, providers

from mlflow_sidecar.client import ClientContainer, ExperimentTracking, load_env
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking


class TrainerService:
    """What a host application's training service looks like: it depends on the port."""

    def __init__(self, tracking: ExperimentTracking) -> None:
        self.tracking = tracking


class HostContainer(containers.DeclarativeContainer):
    """A host application's own container, composing ours in one line."""

    config = providers.Configuration()
    sidecar = providers.Container(ClientContainer, config=config.sidecar)
    trainer = providers.Factory(TrainerService, tracking=sidecar.experiment_tracking)


class FakeTracking:
    """Stands in for the port in a host application's tests."""


def test_defaults_and_dict_config():
    container = ClientContainer()
    assert container.config.target() == "127.0.0.1:50051"
    container.config.from_dict({"target": "10.0.0.1:6000", "timeout_s": 5})
    tracking = container.experiment_tracking()
    assert isinstance(tracking, GrpcExperimentTracking)
    assert tracking._timeout == 5.0
    assert isinstance(container.model_registry(), GrpcModelRegistry)
    container.shutdown_resources()


def test_env_config(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGET", "sidecar:7000")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TIMEOUT_S", "2.5")
    container = ClientContainer()
    load_env(container)
    assert container.config.target() == "sidecar:7000"
    assert container.config.timeout_s() == 2.5


def test_env_config_leaves_the_settings_it_does_not_name(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TIMEOUT_S", "10")
    container = ClientContainer()
    container.config.from_dict(
        {"target": "sidecar.internal:50051", "token": "s3cret", "stream_when_full": "raise"}
    )
    load_env(container)
    settings = container.settings()
    assert settings.target == "sidecar.internal:50051"
    assert settings.token == "s3cret"
    assert settings.stream_when_full == "raise"
    assert settings.timeout_s == 10


def test_host_container_composes_and_overrides():
    host = HostContainer()
    host.config.from_dict({"sidecar": {"target": "127.0.0.1:1", "timeout_s": 1.0}})
    assert isinstance(host.trainer().tracking, GrpcExperimentTracking)
    fake = FakeTracking()
    with host.sidecar.experiment_tracking.override(fake):
        assert host.trainer().tracking is fake
    host.shutdown_resources()


def test_metric_streams_fit_their_messages_to_the_channel():
    container = ClientContainer()
    stream = container.metric_stream()
    assert stream._core._max_message_bytes == 1024 * 1024
    stream.close()
    container.shutdown_resources()
    limited = ClientContainer()
    limited.config.from_dict({"max_message_bytes": 64 * 1024})
    small = limited.metric_stream()
    assert small._core._max_message_bytes == 64 * 1024
    small.close()
    limited.shutdown_resources()


def test_a_client_variable_that_names_no_setting_is_refused(monkeypatch):
    # A typo would otherwise leave the default in place without a word.
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGT", "10.0.0.1:50051")
    container = ClientContainer()
    with pytest.raises(ValueError, match="did you mean MLFLOW_SIDECAR_CLIENT_TARGET"):
        load_env(container)


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("MLFLOW_SIDECAR_CLEINT_TARGET", "MLFLOW_SIDECAR_CLIENT_TARGET"),
        ("MLFLOW_SIDECAR_CLIENTTARGET", "MLFLOW_SIDECAR_CLIENT_TARGET"),
        ("MLFLOW_SIDECAR_TIMEOUT_S", "MLFLOW_SIDECAR_CLIENT_TIMEOUT_S"),
        ("MLFLOW_SIDECAR_CONFG", "MLFLOW_SIDECAR_CONFIG"),
    ],
)
def test_a_misspelt_prefix_is_refused_with_the_variable_meant(monkeypatch, variable, meant):
    # Outside the exact MLFLOW_SIDECAR_CLIENT_ prefix a typo kept the default target.
    monkeypatch.setenv(variable, "10.0.0.1:50051")
    with pytest.raises(ValueError, match=f"unknown variable {variable}: did you mean {meant}\\?"):
        load_env(ClientContainer())


def test_an_mlflow_sidecar_variable_like_no_other_names_the_forms_there_are(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR_SPOOL__MAX_POINTS", "10")
    with pytest.raises(ValueError, match="client settings are MLFLOW_SIDECAR_CLIENT_<KEY>"):
        load_env(ClientContainer())


def test_the_sidecars_own_variables_are_left_to_it(monkeypatch):
    # A trainer's environment may hold the sidecar's settings as well as the client's.
    monkeypatch.setenv("MLFLOW_SIDECAR_CONFIG", "/etc/mlflow-sidecar/config.yaml")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "50052")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGET", "10.0.0.1:50051")
    container = ClientContainer()
    load_env(container)
    assert container.settings().target == "10.0.0.1:50051"
