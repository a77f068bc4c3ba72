"""Stock MLflow code through the `sidecar://` plugins, checked against the real server."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import RunningSidecar
from tests.support.processes import MlflowServer


@pytest.fixture()
def sidecar_uri(sidecar: RunningSidecar, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow's fluent API pointed at the session sidecar for one test.

    MLflow's setters also export MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI, which every
    later MLflow client and sidecar config of this process would read: monkeypatch puts
    both variables back as they were, and MLflow's own globals are cleared."""
    uri = f"sidecar://{sidecar.target}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to MLflow's default
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]


@pytest.fixture()
def direct(mlflow_server: MlflowServer) -> MlflowClient:
    """A plain MLflow client of the real server, without the sidecar."""
    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fluent_run_reaches_mlflow_as_an_ordinary_run(
    sidecar_uri: str, direct: MlflowClient, unique: str, tmp_path: Path
) -> None:
    experiment = mlflow.set_experiment(f"plugin-{unique}")
    artifact = tmp_path / "notes.bin"
    artifact.write_bytes(bytes(range(256)) * 1000)
    with mlflow.start_run(run_name="fluent") as run:
        mlflow.log_params({"lr": 0.01, "layers": 3})
        mlflow.set_tag("team", "rl")
        for step in range(500):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"a": 1.0, "b": 2.0}, step=7)
        mlflow.log_metric("later", 3.0, synchronous=False)
        mlflow.log_artifact(str(artifact), artifact_path="docs")
    # The run's end reaches MLflow after its last point; this waits for both.
    mlflow.flush_async_logging()
    assert run.info.artifact_uri == f"{sidecar_uri}/runs/{run.info.run_id}/artifacts"

    seen = direct.get_run(run.info.run_id)
    assert seen.info.experiment_id == experiment.experiment_id
    assert seen.info.status == "FINISHED"
    assert seen.info.run_name == "fluent"
    assert seen.data.params == {"lr": "0.01", "layers": "3"}
    assert seen.data.tags["team"] == "rl"
    history = direct.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(500))
    assert {m.step: m.value for m in history} == {s: 1.0 / (s + 1) for s in range(500)}
    assert seen.data.metrics["b"] == 2.0
    assert [m.value for m in direct.get_metric_history(run.info.run_id, "later")] == [3.0]

    downloaded = Path(
        direct.download_artifacts(run.info.run_id, "docs/notes.bin", str(tmp_path / "direct"))
    )
    assert sha256(downloaded) == sha256(artifact)


def test_reads_through_the_plugin_see_what_the_trainer_wrote(
    sidecar_uri: str, unique: str, tmp_path: Path
) -> None:
    mlflow.set_experiment(f"plugin-read-{unique}")
    client = MlflowClient()
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "top.txt").write_text("top")
    (tmp_path / "dir" / "sub" / "deep.txt").write_text("deep")
    with mlflow.start_run() as run:
        for step in range(50):
            mlflow.log_metric("reward", float(step), step=step)
        # Read right after logging: the run's points are delivered first.
        history = client.get_metric_history(run.info.run_id, "reward")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(50))
        assert client.get_run(run.info.run_id).data.metrics["reward"] == 49.0
        mlflow.log_artifacts(str(tmp_path / "dir"), artifact_path="out")

    listed = client.list_artifacts(run.info.run_id, "out")
    assert [(f.path, f.is_dir) for f in listed] == [("out/sub", True), ("out/top.txt", False)]
    local = Path(client.download_artifacts(run.info.run_id, "out", str(tmp_path / "back")))
    assert (local / "sub" / "deep.txt").read_text() == "deep"
    assert (local / "top.txt").read_text() == "top"


def test_search_runs_with_filter_and_pages(sidecar_uri: str, unique: str) -> None:
    experiment = mlflow.set_experiment(f"plugin-search-{unique}")
    for index in range(5):
        with mlflow.start_run():
            mlflow.log_param("index", index)
            mlflow.set_tag("parity", "even" if index % 2 == 0 else "odd")
    client = MlflowClient()
    even = client.search_runs(
        [experiment.experiment_id], filter_string="tags.parity = 'even'", max_results=2
    )
    assert len(even) == 2 and even.token
    rest = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.parity = 'even'",
        max_results=2,
        page_token=even.token,
    )
    indices = {r.data.params["index"] for r in [*even, *rest]}
    assert indices == {"0", "2", "4"}
    assert len(mlflow.search_runs([experiment.experiment_id])) == 5


