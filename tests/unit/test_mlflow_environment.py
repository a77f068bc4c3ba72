"""The sidecar decides once whether MLflow's Databricks request headers apply to it, and
refuses MLflow variables whose values MLflow cannot read."""

from __future__ import annotations

import sys

import pytest
from mlflow.tracking.request_header import registry as request_headers
from mlflow.tracking.request_header.databricks_request_header_provider import (
    DatabricksRequestHeaderProvider,
)
from mlflow.tracking.request_header.default_request_header_provider import (
    DefaultRequestHeaderProvider,
)

from mlflow_sidecar.server.mlflow_gateway import mlflow_internals
from mlflow_sidecar.server.mlflow_gateway.environment import (
    MlflowSettingError,
    check_mlflow_settings,
    settle_request_header_providers,
)


@pytest.fixture()
def providers():
    registry = mlflow_internals.request_header_providers()
    assert registry is not None
    saved = list(registry)
    # As MLflow registers them at import, whatever an earlier test's gateway settled.
    if not any(isinstance(p, DatabricksRequestHeaderProvider) for p in registry):
        registry.insert(0, DatabricksRequestHeaderProvider())
    yield registry
    registry[:] = saved


class _Imports:
    """Records the modules Python looks for."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.names.append(name)
        return None


def _looked_up_while_resolving_headers() -> list[str]:
    finder = _Imports()
    sys.meta_path.insert(0, finder)
    try:
        request_headers.resolve_request_headers()
    finally:
        sys.meta_path.remove(finder)
    return finder.names


def test_off_databricks_no_rest_call_looks_for_databricks_modules_again(providers):
    assert any(isinstance(p, DatabricksRequestHeaderProvider) for p in providers)
    assert "dbruntime" in _looked_up_while_resolving_headers()
    settle_request_header_providers()
    assert not any(isinstance(p, DatabricksRequestHeaderProvider) for p in providers)
    assert any(isinstance(p, DefaultRequestHeaderProvider) for p in providers)
    assert _looked_up_while_resolving_headers() == []
    assert "User-Agent" in request_headers.resolve_request_headers()


def test_on_databricks_the_provider_stays(providers, monkeypatch):
    monkeypatch.setattr(DatabricksRequestHeaderProvider, "in_context", lambda self: True)
    settle_request_header_providers()
    assert any(isinstance(p, DatabricksRequestHeaderProvider) for p in providers)


def test_mlflow_variables_of_the_wrong_type_are_named_together(monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_IGNORE_TLS", "sometimes")
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "500MiB")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "true")
    with pytest.raises(MlflowSettingError) as err:
        check_mlflow_settings()
    message = str(err.value)
    assert message.startswith("MLflow cannot read 2 of its variables: ")
    assert "'500MiB' for MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE" in message
    assert "MLFLOW_S3_IGNORE_TLS value must be one of" in message and "got sometimes" in message
    assert "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" not in message
    assert "\n" not in message


def test_mlflow_variables_mlflow_can_read_pass(monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_IGNORE_TLS", "TRUE")
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "1048576")
    check_mlflow_settings()


def test_every_typed_mlflow_variable_is_checked():
    settings = {setting.name: setting for setting in mlflow_internals.mlflow_settings()}
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" in settings, "MLflow moved its environment variables"
    assert settings["MLFLOW_S3_IGNORE_TLS"].type is bool
    assert all(callable(s.get) and callable(s.is_set) for s in settings.values())
