"""The contract of `MlflowPort`: one suite for every implementation.

`MlflowPortContract` holds the tests; a suite subclasses it as `Test...` and provides the
`port` fixture. The unit suite runs it against `FakeMlflow`, the integration suite against
`MlflowGateway` on the embedded store and on a real `mlflow server`, so that the fake the
service tests rely on behaves as MLflow behind the gateway does.

Implementations may share state between tests (a session's MLflow server): every test
makes its own uniquely named experiments, runs and models.
"""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from mlflow_sidecar.server.idempotency import REQUEST_ID_TAG
from mlflow_sidecar.server.mlflow_gateway import MlflowPort

ACTIVE = domain.LifecycleStage.ACTIVE
DELETED = domain.LifecycleStage.DELETED
MISSING_RUN = "f" * 32


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def request() -> str:
    return uuid.uuid4().hex


def new_experiment(port: MlflowPort, name: str = "", **tags: str) -> str:
    return port.create_experiment(
        name or unique("exp"), artifact_location="", tags=tags, request_id=request()
    )


def new_run(port: MlflowPort, experiment_id: str = "", **tags: str) -> domain.Run:
    return port.find_or_create_run(
        experiment_id or new_experiment(port),
        run_name="",
        tags={**tags, REQUEST_ID_TAG: request()},
        start_time_ms=0,
        key_tag=REQUEST_ID_TAG,
    )


def new_model(port: MlflowPort, name: str = "", **tags: str) -> str:
    name = name or unique("model")
    port.create_registered_model(name, description="", tags=tags, request_id=request())
    return name


def new_version(
    port: MlflowPort, name: str, run_id: str, path: str = "model", request_id: str = ""
) -> domain.ModelVersion:
    created = port.create_model_version(
        name,
        source=f"runs:/{run_id}/{path}",
        run_id=run_id,
        description="",
        tags={},
        request_id=request_id or request(),
    )
    return port.wait_until_ready(created)


def model_files(port: MlflowPort, run_id: str, tmp_path: Path, path: str = "model") -> None:
    """Store a small model directory (MLmodel, data/weights.bin) among the run's artifacts."""
    local = tmp_path / unique("files")
    (local / "data").mkdir(parents=True)
    (local / "MLmodel").write_bytes(b"flavors: {}\n")
    (local / "data" / "weights.bin").write_bytes(b"\x00\x01weights")
    port.log_artifact(run_id, local / "MLmodel", path)
    port.log_artifact(run_id, local / "data" / "weights.bin", f"{path}/data")


def every_page(search: Any, page_size: int, **kwargs: Any) -> list[list[Any]]:
    """Each page of a search, following the tokens to the last page."""
    pages: list[list[Any]] = []
    token = ""
    while True:
        page = search(page_size=page_size, page_token=token, **kwargs)
        pages.append(list(page.items))
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "the tokens never end"