def test_experiment_and_run_lifecycle(sidecar_uri: str, direct: MlflowClient, unique: str) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment(f"plugin-life-{unique}", tags={"k": "v"})
    assert client.get_experiment(experiment_id).tags == {"k": "v"}
    assert client.get_experiment_by_name(f"plugin-life-{unique}").experiment_id == experiment_id
    assert client.get_experiment_by_name(f"plugin-missing-{unique}") is None
    run = client.create_run(experiment_id)
    client.delete_run(run.info.run_id)
    assert direct.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    client.restore_run(run.info.run_id)
    assert direct.get_run(run.info.run_id).info.lifecycle_stage == "active"
    client.delete_experiment(experiment_id)
    assert direct.get_experiment(experiment_id).lifecycle_stage == "deleted"
    client.restore_experiment(experiment_id)
    assert direct.get_experiment(experiment_id).lifecycle_stage == "active"
    names = {e.name for e in client.search_experiments(filter_string=f"name LIKE '%{unique}'")}
    assert names == {f"plugin-life-{unique}"}


def test_failures_are_mlflow_exceptions_with_mlflow_codes(sidecar_uri: str, unique: str) -> None:
    client = MlflowClient()
    with pytest.raises(MlflowException) as missing:
        client.get_run("0" * 32)
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    experiment_id = client.create_experiment(f"plugin-err-{unique}")
    with pytest.raises(MlflowException) as exists:
        client.create_experiment(f"plugin-err-{unique}")
    assert exists.value.error_code == "RESOURCE_ALREADY_EXISTS"
    with pytest.raises(MlflowException) as unsupported:
        client.rename_experiment(experiment_id, f"plugin-renamed-{unique}")
    assert unsupported.value.error_code == "NOT_IMPLEMENTED"
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id)
    # A late point of an ended run is refused at once, and the process's stream goes on.
    with pytest.raises(MlflowException) as ended:
        client.log_metric(run.info.run_id, "m", 2.0)
    assert ended.value.error_code == "INVALID_STATE"
    other = client.create_run(experiment_id)
    client.log_metric(other.info.run_id, "m", 3.0)
    assert [m.value for m in client.get_metric_history(other.info.run_id, "m")] == [3.0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [1.0]
    # A key MLflow refuses is refused at once, as by stock MLflow, and costs nothing else.
    with pytest.raises(MlflowException) as bad_key:
        client.log_metric(other.info.run_id, "bad@key", 4.0)
    assert bad_key.value.error_code == "INVALID_PARAMETER_VALUE"
    client.log_metric(other.info.run_id, "m", 5.0)
    client.set_terminated(other.info.run_id)
    assert [m.value for m in client.get_metric_history(other.info.run_id, "m")] == [3.0, 5.0]
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "p", "1")
    with pytest.raises(MlflowException) as changed:
        client.log_param(run.info.run_id, "p", "2")
    # MLflow's codes where its status differs from the sidecar's (FAILED_PRECONDITION).
    assert changed.value.error_code == "INVALID_PARAMETER_VALUE"
    client.delete_run(run.info.run_id)
    with pytest.raises(MlflowException) as deleted_run:
        client.log_param(run.info.run_id, "q", "1")
    assert deleted_run.value.error_code == "INVALID_PARAMETER_VALUE"
    client.delete_experiment(experiment_id)
    with pytest.raises(MlflowException) as deleted_experiment:
        client.create_run(experiment_id)
    assert deleted_experiment.value.error_code == "INVALID_PARAMETER_VALUE"


def test_ending_an_ended_run_again_with_another_time_takes_it_as_in_mlflow(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"plugin-reend-{unique}")).info.run_id
    client.set_terminated(run_id, "FINISHED", end_time=1_700_000_000_000)
    client.set_terminated(run_id, "FINISHED", end_time=1_700_000_500_000)
    assert direct.get_run(run_id).info.end_time == 1_700_000_500_000
    # update_run with the run's own status keeps its end time, as MLflow's does.
    client.update_run(run_id, status="FINISHED")
    seen = direct.get_run(run_id).info
    assert (seen.status, seen.end_time) == ("FINISHED", 1_700_000_500_000)


