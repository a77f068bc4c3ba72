"""The sidecar reads and writes host files only under its configured roots.

Against both stores (the embedded default store, and a real `mlflow server`): a source or
artifact location naming a host directory elsewhere is refused, and so is a version or
an experiment that points there because it was made through MLflow directly. A sentinel
directory outside the roots stays untouched, and its file's content never comes back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_sidecar.client import ClientContainer, ExperimentTracking, ModelRegistry
from mlflow_sidecar.core.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    SidecarError,
)

SECRET = "sentinel-" + uuid.uuid4().hex


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A host directory outside every root, with a file nobody may read through the sidecar."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "passwd").write_text(SECRET)
    return directory


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture()
def clients(either_sidecar):
    container = ClientContainer()
    container.config.from_dict({"target": either_sidecar.target, "timeout_s": 30.0})
    yield container.experiment_tracking(), container.model_registry()
    container.shutdown_resources()


@pytest.fixture()
def direct(either_sidecar) -> MlflowClient:
    """MLflow itself, as the sidecar's store: what others may have written there."""
    uri = either_sidecar.container.config().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class _OnThisHost:
    """Clients of the embedded store's sidecar, whose artifacts live on this host."""

    tracking: ExperimentTracking
    registry: ModelRegistry
    direct: MlflowClient


@pytest.fixture()
def on_this_host(embedded_store_sidecar) -> Iterator[_OnThisHost]:
    # The embedded store keeps artifacts on this host, where the sidecar reads them itself.
    container = ClientContainer()
    container.config.from_dict({"target": embedded_store_sidecar.target, "timeout_s": 30.0})
    uri = embedded_store_sidecar.container.config().tracking_uri
    yield _OnThisHost(
        container.experiment_tracking(),
        container.model_registry(),
        MlflowClient(tracking_uri=uri, registry_uri=uri),
    )
    container.shutdown_resources()


def _assert_quiet(error: SidecarError, outside: Path) -> None:
    """The error names no host file and carries no byte of the sentinel."""
    assert str(outside) not in error.message and "passwd" not in error.message
    assert SECRET not in error.message


def test_a_host_directory_as_model_source_is_refused(clients, outside, unique, tmp_path):
    _tracking, registry = clients
    registry.create_registered_model(f"host-src-{unique}")
    before = _snapshot(outside)
    for source in (f"file://{outside}", str(outside), f"file://{outside}/passwd", "file:///etc"):
        with pytest.raises(PermissionDeniedError) as err:
            registry.create_model_version(f"host-src-{unique}", source=source)
        assert err.value.message.startswith("source:")
        _assert_quiet(err.value, outside)
    assert registry.search_model_versions(filter_string=f"name = 'host-src-{unique}'").items == ()
    assert _snapshot(outside) == before


def test_a_host_directory_as_artifact_location_is_refused(clients, outside, unique):
    tracking, _registry = clients
    for location in (f"file://{outside}", str(outside), "file:///etc"):
        with pytest.raises(PermissionDeniedError) as err:
            tracking.create_experiment(f"host-loc-{unique}", artifact_location=location)
        assert err.value.message.startswith("artifact_location:")
        _assert_quiet(err.value, outside)
    assert list(outside.iterdir()) == [outside / "passwd"]


@pytest.mark.parametrize(
    "source",
    [
        "runs:/{run}/../../../../etc",
        "runs:/{run}/model/%2e%2e/%2e%2e",
        "runs:/{run}/model%2f..%2fx",
        "runs:/{run}/model\\..\\x",
        "runs:/{run}/model\x00",
        "models:/m/1/../../etc",
        "mlflow-artifacts:/0/../../etc",
        "file:///{root}/../../etc",
        "file:///{root}/%2E%2E/x",
        # MLflow reads a local path only after a lower-case file:, and drops what follows
        # a query or fragment: the location checked would not be the one used.
        "FILE:///{root}/x",
        "file:///{root}/m#x",
        "file:///{root}/m?x",
        "runs:/{run}/model#x",
        # MLflow cannot read these models:/ URIs (a path below the model).
        "models:/m/1/MLmodel",
        "models:/m/1/",
        "MODELS:/m/1",
    ],
)
def test_traversal_in_a_source_is_invalid_naming_the_field(clients, unique, source, tmp_path):
    tracking, registry = clients
    experiment = tracking.create_experiment(f"trav-{unique}")
    run = tracking.start_run(experiment.experiment_id).run_id
    registry.create_registered_model(f"trav-{unique}")
    with pytest.raises(InvalidArgumentError) as err:
        registry.create_model_version(
            f"trav-{unique}", source=source.format(run=run, root=str(tmp_path).lstrip("/"))
        )
    assert err.value.message.startswith("source:")


