"""Fixtures shared by every test suite."""

from __future__ import annotations

import logging

import pytest

logging.getLogger("mlflow").setLevel(logging.WARNING)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