def test_a_run_ended_by_another_process_costs_the_other_runs_nothing(
    sidecar_uri: str, sidecar: RunningSidecar, direct: MlflowClient, unique: str
) -> None:
    from mlflow_sidecar.client import ClientContainer

    client = MlflowClient()
    experiment_id = client.create_experiment(f"plugin-ended-elsewhere-{unique}")
    ended, going = (client.create_run(experiment_id).info.run_id for _ in range(2))
    client.log_metric(ended, "m", 0.0, step=0)
    mlflow.flush_async_logging()
    elsewhere = ClientContainer()  # another process's client: this one does not know
    elsewhere.config.from_dict({"target": sidecar.target})
    try:
        elsewhere.experiment_tracking().end_run(ended, wait_for_delivery=True)
    finally:
        elsewhere.shutdown_resources()
    for step in range(10):
        client.log_metric(going, "m", float(step), step=step)
    client.log_metric(ended, "m", 1.0, step=1)  # refused by the sidecar, after the fact
    for step in range(10, 20):
        client.log_metric(going, "m", float(step), step=step)
    with pytest.raises(MlflowException) as dropped:
        mlflow.flush_async_logging()  # says what was dropped, once
    assert dropped.value.error_code == "INVALID_STATE"
    assert f"run {ended} were not accepted" in dropped.value.message
    mlflow.flush_async_logging()
    with pytest.raises(MlflowException) as refused:
        client.log_metric(ended, "m", 2.0, step=2)
    assert refused.value.error_code == "INVALID_STATE"
    client.log_metric(going, "m", 20.0, step=20)
    client.set_terminated(going)
    mlflow.flush_async_logging()
    assert sorted(m.step for m in direct.get_metric_history(going, "m")) == list(range(21))
    assert [m.step for m in direct.get_metric_history(ended, "m")] == [0]


class AddOne(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input + 1


def test_log_model_register_and_load_by_alias(
    sidecar_uri: str, direct: MlflowClient, unique: str, tmp_path: Path
) -> None:
    import pandas as pd

    name = f"plugin-model-{unique}"
    mlflow.set_experiment(f"plugin-model-{unique}")
    with mlflow.start_run() as run:
        mlflow.log_metric("score", 0.5)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=AddOne(),
            pip_requirements=["mlflow"],
            registered_model_name=name,
        )
    MlflowClient().set_registered_model_alias(name, "champion", info.registered_model_version)

    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist() == [2, 3]

    # The server holds an ordinary logged model and version, with the same bytes.
    model = direct.get_logged_model(info.model_id)
    assert model.source_run_id == run.info.run_id
    assert [o.model_id for o in direct.get_run(run.info.run_id).outputs.model_outputs] == [
        info.model_id
    ]
    version = direct.get_model_version_by_alias(name, "champion")
    assert version.source == f"models:/{info.model_id}"
    through_server = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location,
            dst_path=str(tmp_path / "direct"),
            tracking_uri=direct.tracking_uri,
        )
    )
    through_sidecar = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{info.model_id}", dst_path=str(tmp_path / "sc")
        )
    )
    direct_files = {
        p.relative_to(through_server).as_posix(): sha256(p)
        for p in through_server.rglob("*")
        if p.is_file()
    }
    sidecar_files = {
        p.relative_to(through_sidecar).as_posix(): sha256(p)
        for p in through_sidecar.rglob("*")
        if p.is_file()
    }
    # MLflow adds this file itself to every models:/ download of a registered model.
    sidecar_files.pop("registered_model_meta", None)
    assert "MLmodel" in direct_files
    assert sidecar_files == direct_files


