"""A bare str where the typed clients take a sequence of strings (ids, aliases, order_by)
is refused with TypeError naming the argument, before anything is sent: a str is a
Sequence[str] of its characters, so `search_runs("26")` searched experiments 2 and 6."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from mlflow_sidecar.client.grpc_logged_models import GrpcLoggedModels
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking

Call = Callable[[Any, Any, Any, Path], object]

CALLS: dict[str, tuple[str, Call]] = {
    "search_runs": ("experiment_ids", lambda t, r, m, d: t.search_runs("26")),
    "search_runs order_by": (
        "order_by",
        lambda t, r, m, d: t.search_runs(["2"], order_by="start_time"),
    ),
    "search_experiments": ("order_by", lambda t, r, m, d: t.search_experiments(order_by="name")),
    "search_registered_models": (
        "order_by",
        lambda t, r, m, d: r.search_registered_models(order_by="name"),
    ),
    "search_model_versions": (
        "order_by",
        lambda t, r, m, d: r.search_model_versions(order_by="version_number"),
    ),
    "watch": ("aliases", lambda t, r, m, d: r.watch("model", "champion")),
    "upload_model": ("aliases", lambda t, r, m, d: r.upload_model("m", d, aliases="champion")),
    "logged models search": ("experiment_ids", lambda t, r, m, d: m.search("26")),
    "log_inputs": ("model_ids", lambda t, r, m, d: m.log_inputs("run", model_ids="m-1")),
}


@pytest.mark.parametrize("case", sorted(CALLS))
def test_a_bare_str_for_a_list_of_strings_is_refused(case: str, tmp_path: Path) -> None:
    argument, call = CALLS[case]
    (tmp_path / "model.bin").write_bytes(b"weights")
    tracking_stub, registry_stub = mock.Mock(), mock.Mock()
    tracking = GrpcExperimentTracking(tracking_stub)
    registry = GrpcModelRegistry(registry_stub)
    logged_models = GrpcLoggedModels(tracking_stub)
    with pytest.raises(TypeError) as err:
        call(tracking, registry, logged_models, tmp_path)
    assert str(err.value).startswith(f"{argument} must be a sequence of str")
    assert tracking_stub.mock_calls == [] and registry_stub.mock_calls == []