@pytest.mark.parametrize(
    "location",
    [
        "file:///{root}/../x",
        "{root}/a/%2e%2e",
        "a\\..\\b",
        "FILE://{root}/x",
        "file://{root}/frag#x",
        "file://{root}?/../x",
    ],
)
def test_traversal_in_an_artifact_location_is_invalid(clients, unique, location, tmp_path):
    tracking, _registry = clients
    with pytest.raises(InvalidArgumentError) as err:
        tracking.create_experiment(
            f"trav-loc-{unique}", artifact_location=location.format(root=tmp_path)
        )
    assert err.value.message.startswith("artifact_location:")


def test_a_version_registered_elsewhere_with_a_host_source_is_not_served(
    either_sidecar, clients, direct, outside, unique, tmp_path
):
    _tracking, registry = clients
    name = f"elsewhere-{unique}"
    direct.create_registered_model(name)
    if not either_sidecar.container.config().embedded:
        # A tracking server refuses a local source itself: nothing to serve can exist.
        with pytest.raises(MlflowException, match="Invalid model version source"):
            direct.create_model_version(name, f"file://{outside}")
        return
    direct.create_model_version(name, f"file://{outside}")
    with pytest.raises(PermissionDeniedError) as err:
        registry.download_model(name, tmp_path / "down", version=1)
    _assert_quiet(err.value, outside)
    assert not [p for p in (tmp_path / "down").rglob("*") if p.is_file()]


def test_a_run_whose_artifacts_live_elsewhere_is_neither_read_nor_written(
    clients, direct, outside, unique, tmp_path
):
    tracking, _registry = clients
    experiment_id = direct.create_experiment(
        f"elsewhere-{unique}", artifact_location=f"file://{outside}"
    )
    run_id = direct.create_run(experiment_id).info.run_id
    # As if someone had put a file there: the sidecar must not hand it out.
    stored = outside / run_id / "artifacts"
    stored.mkdir(parents=True)
    (stored / "passwd").write_text(SECRET)
    before = _snapshot(outside)
    upload = tmp_path / "weights.bin"
    upload.write_bytes(b"x" * 1000)

    with pytest.raises(PermissionDeniedError) as err:
        tracking.upload_artifact(run_id, upload, "weights.bin")
    _assert_quiet(err.value, outside)
    with pytest.raises(PermissionDeniedError) as err:
        tracking.list_artifacts(run_id)
    _assert_quiet(err.value, outside)
    with pytest.raises(PermissionDeniedError) as err:
        tracking.download_artifact(run_id, "passwd", tmp_path / "down")
    _assert_quiet(err.value, outside)

    assert _snapshot(outside) == before
    assert not [p for p in (tmp_path / "down").rglob("*") if p.is_file()]


def test_a_model_upload_into_a_run_stored_elsewhere_is_refused_naming_the_header_field(
    clients, direct, outside, unique, tmp_path
):
    _tracking, registry = clients
    experiment_id = direct.create_experiment(
        f"upload-elsewhere-{unique}", artifact_location=f"file://{outside}"
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * 100)
    before = _snapshot(outside)

    with pytest.raises(PermissionDeniedError) as err:
        registry.upload_model(f"elsewhere-{unique}", model, experiment_id=experiment_id)
    assert err.value.field == "header.experiment_id"
    _assert_quiet(err.value, outside)

    assert direct.search_runs([experiment_id], run_view_type=ViewType.ALL) == []
    run_id = direct.create_run(experiment_id).info.run_id
    with pytest.raises(PermissionDeniedError) as err:
        registry.upload_model(f"elsewhere-{unique}", model, run_id=run_id)
    assert err.value.field == "header.run_id"
    _assert_quiet(err.value, outside)
    assert _snapshot(outside) == before


def test_runs_in_the_stores_own_location_still_work(clients, unique, tmp_path):
    tracking, registry = clients
    experiment = tracking.create_experiment(f"own-{unique}")
    run_id = tracking.start_run(experiment.experiment_id).run_id
    upload = tmp_path / "model" / "weights.bin"
    upload.parent.mkdir()
    upload.write_bytes(b"w" * 100)
    tracking.upload_artifact(run_id, upload, "model/weights.bin")
    registry.create_registered_model(f"own-{unique}")
    version = registry.create_model_version(f"own-{unique}", source=f"runs:/{run_id}/model")
    root = registry.download_model(f"own-{unique}", tmp_path / "down", version=version.version)
    assert (root / "weights.bin").read_bytes() == b"w" * 100
    again = registry.create_model_version(f"own-{unique}", source=f"models:/own-{unique}/1")
    assert again.version == 2


