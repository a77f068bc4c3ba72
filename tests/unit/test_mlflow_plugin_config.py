"""The `sidecar://` plugins' URI, settings, registration and error translation."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from mlflow.exceptions import MlflowException

from mlflow_sidecar.core.errors import (
    MLFLOW_ERROR_CODE_KEY,
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.mlflow_plugin.connection import SidecarUri, settings_for
from mlflow_sidecar.mlflow_plugin.errors import to_mlflow, translated
from tests.support.certs import make_pki


def test_uri_names_target_tls_and_path():
    plain = SidecarUri.parse("sidecar://127.0.0.1:50051")
    assert (plain.target, plain.tls, plain.path, plain.root) == (
        "127.0.0.1:50051",
        False,
        "",
        "sidecar://127.0.0.1:50051",
    )
    secure = SidecarUri.parse("sidecar+tls://sidecar.local:443/runs/abc/artifacts/x")
    assert (secure.target, secure.tls, secure.path) == (
        "sidecar.local:443",
        True,
        "runs/abc/artifacts/x",
    )


def test_tls_files_from_env_go_with_a_tls_uri(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_ROOT_CERTIFICATES_FILE", str(pki.ca_cert))
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_CLIENT_CERT_FILE", str(pki.client_cert))
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_CLIENT_KEY_FILE", str(pki.client_key))
    settings = settings_for(SidecarUri.parse("sidecar+tls://localhost:50051"))
    assert settings.tls and settings.root_certificates_file == str(pki.ca_cert)
    assert settings.client_cert_file == str(pki.client_cert)
    with pytest.raises(ValueError, match="root_certificates_file is set but tls is not"):
        settings_for(SidecarUri.parse("sidecar://localhost:50051"))


def test_tls_asked_for_by_env_is_not_dropped_for_a_plaintext_uri(monkeypatch):
    # The URI's plaintext won without a word: every call, and the token, in the clear.
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TLS", "true")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TOKEN", "s3cret")
    with pytest.raises(ValueError, match=r"MLFLOW_SIDECAR_CLIENT_TLS=true.*sidecar\+tls://h:1"):
        settings_for(SidecarUri.parse("sidecar://h:1"))
    assert settings_for(SidecarUri.parse("sidecar+tls://h:1")).tls
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TLS", "false")
    assert not settings_for(SidecarUri.parse("sidecar://h:1")).tls


@pytest.mark.parametrize(
    "uri", ["http://127.0.0.1:5000", "sidecar://", "sidecar:///path", "sidecar://h:1?x=1"]
)
def test_bad_uris_are_refused_with_the_reason(uri):
    with pytest.raises(ValueError, match="sidecar"):
        SidecarUri.parse(uri)


def test_settings_take_token_and_deadline_from_env_and_target_from_the_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TOKEN", "s3cret")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TIMEOUT_S", "7")
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGET", "10.0.0.1:1")
    settings = settings_for(SidecarUri.parse("sidecar+tls://127.0.0.1:50051"))
    assert settings.token == "s3cret"
    assert settings.timeout_s == 7
    assert settings.target == "127.0.0.1:50051"
    assert settings.tls is True


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFoundError("x"), "RESOURCE_DOES_NOT_EXIST"),
        (AlreadyExistsError("x"), "RESOURCE_ALREADY_EXISTS"),
        (FailedPreconditionError("x"), "INVALID_STATE"),
        # MLflow's codes for what it refuses as a bad parameter.
        (FailedPreconditionError("x", reason="PARAM_VALUE_CHANGED"), "INVALID_PARAMETER_VALUE"),
        (FailedPreconditionError("x", reason="RUN_NOT_ACTIVE"), "INVALID_PARAMETER_VALUE"),
        (FailedPreconditionError("x", reason="EXPERIMENT_NOT_ACTIVE"), "INVALID_PARAMETER_VALUE"),
        (FailedPreconditionError("x", reason="RUN_ENDED"), "INVALID_STATE"),
        (UnavailableError("x"), "TEMPORARILY_UNAVAILABLE"),
        (SidecarError("x"), "INTERNAL_ERROR"),
        # MLflow's own code, passed on by the sidecar, wins over the status code's.
        (
            FailedPreconditionError(
                "x", metadata={MLFLOW_ERROR_CODE_KEY: "INVALID_PARAMETER_VALUE"}
            ),
            "INVALID_PARAMETER_VALUE",
        ),
    ],
)
def test_sidecar_errors_become_mlflow_exceptions_with_mlflow_codes(error, code):
    translated_error = to_mlflow(error)
    assert isinstance(translated_error, MlflowException)
    assert translated_error.error_code == code
    assert error.reason in translated_error.message


def test_translated_methods_raise_mlflow_exceptions_only():
    @translated
    def fails() -> None:
        raise NotFoundError("no run", reason="RUN_NOT_FOUND")

    with pytest.raises(MlflowException) as caught:
        fails()
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert isinstance(caught.value.__cause__, SidecarError)
    assert grpc.StatusCode.NOT_FOUND.name in caught.value.message


_PROBE = """
import mlflow
from mlflow.tracking._tracking_service.utils import _get_store
store = _get_store()
print(type(store).__name__, mlflow.get_registry_uri())
"""


def _probe(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="sidecar://127.0.0.1:1", **extra_env)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def test_mlflow_finds_the_plugin_and_the_registry_defaults_to_the_sidecar():
    # No network: the store's channel connects only when a call is made.
    assert _probe({}) == "SidecarTrackingStore sidecar://127.0.0.1:1"


def test_a_chosen_registry_is_left_alone():
    assert _probe({"MLFLOW_REGISTRY_URI": "http://registry:5000"}) == (
        "SidecarTrackingStore http://registry:5000"
    )


_OTHER_SERVER_PROBE = """
import mlflow
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _get_store
_get_store()
other = "http://elsewhere:5000"
print(MlflowClient(tracking_uri=other)._registry_uri)
mlflow.set_tracking_uri(other)
print(mlflow.get_registry_uri())
"""


def test_a_client_of_another_tracking_server_keeps_its_own_registry():
    # What MLflow resolves without the plugin: another server's registry is that server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="sidecar://127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_SERVER_PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-2:] == ["http://elsewhere:5000"] * 2


_SPARK_PROBE = """
import sys, types
from mlflow.tracking._model_registry import utils
looked = []
utils._get_registry_uri_from_spark_session = lambda: looked.append(1)
from mlflow.tracking._tracking_service.utils import _get_store
_get_store()
for _ in range(3):
    utils.get_registry_uri()
