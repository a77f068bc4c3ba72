"""The sidecar decides once whether MLflow's Databricks request headers apply to it."""

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
from mlflow_sidecar.server.mlflow_gateway.environment import settle_request_header_providers


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