def test_a_symlink_in_a_runs_artifacts_does_not_lead_a_source_out_of_them(
    on_this_host, outside, unique, tmp_path
):
    tracking, registry, direct = on_this_host.tracking, on_this_host.registry, on_this_host.direct
    run_id = tracking.start_run(tracking.create_experiment(f"link-{unique}").experiment_id).run_id
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    tracking.upload_artifact(run_id, model / "MLmodel", "model/MLmodel")
    artifacts = Path(direct.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    (artifacts / "leak").symlink_to(outside, target_is_directory=True)
    (artifacts / "model" / "leak").symlink_to(outside, target_is_directory=True)
    name = f"link-{unique}"
    registry.create_registered_model(name)

    for source in (f"runs:/{run_id}/leak", f"runs:/{run_id}/model/leak"):
        with pytest.raises(PermissionDeniedError) as err:
            registry.create_model_version(name, source=source)
        _assert_quiet(err.value, outside)
    # Registered through MLflow directly: the sidecar does not serve it either.
    version = direct.create_model_version(name, f"runs:/{run_id}/leak", run_id=run_id).version
    with pytest.raises(PermissionDeniedError) as err:
        registry.download_model(name, tmp_path / "down", version=int(version))
    _assert_quiet(err.value, outside)
    assert not [p for p in (tmp_path / "down").rglob("*") if p.is_file()]
    assert registry.create_model_version(name, source=f"runs:/{run_id}/model").version == 2
    # Read through the link as a run's artifact: refused as outside the stores, quietly.
    with pytest.raises(PermissionDeniedError) as read:
        tracking.download_artifact(run_id, "model/leak/passwd", tmp_path / "read")
    _assert_quiet(read.value, outside)
    assert read.value.reason == "PATH_OUTSIDE_ROOTS"
    with pytest.raises(PermissionDeniedError) as listed:
        tracking.list_artifacts(run_id, "model/leak")
    assert listed.value.reason == "PATH_OUTSIDE_ROOTS"
    assert not (tmp_path / "read").exists() or not list((tmp_path / "read").rglob("*"))


def test_a_runs_artifacts_swapped_for_a_link_out_are_refused_after_use(
    on_this_host, outside, unique, tmp_path
):
    # Once used, the run's location is known to the sidecar; the check of where it leads
    # is still made at every call.
    tracking, direct = on_this_host.tracking, on_this_host.direct
    run_id = tracking.start_run(tracking.create_experiment(f"swap-{unique}").experiment_id).run_id
    upload = tmp_path / "weights.bin"
    upload.write_bytes(b"w" * 100)
    tracking.upload_artifact(run_id, upload, "weights.bin")
    assert [f.path for f in tracking.list_artifacts(run_id).items] == ["weights.bin"]
    artifacts = Path(direct.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts)
    artifacts.symlink_to(outside, target_is_directory=True)
    for call in (
        lambda: tracking.list_artifacts(run_id),
        lambda: tracking.download_artifact(run_id, "passwd", tmp_path / "down"),
        lambda: tracking.upload_artifact(run_id, upload, "weights.bin"),
    ):
        with pytest.raises(PermissionDeniedError) as err:
            call()
        _assert_quiet(err.value, outside)
        assert err.value.reason == "PATH_OUTSIDE_ROOTS"
    assert sorted(p.name for p in outside.iterdir()) == ["passwd"]


@pytest.mark.parametrize("kind", ["named pipe", "link loop"])
def test_a_stored_file_that_is_not_one_is_refused_saying_what_it_is(
    on_this_host, unique, tmp_path, kind
):
    # A local artifact store may hold what MLflow's client cannot copy as a file: the
    # answer names it, never "internal error".
    tracking, registry, direct = on_this_host.tracking, on_this_host.registry, on_this_host.direct
    run_id = tracking.start_run(tracking.create_experiment(f"odd-{unique}").experiment_id).run_id
    model = tmp_path / "MLmodel"
    model.write_text("flavors: {}\n")
    tracking.upload_artifact(run_id, model, "model/MLmodel")
    stored = Path(direct.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "model"
    if kind == "named pipe":
        os.mkfifo(stored / "odd")
    else:
        (stored / "odd").symlink_to(".", target_is_directory=True)
    name = f"odd-{unique}"
    registry.create_registered_model(name)
    version = registry.create_model_version(name, source=f"runs:/{run_id}/model").version
    with pytest.raises(FailedPreconditionError) as refused:
        registry.download_model(name, tmp_path / "down", version=version)
    assert "not a regular file" in refused.value.message
    if kind == "named pipe":
        with pytest.raises(FailedPreconditionError):
            tracking.download_artifact(run_id, "model/odd", tmp_path / "one")