print(len(looked), utils.get_registry_uri())
sys.modules["pyspark"] = types.ModuleType("pyspark")
utils.get_registry_uri()
print(len(looked), utils.get_registry_uri())
"""


def test_the_spark_lookup_is_spared_until_pyspark_is_imported():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI="sidecar://127.0.0.1:1")
    done = subprocess.run(
        [sys.executable, "-c", _SPARK_PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-2:] == [
        "0 sidecar://127.0.0.1:1",
        "1 sidecar://127.0.0.1:1",
    ]


def test_the_mlflow_extra_pulls_mlflows_client_only():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())[
        "project"
    ]
    # mlflow-skinny is the client that the full `mlflow` package itself depends on: no
    # server, database or UI dependencies come with the plugin.
    extra = project["optional-dependencies"]["mlflow"]
    assert [r.split(">")[0].split("=")[0].strip() for r in extra] == ["mlflow-skinny"]
    for group in ("mlflow.tracking_store", "mlflow.model_registry_store"):
        assert set(project["entry-points"][group]) == {"sidecar", "sidecar+tls"}
    assert set(project["entry-points"]["mlflow.artifact_repository"]) == {"sidecar", "sidecar+tls"}


def test_a_dropped_model_link_is_warned_about_once(monkeypatch, caplog):
    from mlflow.entities import Metric

    from mlflow_sidecar.mlflow_plugin import tracking_store

    monkeypatch.setattr(tracking_store, "_LINK_WARNED", False)
    plain = [Metric("loss", 1.0, 0, 0)]
    linked = [Metric("loss", 1.0, 0, 0, model_id="m-1")]
    with caplog.at_level("WARNING", logger=tracking_store.__name__):
        tracking_store.SidecarTrackingStore._warn_of_dropped_links(plain)
        assert not caplog.records
        tracking_store.SidecarTrackingStore._warn_of_dropped_links(linked)
        tracking_store.SidecarTrackingStore._warn_of_dropped_links(linked)
    assert len(caplog.records) == 1
    assert "without that link" in caplog.records[0].getMessage()
