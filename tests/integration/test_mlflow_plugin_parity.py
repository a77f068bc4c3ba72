"""Calls that stock MLflow answers one way against its server: through `sidecar://` they
answer the same way, and leave in MLflow what they leave there without the sidecar."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tests.integration import test_mlflow_plugin

# The plugin tests' fixtures: MLflow pointed at the session sidecar, and at MLflow directly.
sidecar_uri = test_mlflow_plugin.sidecar_uri
direct = test_mlflow_plugin.direct


@pytest.fixture()
def plugin(sidecar_uri: str) -> MlflowClient:
    """An MLflow client of the session sidecar (`sidecar://`), with MLflow's fluent API
    pointed at it (`sidecar_uri` puts MLflow's globals and variables back afterwards)."""
    return MlflowClient(tracking_uri=sidecar_uri, registry_uri=sidecar_uri)


def _run(client: MlflowClient, unique: str) -> str:
    experiment_id = client.create_experiment(f"parity-{unique}-{time.time_ns()}")
    return client.create_run(experiment_id).info.run_id


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (Metric("bad", 1.0, 5, 2**63), MlflowException),
        (Metric("bad", 1.0, 5, -(2**63) - 1), MlflowException),
        (Metric("bad", 1.0, 2**63, 0), MlflowException),
        (Metric("bad", 1.0, 5, float("nan")), TypeError),  # type: ignore[arg-type]
        (Metric("bad", 1.0, 5, 1.5), TypeError),  # type: ignore[arg-type]
        (Metric("bad", 1.0, 5, True), TypeError),
    ],
    ids=[
        "step-over-int64",
        "step-under-int64",
        "timestamp-over-int64",
        "nan-step",
        "1.5-step",
        "bool-step",
    ],
)
def test_a_batch_with_a_point_out_of_range_leaves_nothing_behind(
    plugin: MlflowClient, direct: MlflowClient, unique: str, bad: Metric, error: type
) -> None:
    run_id = _run(plugin, unique)
    with pytest.raises(error) as refused:
        plugin.log_batch(
            run_id,
            metrics=[Metric("good", 1.0, 5, 0), bad],
            params=[Param("p", "1")],
            tags=[RunTag("t", "1")],
        )
    if error is MlflowException:
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # type: ignore[attr-defined]
        assert "metrics[1]" in str(refused.value)
    mlflow.flush_async_logging()
    seen = direct.get_run(run_id).data
    assert (seen.params, seen.metrics) == ({}, {})
    assert "t" not in seen.tags
    assert direct.get_metric_history(run_id, "good") == []


