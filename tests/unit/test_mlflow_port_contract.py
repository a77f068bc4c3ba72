"""The MlflowPort contract, held against the in-memory fake the unit tests use.

The same tests run against MLflow itself in tests/integration/test_mlflow_port_contract.py."""

from __future__ import annotations

import pytest

from tests.contract.mlflow_port import MlflowPortContract
from tests.fakes.mlflow_port import FakeMlflow


class TestFakeMlflow(MlflowPortContract):
    @pytest.fixture()
    def port(self) -> FakeMlflow:
        return FakeMlflow()