def test_log_batch_is_checked_whole_before_any_of_it_is_sent(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"plugin-batch-{unique}")).info.run_id
    good = [Metric("good1", 1.0, 5, 0), Metric("good2", 2.0, 5, 0)]
    with pytest.raises(MlflowException) as bad_key:
        client.log_batch(
            run_id,
            metrics=[*good, Metric("bad\nkey", 3.0, 5, 0)],
            params=[Param("p", "1")],
            tags=[RunTag("t", "1")],
        )
    assert bad_key.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as duplicate:
        client.log_batch(run_id, params=[Param("lr", "0.1"), Param("lr", "0.2")])
    assert duplicate.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "Duplicate parameter keys" in duplicate.value.message
    mlflow.flush_async_logging()
    seen = direct.get_run(run_id).data
    assert (seen.params, seen.metrics) == ({}, {})
    assert not {"t", "p"} & set(seen.tags)
    # Values over MLflow's limits are truncated, as MLflow's own stores truncate them.
    client.log_param(run_id, "long", "x" * 7000)
    client.log_batch(run_id, params=[Param("long2", "y" * 7000)], tags=[RunTag("t", "z" * 9000)])
    seen = direct.get_run(run_id).data
    assert (len(seen.params["long"]), len(seen.params["long2"])) == (6000, 6000)
    assert len(seen.tags["t"]) == 8000


def test_a_refused_run_id_leaves_no_trace_for_later_flushes(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment(f"plugin-bad-run-{unique}")
    with pytest.raises(MlflowException):
        client.log_metric("x" * 65, "m", 1.0)
    runs = [client.create_run(experiment_id).info.run_id for _ in range(6)]
    for run_id in runs:
        for step in range(3):
            client.log_metric(run_id, "m", float(step), step=step)
    mlflow.flush_async_logging()  # raised the refused call's error again, and lost track
    assert [len(direct.get_metric_history(r, "m")) for r in runs] == [3] * 6


def test_points_mlflow_refuses_for_good_are_reported_by_the_flush(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"plugin-dead-{unique}")).info.run_id
    direct.delete_run(run_id)  # through MLflow: the sidecar learns of it on delivery
    client.log_metric(run_id, "m", 1.0, step=1)
    client.get_metric_history(run_id, "m")  # a read waits for delivery, reports nothing
    with pytest.raises(MlflowException) as dead:
        mlflow.flush_async_logging()
    assert "1 metric points of run" in dead.value.message
    assert "spool status" in dead.value.message
    mlflow.flush_async_logging()  # reported once


def test_registry_and_run_state_as_mlflow_has_them(sidecar_uri: str, unique: str) -> None:
    client = MlflowClient()
    name = f"plugin-alias-{unique}"
    client.create_registered_model(name)
    client.delete_registered_model_alias(name, "never-set")  # done already, as in MLflow
    with pytest.raises(MlflowException) as missing:
        client.delete_registered_model_alias(f"{name}-missing", "champion")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    for call in (
        lambda: client.get_model_version(name, "abc"),
        lambda: client.delete_model_version(name, "1.5"),
        lambda: client.set_registered_model_alias(name, "champion", "x"),
    ):
        with pytest.raises(MlflowException) as not_a_number:
            call()
        assert not_a_number.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_restarted_trainer_resumes_its_ended_run(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    mlflow.set_experiment(f"plugin-resume-{unique}")
    with pytest.raises(RuntimeError), mlflow.start_run() as run:
        for step in range(3):
            mlflow.log_metric("reward", float(step), step=step)
        raise RuntimeError("preempted")  # MLflow ends the run FAILED on the way out
    run_id = run.info.run_id
    # The sidecar ends the run in MLflow after its spooled points; a read through it waits
    # for that, a read of MLflow's own right away may come first.
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    assert direct.get_run(run_id).info.status == "FAILED"
    with mlflow.start_run(run_id=run_id) as resumed:
        assert resumed.info.status == "RUNNING"
        for step in range(3, 6):
            mlflow.log_metric("reward", float(step), step=step)
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    info = direct.get_run(run_id).info
    assert info.status == "FINISHED"
    history = direct.get_metric_history(run_id, "reward")
    assert sorted(m.step for m in history) == list(range(6))
    client = MlflowClient()
    client.delete_run(run_id)
    with pytest.raises(MlflowException) as deleted:
        client.update_run(run_id, status="RUNNING")
    assert deleted.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_version_from_a_runs_files_names_their_location_as_mlflow_stores_it(
    sidecar_uri: str, direct: MlflowClient, unique: str, tmp_path: Path
) -> None:
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"plugin-source-{unique}")).info.run_id
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (policy / "MLmodel").write_text("flavors: {}\n")  # what register_model looks for
    client.log_artifacts(run_id, str(policy), "mdl")
    name = f"plugin-source-{unique}"
    client.create_registered_model(name)
    by_uri = client.create_model_version(
        name, f"{client.get_run(run_id).info.artifact_uri}/mdl", run_id=run_id
    )
    registered = mlflow.register_model(f"runs:/{run_id}/mdl", name)
    # Without the sidecar MLflow's client stores the run's location, never a sidecar URI.
    location = f"{direct.get_run(run_id).info.artifact_uri}/mdl"
    for version in (by_uri, registered):
        assert direct.get_model_version(name, version.version).source == location
        fetched = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{name}/{version.version}", dst_path=str(tmp_path / version.version)
            )
        )
        assert sha256(fetched / "weights.bin") == sha256(policy / "weights.bin")