class MlflowPortContract:
    """What every MlflowPort does. Subclasses provide the `port` fixture."""

    # -- reachability -------------------------------------------------------------------

    def test_ping_answers(self, port: MlflowPort) -> None:
        port.ping()
        port.ping(retry=False)

    # -- experiments --------------------------------------------------------------------

    def test_an_experiment_is_created_once_per_request(self, port: MlflowPort) -> None:
        name = unique("exp")
        request_id = request()
        first = port.create_experiment(
            name, artifact_location="", tags={"team": "rl"}, request_id=request_id
        )
        again = port.create_experiment(
            name, artifact_location="", tags={"team": "rl"}, request_id=request_id
        )
        assert again == first
        with pytest.raises(AlreadyExistsError):
            port.create_experiment(name, artifact_location="", tags={}, request_id=request())
        found = port.get_experiment(first)
        assert found == port.get_experiment_by_name(name)
        assert (found.experiment_id, found.name, found.lifecycle_stage) == (first, name, ACTIVE)
        assert found.tags.get("team") == "rl"
        assert REQUEST_ID_TAG not in found.tags
        assert found.creation_time_ms > 0

    def test_missing_experiments_are_not_found(self, port: MlflowPort) -> None:
        with pytest.raises(NotFoundError) as err:
            port.get_experiment("987654321")
        assert err.value.reason == ErrorReason.EXPERIMENT_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            port.get_experiment_by_name(unique("ghost"))
        assert err.value.reason == ErrorReason.EXPERIMENT_NOT_FOUND

    def test_experiments_are_searched_page_by_page(self, port: MlflowPort) -> None:
        prefix = unique("paged")
        names = [f"{prefix}-{i}" for i in range(5)]
        for name in reversed(names):
            new_experiment(port, name)
        pages = every_page(
            port.search_experiments,
            2,
            filter_string=f"name LIKE '{prefix}-%'",
            order_by=["name ASC"],
            view_type=domain.ViewType.ACTIVE_ONLY,
        )
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [e.name for p in pages for e in p] == names
        exact = port.search_experiments(
            filter_string=f"name = '{names[3]}'",
            order_by=[],
            page_size=10,
            page_token="",
            view_type=domain.ViewType.ALL,
        )
        assert [e.name for e in exact.items] == [names[3]]
        assert exact.next_page_token == ""

    @pytest.mark.parametrize(
        ("fields", "field"),
        [
            ({"filter_string": "name ~~ 'x'"}, "filter"),
            ({"order_by": ["no_such_column"]}, "order_by[0]"),
            ({"page_token": "not-a-token"}, "page_token"),
        ],
    )
    def test_bad_searches_name_their_field(
        self, port: MlflowPort, fields: dict[str, Any], field: str
    ) -> None:
        args: dict[str, Any] = {"filter_string": "", "order_by": [], "page_token": "", **fields}
        for search in (port.search_registered_models, port.search_model_versions):
            with pytest.raises(InvalidArgumentError) as err:
                search(page_size=10, **args)
            assert err.value.field == field
        with pytest.raises(InvalidArgumentError) as err:
            port.search_experiments(page_size=10, view_type=domain.ViewType.ALL, **args)
        assert err.value.field == field
        with pytest.raises(InvalidArgumentError) as err:
            port.search_runs(
                [new_experiment(port)], page_size=10, view_type=domain.ViewType.ALL, **args
            )
        assert err.value.field == field
        if field == "page_token":
            assert err.value.reason == ErrorReason.INVALID_PAGE_TOKEN

    def test_a_page_token_is_refused_by_a_search_of_another_query(self, port: MlflowPort) -> None:
        first, second = new_experiment(port), new_experiment(port)
        for experiment_id in (first, second):
            for _ in range(3):
                new_run(port, experiment_id)

        def runs(experiment_id: str, token: str, **changes: Any) -> domain.Page[domain.Run]:
            args: dict[str, Any] = {
                "filter_string": "",
                "order_by": [],
                "view_type": domain.ViewType.ALL,
                **changes,
            }
            return port.search_runs([experiment_id], page_size=2, page_token=token, **args)

        token = runs(first, "").next_page_token
        assert len(runs(first, token).items) == 1
        for other in (
            lambda: runs(second, token),
            lambda: runs(first, token, view_type=domain.ViewType.ACTIVE_ONLY),
            lambda: runs(first, token, order_by=["start_time DESC"]),
        ):
            with pytest.raises(InvalidArgumentError) as err:
                other()
            assert err.value.reason == ErrorReason.INVALID_PAGE_TOKEN

    def test_experiments_are_deleted_and_restored_idempotently(self, port: MlflowPort) -> None:
        name = unique("gone")
        experiment_id = new_experiment(port, name)
        run = new_run(port, experiment_id)
        port.delete_experiment(experiment_id)
        port.delete_experiment(experiment_id)
        assert port.get_experiment(experiment_id).lifecycle_stage is DELETED
        assert port.get_run(run.run_id).info.lifecycle_stage is DELETED

        def search(view: domain.ViewType) -> list[str]:
            page = port.search_experiments(
                filter_string=f"name = '{name}'",
                order_by=[],
                page_size=10,
                page_token="",
                view_type=view,
            )
            return [e.experiment_id for e in page.items]

        assert search(domain.ViewType.ACTIVE_ONLY) == []
        assert search(domain.ViewType.DELETED_ONLY) == [experiment_id]
        with pytest.raises(AlreadyExistsError):  # a deleted experiment keeps its name
            port.create_experiment(name, artifact_location="", tags={}, request_id=request())
        assert port.restore_experiment(experiment_id).lifecycle_stage is ACTIVE
        assert port.restore_experiment(experiment_id).lifecycle_stage is ACTIVE
        assert port.get_run(run.run_id).info.lifecycle_stage is ACTIVE
        with pytest.raises(NotFoundError) as err:
            port.delete_experiment("987654321")
        assert err.value.reason == ErrorReason.EXPERIMENT_NOT_FOUND

    # -- runs ---------------------------------------------------------------------------

    def test_a_run_is_created_once_per_key(self, port: MlflowPort) -> None:
        experiment_id = new_experiment(port)
        key = request()

        def start() -> domain.Run:
            return port.find_or_create_run(
                experiment_id,
                run_name="ppo",
                tags={"seed": "7", REQUEST_ID_TAG: key},
                start_time_ms=1_700_000_000_000,
                key_tag=REQUEST_ID_TAG,
            )

        first = start()
        assert start().run_id == first.run_id
        info = port.get_run(first.run_id).info
        assert (info.experiment_id, info.run_name, info.status) == (
            experiment_id,
            "ppo",
            domain.RunStatus.RUNNING,
        )
        assert info.start_time_ms == 1_700_000_000_000
        assert info.lifecycle_stage is ACTIVE
        assert info.artifact_uri
        assert first.tags["seed"] == "7"
        assert REQUEST_ID_TAG not in first.tags

    def test_missing_runs_and_experiments_are_not_found(self, port: MlflowPort) -> None:
        with pytest.raises(NotFoundError) as err:
            port.get_run(MISSING_RUN)
        assert err.value.reason == ErrorReason.RUN_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            new_run(port, "987654321")
        assert err.value.reason == ErrorReason.EXPERIMENT_NOT_FOUND
        for call in (
            lambda: port.log_batch(MISSING_RUN, params={"a": "1"}),
            lambda: port.set_terminated(MISSING_RUN, domain.RunStatus.FINISHED, 0),
            lambda: port.delete_run(MISSING_RUN),
            lambda: port.restore_run(MISSING_RUN),
            lambda: port.set_running(MISSING_RUN),
            lambda: port.delete_tag(MISSING_RUN, "k"),
        ):
            with pytest.raises(NotFoundError) as err:
                call()
            assert err.value.reason == ErrorReason.RUN_NOT_FOUND

    def test_a_batch_logs_params_tags_and_the_latest_metrics(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        port.log_batch(
            run_id,
            metrics=[
                domain.Metric("loss", 0.5, 1_000, 1),
                domain.Metric("loss", 0.25, 2_000, 2),
                domain.Metric("reward", 3.0, 1_000, 0),
            ],
            params={"lr": "0.01"},
            tags={"stage": "train"},
        )
        port.log_batch(run_id, params={"lr": "0.01"})  # the same value again is a no-op
        run = port.get_run(run_id)
        assert run.params == {"lr": "0.01"}
        assert run.tags["stage"] == "train"
        assert run.metrics["loss"] == domain.Metric("loss", 0.25, 2_000, 2)
        assert run.metrics["reward"] == domain.Metric("reward", 3.0, 1_000, 0)

    def test_metric_history_is_ordered_by_step_then_time_and_paged(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        points = [
            domain.Metric("loss", 5.0, 1_000, 3),
            domain.Metric("loss", 4.0, 2_000, 1),
            domain.Metric("loss", 3.0, 3_000, 2),
            domain.Metric("loss", 2.0, 500, 2),
            domain.Metric("loss", 1.0, 4_000, 0),
        ]
        port.log_metrics(run_id, points)
        port.log_metrics(run_id, points[:2])  # exact duplicates are dropped
        pages = every_page(lambda **kw: port.get_metric_history(run_id, "loss", **kw), page_size=2)
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [(m.step, m.timestamp_ms) for p in pages for m in p] == [
            (0, 4_000),
            (1, 2_000),
            (2, 500),
            (2, 3_000),
            (3, 1_000),
        ]
        whole = port.get_metric_history(run_id, "loss", page_size=100, page_token="")
        assert [m.value for m in whole.items] == [1.0, 4.0, 2.0, 3.0, 5.0]
        assert whole.next_page_token == ""
        assert port.get_metric_history(run_id, "none", page_size=10, page_token="").items == ()
        first = port.get_metric_history(run_id, "loss", page_size=2, page_token="")
        with pytest.raises(InvalidArgumentError) as err:
            port.get_metric_history(run_id, "other", page_size=2, page_token=first.next_page_token)
        assert (err.value.field, err.value.reason) == ("page_token", "INVALID_PAGE_TOKEN")

    def test_every_double_and_key_reaches_mlflow_as_it_was_logged(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        values = [math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, -1.5, 0.1 + 0.2]
        points = [
            domain.Metric("loss/ä 1", value, 1_700_000_000_000 + i, step)
            for i, (value, step) in enumerate(
                zip(values, [0, 1, 2, 3, 4, 5, -7, 2**62], strict=True)
            )
        ]
        port.log_metrics(run_id, points)
        found = port.get_metric_history(run_id, "loss/ä 1", page_size=100, page_token="").items
        by_step = {m.step: m for m in found}
        assert sorted(by_step) == sorted(m.step for m in points)
        for point in points:
            got = by_step[point.step]
            assert got.timestamp_ms == point.timestamp_ms
            if math.isnan(point.value):
                assert math.isnan(got.value)
            elif math.isinf(point.value):
                # MLflow's SQL stores keep an infinity as the largest double of its sign.
                assert got.value in (point.value, math.copysign(sys.float_info.max, point.value))
            else:
                assert got.value == point.value

    def test_runs_end_with_a_terminal_status(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        port.set_terminated(run_id, domain.RunStatus.KILLED, 1_800_000_000_000)
        info = port.get_run(run_id).info
        assert (info.status, info.end_time_ms) == (domain.RunStatus.KILLED, 1_800_000_000_000)
        other = new_run(port).run_id
        port.end_run(other, "FINISHED", 0)
        ended = port.get_run(other).info
        assert ended.status is domain.RunStatus.FINISHED and ended.end_time_ms > 0

    def test_an_ended_run_set_running_keeps_its_end_time(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        port.set_terminated(run_id, domain.RunStatus.FAILED, 1_800_000_000_000)
        port.set_running(run_id)
        info = port.get_run(run_id).info
        assert (info.status, info.end_time_ms) == (domain.RunStatus.RUNNING, 1_800_000_000_000)
        port.delete_run(run_id)
        with pytest.raises(FailedPreconditionError) as err:
            port.set_running(run_id)
        assert err.value.reason == ErrorReason.RUN_NOT_ACTIVE

    def test_a_deleted_run_takes_no_points_and_no_end(self, port: MlflowPort) -> None:
        run_id = new_run(port).run_id
        port.delete_run(run_id)
        with pytest.raises(FailedPreconditionError) as logged:
            port.log_metrics(run_id, [domain.Metric("loss", 1.0, 1_000, 1)], retry=False)
        with pytest.raises(FailedPreconditionError) as ended:
            port.set_terminated(run_id, domain.RunStatus.FINISHED, 1_800_000_000_000)
        assert logged.value.reason == ended.value.reason == ErrorReason.RUN_NOT_ACTIVE
        port.restore_run(run_id)
        assert port.get_run(run_id).info.status is domain.RunStatus.RUNNING

    def test_a_missing_tag_is_told_apart_from_a_missing_run(self, port: MlflowPort) -> None:
        run_id = new_run(port, stage="train").run_id
        port.delete_tag(run_id, "stage")
        assert "stage" not in port.get_run(run_id).tags
        with pytest.raises(NotFoundError) as err:
            port.delete_tag(run_id, "stage")
        assert err.value.reason == ErrorReason.TAG_NOT_FOUND

    def test_runs_are_searched_deleted_and_restored(self, port: MlflowPort) -> None:
        experiment_id = new_experiment(port)
        group = unique("g")
        runs = [new_run(port, experiment_id, group=group).run_id for _ in range(3)]
        new_run(port, experiment_id, group="other")

        def search(view: domain.ViewType = domain.ViewType.ACTIVE_ONLY) -> list[list[str]]:
            pages = every_page(
                lambda **kw: port.search_runs([experiment_id], **kw),
                2,
                filter_string=f"tags.group = '{group}'",
                order_by=[],
                view_type=view,
            )
            return [[r.run_id for r in p] for p in pages]

        assert sorted(r for p in search() for r in p) == sorted(runs)
        assert [len(p) for p in search()] == [2, 1]
        port.delete_run(runs[0])
        port.delete_run(runs[0])
        assert port.get_run(runs[0]).info.lifecycle_stage is DELETED
        assert sorted(r for p in search() for r in p) == sorted(runs[1:])
        assert search(domain.ViewType.DELETED_ONLY) == [[runs[0]]]
        assert port.restore_run(runs[0]).info.lifecycle_stage is ACTIVE
        assert port.restore_run(runs[0]).info.lifecycle_stage is ACTIVE
        assert len([r for p in search(domain.ViewType.ALL) for r in p]) == 3

    # -- registered models --------------------------------------------------------------

    def test_a_model_is_created_once_per_request(self, port: MlflowPort) -> None:
        name = unique("model")
        request_id = request()
        first = port.create_registered_model(
            name, description="d", tags={"team": "rl"}, request_id=request_id
        )
        again = port.create_registered_model(
            name, description="d", tags={"team": "rl"}, request_id=request_id
        )
        assert again.name == first.name == name
        with pytest.raises(AlreadyExistsError):
            port.create_registered_model(name, description="", tags={}, request_id=request())
        found = port.get_registered_model(name)
        assert (found.description, dict(found.tags), dict(found.aliases)) == (
            "d",
            {"team": "rl"},
            {},
        )
        with pytest.raises(NotFoundError) as err:
            port.get_registered_model(unique("ghost"))
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND

    def test_models_are_searched_page_by_page(self, port: MlflowPort) -> None:
        prefix = unique("m")
        names = [f"{prefix}-{i}" for i in range(3)]
        for name in reversed(names):
            new_model(port, name)
        pages = every_page(
            port.search_registered_models,
            2,
            filter_string=f"name LIKE '{prefix}-%'",
            order_by=["name ASC"],
        )
        assert [[m.name for m in p] for p in pages] == [names[:2], names[2:]]

    def test_models_are_updated_renamed_tagged_and_deleted(self, port: MlflowPort) -> None:
        name = new_model(port)
        assert port.update_registered_model(name, "new words").description == "new words"
        port.set_registered_model_tag(name, "k", "v")
        assert port.get_registered_model(name).tags == {"k": "v"}
        port.delete_registered_model_tag(name, "k")
        assert port.get_registered_model(name).tags == {}
        port.delete_registered_model_tag(name, "k")  # as MLflow has it: done already
        renamed = unique("renamed")
        rename_id = request()
        assert port.rename_registered_model(name, renamed, request_id=rename_id).name == renamed
        # The same request again, after its answer got lost: the rename is found done.
        assert port.rename_registered_model(name, renamed, request_id=rename_id).name == renamed
        with pytest.raises(NotFoundError) as err:
            port.rename_registered_model(name, unique("x"), request_id=request())
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND
        taken = new_model(port)
        with pytest.raises(AlreadyExistsError):
            port.rename_registered_model(renamed, taken, request_id=request())
        assert port.get_registered_model(renamed).name == renamed
        port.delete_registered_model(renamed)
        with pytest.raises(NotFoundError) as err:
            port.get_registered_model(renamed)
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND
        ghost = unique("ghost")
        for call in (
            lambda: port.update_registered_model(ghost, ""),
            lambda: port.set_registered_model_tag(ghost, "k", "v"),
            lambda: port.delete_registered_model_tag(ghost, "k"),
            lambda: port.delete_registered_model(ghost),
        ):
            with pytest.raises(NotFoundError) as err:
                call()
            assert err.value.reason == ErrorReason.MODEL_NOT_FOUND

    # -- model versions -----------------------------------------------------------------

    def test_a_version_is_created_once_per_request(self, port: MlflowPort) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        request_id = request()
        first = new_version(port, name, run_id, request_id=request_id)
        again = new_version(port, name, run_id, request_id=request_id)
        assert (again.name, again.version) == (first.name, first.version) == (name, 1)
        assert first.status is domain.ModelVersionStatus.READY
        assert (first.source, first.run_id) == (f"runs:/{run_id}/model", run_id)
        assert REQUEST_ID_TAG not in first.tags
        found = port.find_model_version(request_id)
        assert found is not None and (found.name, found.version) == (name, 1)
        assert port.find_model_version(request()) is None
        # The id is one call's: a version of another model under it is refused.
        other = new_model(port)
        with pytest.raises(InvalidArgumentError) as reused:
            new_version(port, other, run_id, request_id=request_id)
        assert (reused.value.reason, reused.value.field) == (
            ErrorReason.REQUEST_ID_REUSED,
            "request_id",
        )
        assert port.find_model_version(request_id) == found
        with pytest.raises(NotFoundError) as err:
            new_version(port, unique("ghost"), run_id)
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND

    def test_the_latest_version_is_the_highest_number(self, port: MlflowPort) -> None:
        name = new_model(port, unique("it's"))  # a quote in the name, as MLflow allows
        with pytest.raises(NotFoundError) as err:
            port.latest_model_version(name)
        assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
        run_id = new_run(port).run_id
        for i in range(3):
            new_version(port, name, run_id, f"m{i}")
        assert port.latest_model_version(name).version == 3
        with pytest.raises(NotFoundError) as err:
            port.latest_model_version(unique("ghost"))
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND

    def test_versions_are_read_searched_and_found_by_source(self, port: MlflowPort) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        for path in ("a", "b", "a", "c", "a"):
            new_version(port, name, run_id, path)
        assert port.get_model_version(name, 2).source == f"runs:/{run_id}/b"
        with pytest.raises(NotFoundError) as err:
            port.get_model_version(name, 99)
        assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
        pages = every_page(
            port.search_model_versions,
            2,
            filter_string=f"name = '{name}'",
            order_by=["version_number DESC"],
        )
        assert [[v.version for v in p] for p in pages] == [[5, 4], [3, 2], [1]]
        from_a = port.versions_from(name, f"runs:/{run_id}/a")
        assert sorted(v.version for v in from_a) == [1, 3, 5]
        assert port.versions_from(name, f"runs:/{run_id}/z") == ()

    def test_a_versions_own_tags_are_read_apart_from_its_tags(self, port: MlflowPort) -> None:
        name = new_model(port)
        new_version(port, name, new_run(port).run_id)
        assert port.model_version_tag(name, 1, "mlflow_sidecar.upload_complete") is None
        port.set_model_version_tag(name, 1, "mlflow_sidecar.upload_complete", "true")
        port.set_model_version_tag(name, 1, "k", "v")
        assert port.model_version_tag(name, 1, "mlflow_sidecar.upload_complete") == "true"
        assert port.model_version_tag(name, 1, "k") == "v"
        assert port.get_model_version(name, 1).tags == {"k": "v"}
        with pytest.raises(NotFoundError):
            port.model_version_tag(name, 2, "k")

    def test_versions_are_updated_tagged_and_deleted(self, port: MlflowPort) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        new_version(port, name, run_id)
        assert port.update_model_version(name, 1, "words").description == "words"
        port.set_model_version_tag(name, 1, "k", "v")
        assert port.get_model_version(name, 1).tags == {"k": "v"}
        port.delete_model_version_tag(name, 1, "k")
        assert port.get_model_version(name, 1).tags == {}
        port.delete_model_version_tag(name, 1, "k")  # as MLflow has it: done already
        port.delete_model_version(name, 1)
        for call in (
            lambda: port.get_model_version(name, 1),
            lambda: port.update_model_version(name, 1, ""),
            lambda: port.set_model_version_tag(name, 1, "k", "v"),
            lambda: port.delete_model_version_tag(name, 1, "k"),
            lambda: port.delete_model_version(name, 1),
        ):
            with pytest.raises(NotFoundError) as err:
                call()
            assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND

    def test_aliases_point_at_versions(self, port: MlflowPort) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        new_version(port, name, run_id, "a")
        new_version(port, name, run_id, "b")
        port.set_model_alias(name, "champion", 1)
        assert port.get_model_version_by_alias(name, "champion").version == 1
        assert port.get_model_version(name, 1).aliases == ("champion",)
        assert port.get_registered_model(name).aliases == {"champion": 1}
        port.set_model_alias(name, "champion", 2)  # moves the alias
        assert port.get_model_version_by_alias(name, "champion").version == 2
        assert port.get_model_version(name, 1).aliases == ()
        port.delete_model_alias(name, "champion")
        assert port.get_registered_model(name).aliases == {}

    def test_missing_aliases_are_not_found(self, port: MlflowPort) -> None:
        name = new_model(port)
        new_version(port, name, new_run(port).run_id)
        with pytest.raises(NotFoundError) as err:
            port.get_model_version_by_alias(name, "unset")
        assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            port.delete_model_alias(name, "unset")
        assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            port.get_model_version_by_alias(unique("ghost"), "champion")
        assert err.value.reason == ErrorReason.MODEL_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            port.set_model_alias(name, "champion", 7)
        assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
        assert port.get_registered_model(name).aliases == {}

    def test_sources_are_resolved_before_anything_is_registered(self, port: MlflowPort) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        other = new_run(port).run_id
        assert port.resolve_source(f"runs:/{run_id}/model", "") == run_id
        assert port.resolve_source(f"runs:/{run_id}/model", run_id) == run_id
        with pytest.raises(InvalidArgumentError) as err:
            port.resolve_source(f"runs:/{run_id}/model", other)
        assert err.value.field == "run_id"
        with pytest.raises(InvalidArgumentError) as err:
            port.resolve_source("runs:model", "")
        assert err.value.field == "source"
        with pytest.raises(NotFoundError) as err:
            port.resolve_source(f"runs:/{MISSING_RUN}/model", "")
        assert err.value.reason == ErrorReason.RUN_NOT_FOUND
        new_version(port, name, run_id)
        port.set_model_alias(name, "champion", 1)
        assert port.resolve_source(f"models:/{name}/1", "") == ""
        assert port.resolve_source(f"models:/{name}@champion", other) == other
        with pytest.raises(NotFoundError) as err:
            port.resolve_source(f"models:/{name}/2", "")
        assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND
        with pytest.raises(NotFoundError) as err:
            port.resolve_source(f"models:/{name}@unset", "")
        assert err.value.reason == ErrorReason.ALIAS_NOT_FOUND
        with pytest.raises(InvalidArgumentError) as err:
            port.resolve_source(f"models:/{name}@latest", "")
        assert (err.value.field, err.value.reason) == ("source", "RESERVED_ALIAS")
        # Past int64: MLflow's stores fail on such a number with a server error.
        with pytest.raises(InvalidArgumentError) as err:
            port.resolve_source(f"models:/{name}/{2**63}", "")
        assert err.value.field == "source"
        with pytest.raises(NotFoundError) as err:
            port.resolve_source(f"models:/{name}/{2**63 - 1}", "")
        assert err.value.reason == ErrorReason.MODEL_VERSION_NOT_FOUND

    # -- artifacts ----------------------------------------------------------------------

    def test_artifacts_are_stored_listed_downloaded_and_deleted(
        self, port: MlflowPort, tmp_path: Path
    ) -> None:
        run_id = new_run(port).run_id
        model_files(port, run_id, tmp_path)
        assert port.list_artifacts(run_id, "") == [domain.FileInfo("model", is_dir=True)]
        listed = port.list_artifacts(run_id, "model")
        assert [(e.path, e.is_dir) for e in listed] == [
            ("model/MLmodel", False),
            ("model/data", True),
        ]
        assert listed[0].size_bytes == len(b"flavors: {}\n")
        assert port.list_artifacts(run_id, "model/MLmodel") == []
        assert port.list_artifacts(run_id, "nothing/here") == []
        local = port.download_artifact(run_id, "model/data/weights.bin", tmp_path / "dl")
        assert local == tmp_path / "dl" / "weights.bin"
        assert local.read_bytes() == b"\x00\x01weights"
        port.delete_artifacts(run_id, "model/data")
        assert [e.path for e in port.list_artifacts(run_id, "model")] == ["model/MLmodel"]

    def test_a_version_downloads_its_model_files(self, port: MlflowPort, tmp_path: Path) -> None:
        name = new_model(port)
        run_id = new_run(port).run_id
        model_files(port, run_id, tmp_path, "policy")
        new_version(port, name, run_id, "policy")
        (tmp_path / "dst").mkdir()
        root = port.download_model_version(name, 1, tmp_path / "dst")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        assert files == ["MLmodel", "data/weights.bin"]
        assert (root / "data" / "weights.bin").read_bytes() == b"\x00\x01weights"

    def test_a_file_sent_while_it_arrives_is_stored_whole(
        self, port: MlflowPort, tmp_path: Path
    ) -> None:
        run = new_run(port)
        data = b"chunk-one|chunk-two"
        upload = port.start_artifact_upload(run.info.artifact_uri, "ckpt", "w.bin", len(data))
        if upload is None:  # this store takes whole files
            local = tmp_path / "w.bin"
            local.write_bytes(data)
            port.log_artifact(run.run_id, local, "ckpt")
        else:
            upload.write(data[:10])
            upload.write(data[10:])
            assert upload.commit() is None
        streamed = port.open_artifact_download(run.info.artifact_uri, "ckpt/w.bin", 4)
        if streamed is None:  # this store hands out whole files
            got = port.download_artifact(run.run_id, "ckpt/w.bin", tmp_path / "dl").read_bytes()
        else:
            assert streamed.size_bytes == len(data)
            got = b"".join(streamed.chunks)
        assert got == data