def test_a_point_refused_for_its_numbers_is_refused_as_mlflow_refuses_it(
    plugin: MlflowClient, direct: MlflowClient, unique: str
) -> None:
    for client in (direct, plugin):
        run_id = _run(client, unique)
        with pytest.raises(MlflowException) as negative:
            client.log_metric(run_id, "m", 1.0, timestamp=-5)
        assert negative.value.error_code == "INVALID_PARAMETER_VALUE"
        # MLflow's client fails to build its request (a ValueError); the plugin says so
        # as every other failure, an MlflowException.
        with pytest.raises(ValueError if client is direct else MlflowException) as too_far:
            client.log_metric(run_id, "m", 1.0, step=2**63)
        if client is plugin:
            assert too_far.value.error_code == "INVALID_PARAMETER_VALUE"  # type: ignore[attr-defined]
        # A step that is not an integer is not rounded: MLflow's client raises TypeError.
        with pytest.raises(TypeError):
            client.log_metric(run_id, "m", 1.0, step=1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.log_metric(run_id, "m", 1.0, step=float("nan"))  # type: ignore[arg-type]
        # Nor is a bool taken for 1 (or 0): protobuf refuses it in MLflow's client.
        with pytest.raises(TypeError):
            client.log_metric(run_id, "m", 1.0, step=True)
        with pytest.raises(TypeError):
            client.log_metric(run_id, "m", 1.0, timestamp=True)
        client.log_metric(run_id, "m", 2.0, step=3)
        mlflow.flush_async_logging()
        assert [(m.step, m.value) for m in direct.get_metric_history(run_id, "m")] == [(3, 2.0)]


def test_a_file_logged_to_an_absolute_path_is_refused_as_mlflow_refuses_it(
    plugin: MlflowClient, direct: MlflowClient, unique: str
) -> None:
    for client in (direct, plugin):
        run_id = _run(client, unique)
        with pytest.raises(MlflowException) as refused:
            client.log_text(run_id, "x", "/abs.txt")
        assert "Invalid artifact path: '/'" in refused.value.message
        assert direct.list_artifacts(run_id) == []
        client.log_text(run_id, "x", "dir/rel.txt")
        assert [f.path for f in direct.list_artifacts(run_id, "dir")] == ["dir/rel.txt"]


def test_a_run_link_is_refused_not_dropped(plugin: MlflowClient, unique: str) -> None:
    name = f"parity-link-{unique}"
    plugin.create_registered_model(name)
    run_id = _run(plugin, unique)
    with pytest.raises(MlflowException) as refused:
        plugin.create_model_version(
            name, f"runs:/{run_id}/model", run_id=run_id, run_link="http://ci/job/7"
        )
    assert refused.value.error_code == "NOT_IMPLEMENTED"
    assert "run_link" in refused.value.message
    assert plugin.search_model_versions(f"name = '{name}'") == []


def test_no_experiments_and_a_missing_run_read_as_nothing_as_in_mlflow(
    plugin: MlflowClient, direct: MlflowClient
) -> None:
    for client in (direct, plugin):
        assert list(client.search_runs([])) == []
        assert client.get_metric_history("0" * 32, "m") == []


def test_a_run_made_through_the_plugin_is_stored_as_mlflow_stores_it(
    plugin: MlflowClient, direct: MlflowClient, unique: str
) -> None:
    stored = {}
    for client in (direct, plugin):
        experiment_id = client.create_experiment(f"parity-user-{unique}-{id(client)}")
        run_id = client.create_run(experiment_id, run_name="u").info.run_id
        run = direct.get_run(run_id)
        tags = sorted(k for k in run.data.tags if not k.startswith("mlflow_sidecar."))
        stored[client is plugin] = (run.info.user_id, tags)
    assert stored[True] == stored[False]
    assert "mlflow.user" not in stored[True][1]
    # A user given as MLflow's client takes it (the tag) is the run's user both ways.
    for client in (direct, plugin):
        experiment_id = client.create_experiment(f"parity-user2-{unique}-{id(client)}")
        run_id = client.create_run(experiment_id, tags={"mlflow.user": "ana"}).info.run_id
        run = direct.get_run(run_id)
        assert (run.info.user_id, run.data.tags["mlflow.user"]) == ("ana", "ana")


def test_a_logged_model_read_has_a_list_of_metrics_as_in_mlflow(
    plugin: MlflowClient, direct: MlflowClient, unique: str
) -> None:
    for client in (direct, plugin):
        experiment_id = client.create_experiment(f"parity-model-{unique}-{id(client)}")
        created = client.create_logged_model(experiment_id, name="m")
        # Code iterates a model's metrics (MLflow's pandas search output does): a list,
        # empty when the model has none.
        assert client.get_logged_model(created.model_id).metrics == []
        found = client.search_logged_models([experiment_id])
        assert [m.metrics for m in found] == [[]]


def test_a_missing_local_file_is_file_not_found_as_in_mlflow(
    plugin: MlflowClient, direct: MlflowClient, unique: str, tmp_path: Path
) -> None:
    for client in (direct, plugin):
        run_id = _run(client, unique)
        with pytest.raises(FileNotFoundError):
            client.log_artifact(run_id, str(tmp_path / "missing.txt"))
        assert direct.list_artifacts(run_id) == []


@pytest.mark.parametrize(
    "tag",
    [RunTag("mlflow_sidecar.request_id", "x"), RunTag("mlflow.runName", "n" * 251)],
    ids=["sidecar-tag", "long-run-name"],
)
def test_a_batch_with_a_tag_the_sidecar_refuses_leaves_nothing_behind(
    plugin: MlflowClient, direct: MlflowClient, unique: str, tag: RunTag
) -> None:
    run_id = _run(plugin, unique)
    with pytest.raises(MlflowException) as refused:
        plugin.log_batch(
            run_id, metrics=[Metric("m", 1.0, 5, 0)], params=[Param("p", "1")], tags=[tag]
        )
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "tags[" in refused.value.message
    mlflow.flush_async_logging()
    seen = direct.get_run(run_id).data
    assert (seen.params, seen.metrics) == ({}, {})