def _train_in_a_forked_child(experiment_id: str) -> str:
    client = MlflowClient()  # MLflow hands the child the stores its parent made
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "m", 1.0, step=1)
    client.set_terminated(run_id)  # hands the point to the spool and waits for it
    name = f"fork-{experiment_id}"
    client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    return run_id


def test_a_forked_child_talks_to_the_sidecar_on_its_own_connection(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment(f"plugin-fork-{unique}")
    client.create_registered_model(f"fork-{experiment_id}")
    client.log_metric(client.create_run(experiment_id).info.run_id, "m", 0.0)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        run_ids = pool.map(_train_in_a_forked_child, [experiment_id] * 4)
    for run_id in run_ids:
        assert [m.value for m in direct.get_metric_history(run_id, "m")] == [1.0]
        assert direct.get_run(run_id).info.status == "FINISHED"
    versions = direct.search_model_versions(f"name = 'fork-{experiment_id}'")
    assert sorted(v.run_id for v in versions) == sorted(run_ids)
    client.create_run(experiment_id)  # the parent's connection is still its own


def test_a_model_logged_in_a_run_reads_and_registers_as_mlflow_has_it(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    mlflow.set_experiment(f"plugin-runs-uri-{unique}")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(
            name="policy", python_model=AddOne(), pip_requirements=["mlflow"]
        )
        dataset = mlflow.data.from_numpy(numpy.array([[1.0, 2.0]]), name="ticks")
        mlflow.log_input(dataset, context="training")
    run_id = run.info.run_id
    client = MlflowClient()
    # MLflow lists the logged model's files under the run's path once, as a plain client does.
    listed = [f.path for f in client.list_artifacts(run_id, "policy")]
    assert sorted(listed) == sorted(f.path for f in direct.list_artifacts(run_id, "policy"))
    assert len(listed) == len(set(listed))
    # A read gives what the run used and made, as MLflow has them.
    read = client.get_run(run_id)
    assert [o.model_id for o in read.outputs.model_outputs] == [info.model_id]
    assert [d.dataset.name for d in read.inputs.dataset_inputs] == ["ticks"]
    assert {t.key: t.value for t in read.inputs.dataset_inputs[0].tags}["mlflow.data.context"] == (
        "training"
    )
    # Registered from the run's path: the version names the logged model, as without a sidecar.
    version = mlflow.register_model(f"runs:/{run_id}/policy", f"plugin-runs-uri-{unique}")
    assert direct.get_model_version(version.name, version.version).source == (
        f"models:/{info.model_id}"
    )


def test_a_search_and_a_delete_see_the_points_this_process_logged(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment(f"plugin-fresh-{unique}")
    run_id = client.create_run(experiment_id).info.run_id
    for step in range(20):
        client.log_metric(run_id, "reward", float(step), step=step)
        found = mlflow.search_runs([experiment_id], output_format="list")
        assert found[0].data.metrics["reward"] == float(step)
    for step in range(20, 120):
        client.log_metric(run_id, "reward", float(step), step=step)
    client.delete_run(run_id)
    client.restore_run(run_id)
    assert len(direct.get_metric_history(run_id, "reward")) == 120


def test_creating_an_experiment_under_a_deleted_ones_name_fails_as_in_mlflow(
    sidecar_uri: str, direct: MlflowClient, unique: str
) -> None:
    client = MlflowClient()
    for name, mlflow_client in ((f"gone-{unique}", client), (f"gone-direct-{unique}", direct)):
        mlflow_client.delete_experiment(mlflow_client.create_experiment(name))
        with pytest.raises(MlflowException) as again:
            mlflow_client.create_experiment(name)
        assert again.value.error_code == "RESOURCE_ALREADY_EXISTS"
