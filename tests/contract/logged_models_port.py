"""The contract of `LoggedModelsPort`: one suite for every implementation.

`LoggedModelsPortContract` holds the tests; a suite subclasses it as `Test...` and provides
the `models` fixture (the logged models) and the `port` fixture (the `MlflowPort` of the
same MLflow, for the experiments and runs the models belong to). The unit suite runs it
against `FakeMlflow().logged_models`, the integration suite against `LoggedModelGateway`
on the embedded store and on a real `mlflow server`.

Implementations may share state between tests: every test makes its own experiments.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.mlflow_gateway.port import LoggedModelsPort
from tests.contract.mlflow_port import MISSING_RUN, every_page, new_experiment, new_run, unique

MISSING_MODEL = f"m-{'f' * 32}"


def new_logged_model(
    models: LoggedModelsPort, experiment_id: str, name: str = "", **tags: str
) -> LoggedModel:
    return models.create(
        experiment_id, name=name, model_type="", source_run_id="", params={}, tags=tags
    )


class LoggedModelsPortContract:
    """What every LoggedModelsPort does. Subclasses provide `models` and `port`."""

    def test_a_logged_model_is_created_pending_and_read_back(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        run_id = new_run(port, experiment_id).run_id
        created = models.create(
            experiment_id,
            name="policy",
            model_type="agent",
            source_run_id=run_id,
            params={"lr": "0.01"},
            tags={"team": "rl"},
        )
        assert created.model_id
        assert (created.experiment_id, created.name, created.model_type) == (
            experiment_id,
            "policy",
            "agent",
        )
        assert (created.source_run_id, created.status) == (run_id, LoggedModelStatus.PENDING)
        assert (dict(created.params), dict(created.tags)) == ({"lr": "0.01"}, {"team": "rl"})
        assert created.artifact_location
        assert 0 < created.creation_time_ms <= created.last_updated_time_ms
        assert models.get(created.model_id) == created
        assert models.artifact_location(created.model_id) == created.artifact_location

    def test_a_logged_model_without_a_name_gets_one(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        first = new_logged_model(models, experiment_id)
        second = new_logged_model(models, experiment_id)
        assert first.name and second.name
        assert first.model_id != second.model_id
        assert (first.model_type, first.source_run_id) == ("", "")

    def test_bad_names_and_missing_experiments_create_nothing(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        for name in ("a/b", "v1.2", "x:y"):
            with pytest.raises(InvalidArgumentError):
                new_logged_model(models, experiment_id, name)
        with pytest.raises(NotFoundError) as err:
            new_logged_model(models, "987654321")
        assert err.value.reason == ErrorReason.EXPERIMENT_NOT_FOUND
        deleted = new_experiment(port)
        port.delete_experiment(deleted)
        with pytest.raises(FailedPreconditionError) as inactive:
            new_logged_model(models, deleted)
        assert inactive.value.reason == ErrorReason.EXPERIMENT_NOT_ACTIVE
        found = models.search(
            [experiment_id], filter_string="", order_by=[], page_size=10, page_token=""
        )
        assert found.items == ()

    def test_a_logged_model_is_finalized(self, models: LoggedModelsPort, port: MlflowPort) -> None:
        experiment_id = new_experiment(port)
        ready = new_logged_model(models, experiment_id)
        finalized = models.finalize(ready.model_id, LoggedModelStatus.READY)
        assert finalized.status is LoggedModelStatus.READY
        assert finalized.last_updated_time_ms >= ready.last_updated_time_ms
        assert models.get(ready.model_id).status is LoggedModelStatus.READY
        failed = new_logged_model(models, experiment_id)
        models.finalize(failed.model_id, LoggedModelStatus.FAILED)
        assert models.get(failed.model_id).status is LoggedModelStatus.FAILED

    def test_logged_models_are_searched_by_name_page_by_page(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        other_experiment = new_experiment(port)
        names = [f"net-{i}" for i in range(5)]
        for name in reversed(names):
            new_logged_model(models, experiment_id, name)
        new_logged_model(models, other_experiment, "net-0")

        exact = models.search(
            [experiment_id],
            filter_string="name = 'net-3'",
            order_by=[],
            page_size=10,
            page_token="",
        )
        assert [m.name for m in exact.items] == ["net-3"]
        assert exact.next_page_token == ""
        pages = every_page(
            lambda **kw: models.search([experiment_id], **kw),
            2,
            filter_string="name LIKE 'net-%'",
            order_by=[("name", True)],
        )
        assert [[m.name for m in p] for p in pages] == [names[:2], names[2:4], names[4:]]
        backwards = every_page(
            lambda **kw: models.search([experiment_id], **kw),
            3,
            filter_string="",
            order_by=[("name", False)],
        )
        assert [m.name for p in backwards for m in p] == names[::-1]
        both = models.search(
            [experiment_id, other_experiment],
            filter_string="name = 'net-0'",
            order_by=[],
            page_size=10,
            page_token="",
        )
        assert sorted(m.experiment_id for m in both.items) == sorted(
            [experiment_id, other_experiment]
        )

    def test_the_newest_logged_models_come_first(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        created = [new_logged_model(models, experiment_id, f"m{i}") for i in range(3)]
        found = models.search(
            [experiment_id], filter_string="", order_by=[], page_size=10, page_token=""
        )
        expected = sorted(created, key=lambda m: (-m.creation_time_ms, m.model_id))
        assert [m.model_id for m in found.items] == [m.model_id for m in expected]

    def test_logged_models_are_searched_by_tags_and_params(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        tagged = models.create(
            experiment_id,
            name="a",
            model_type="",
            source_run_id="",
            params={"lr": "0.1"},
            tags={"stage": "train"},
        )
        new_logged_model(models, experiment_id, "b", stage="eval")
        for filter_string in ("tags.stage = 'train'", "params.lr = '0.1'"):
            found = models.search(
                [experiment_id],
                filter_string=filter_string,
                order_by=[],
                page_size=10,
                page_token="",
            )
            assert [m.model_id for m in found.items] == [tagged.model_id]

    def test_bad_searches_are_invalid_arguments(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        with pytest.raises(InvalidArgumentError) as err:
            models.search(
                [experiment_id], filter_string="", order_by=[], page_size=10, page_token="nope"
            )
        assert (err.value.field, err.value.reason) == ("page_token", "INVALID_PAGE_TOKEN")
        with pytest.raises(InvalidArgumentError) as err:
            models.search(
                [experiment_id],
                filter_string="",
                order_by=[("no_such_column", True)],
                page_size=10,
                page_token="",
            )
        assert err.value.field == "order_by[0].field_name"

    def test_tags_are_set_overwritten_and_deleted(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        model_id = new_logged_model(models, new_experiment(port), stage="train").model_id
        models.set_tags(model_id, {"stage": "eval", "owner": "rl"})
        assert dict(models.get(model_id).tags) == {"stage": "eval", "owner": "rl"}
        models.delete_tag(model_id, "stage")
        assert dict(models.get(model_id).tags) == {"owner": "rl"}
        with pytest.raises(NotFoundError) as err:
            models.delete_tag(model_id, "stage")
        assert err.value.reason == ErrorReason.TAG_NOT_FOUND
        assert dict(models.get(model_id).tags) == {"owner": "rl"}

    def test_missing_logged_models_are_not_found(
        self, models: LoggedModelsPort, tmp_path: Path
    ) -> None:
        local = tmp_path / "f.txt"
        local.write_bytes(b"x")
        (tmp_path / "dst").mkdir()
        for call in (
            lambda: models.get(MISSING_MODEL),
            lambda: models.finalize(MISSING_MODEL, LoggedModelStatus.READY),
            lambda: models.set_tags(MISSING_MODEL, {"k": "v"}),
            lambda: models.delete_tag(MISSING_MODEL, "k"),
            lambda: models.artifact_location(MISSING_MODEL),
            lambda: models.log_artifact(MISSING_MODEL, local, ""),
            lambda: models.list_artifacts(MISSING_MODEL, ""),
            lambda: models.download_artifact(MISSING_MODEL, "f.txt", tmp_path / "dst"),
        ):
            with pytest.raises(NotFoundError) as err:
                call()
            assert err.value.reason == ErrorReason.LOGGED_MODEL_NOT_FOUND

    def test_outputs_and_inputs_are_logged_to_existing_runs(
        self, models: LoggedModelsPort, port: MlflowPort
    ) -> None:
        experiment_id = new_experiment(port)
        run_id = new_run(port, experiment_id).run_id
        model_id = new_logged_model(models, experiment_id).model_id
        dataset = DatasetUse(
            name="episodes",
            digest=unique("d"),
            source_type="local",
            source='{"uri": "/data/episodes"}',
            tags={"mlflow.data.context": "training"},
        )
        models.log_outputs(run_id, [(model_id, 3)])
        models.log_outputs(run_id, [(model_id, 3)])  # a repeat: recorded once, no error
        with pytest.raises(AlreadyExistsError) as clash:
            models.log_outputs(run_id, [(model_id, 4)])
        assert clash.value.metadata == {"model_id": model_id, "step": "3"}
        models.log_inputs(run_id, [dataset], [model_id])
        models.log_inputs(run_id, [], [model_id])
        for call in (
            lambda: models.log_outputs(MISSING_RUN, [(model_id, 0)]),
            lambda: models.log_inputs(MISSING_RUN, [dataset], []),
            lambda: models.log_inputs(MISSING_RUN, [], [model_id]),
        ):
            with pytest.raises(NotFoundError) as err:
                call()
            assert err.value.reason == ErrorReason.RUN_NOT_FOUND
        port.delete_run(run_id)
        for call in (
            lambda: models.log_outputs(run_id, [(model_id, 4)]),
            lambda: models.log_inputs(run_id, [], [model_id]),
        ):
            with pytest.raises(FailedPreconditionError) as failed:
                call()
            assert failed.value.reason == ErrorReason.RUN_NOT_ACTIVE

    def test_files_are_stored_listed_and_downloaded_byte_for_byte(
        self, models: LoggedModelsPort, port: MlflowPort, tmp_path: Path
    ) -> None:
        model_id = new_logged_model(models, new_experiment(port)).model_id
        assert models.list_artifacts(model_id, "") == []
        weights = os.urandom(4096) + b"\x00\r\n\xff"
        local = tmp_path / unique("files")
        (local / "data").mkdir(parents=True)
        (local / "MLmodel").write_bytes(b"flavors: {}\n")
        (local / "data" / "weights.bin").write_bytes(weights)
        models.log_artifact(model_id, local / "MLmodel", "")
        models.log_artifact(model_id, local / "data" / "weights.bin", "data")

        root = models.list_artifacts(model_id, "")
        assert [(e.path, e.is_dir) for e in root] == [("MLmodel", False), ("data", True)]
        assert root[0].size_bytes == len(b"flavors: {}\n")
        data = models.list_artifacts(model_id, "data")
        assert [(e.path, e.is_dir, e.size_bytes) for e in data] == [
            ("data/weights.bin", False, len(weights))
        ]
        assert models.list_artifacts(model_id, "nothing/here") == []

        (tmp_path / "dst").mkdir()
        got = models.download_artifact(model_id, "data/weights.bin", tmp_path / "dst")
        assert got == tmp_path / "dst" / "data" / "weights.bin"
        assert got.read_bytes() == weights
        mlmodel = models.download_artifact(model_id, "MLmodel", tmp_path / "dst")
        assert mlmodel.read_bytes() == b"flavors: {}\n"
