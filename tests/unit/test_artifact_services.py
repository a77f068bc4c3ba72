"""The services' artifact and model rules, with a recording fake of the MLflow gateway."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import (
    ErrorReason,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from mlflow_sidecar.server.artifact_writers import ArtifactWriters
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.services.artifacts import store_file
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.staging import Staging
from tests.fakes.mlflow_port import FakeMlflow


@pytest.fixture()
def staging(tmp_path) -> Staging:
    return Staging(load_config(data_dir=tmp_path / "data", artifacts={"max_upload_bytes": 4096}))


@pytest.fixture()
def gateway() -> FakeMlflow:
    return FakeMlflow()


@pytest.fixture()
def experiment_id(gateway: FakeMlflow) -> str:
    return gateway.new_experiment()


@pytest.fixture()
def registry(gateway, staging) -> RegistryService:
    return RegistryService(gateway, staging)


def model_dir(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "MLmodel").write_bytes(b"flavors: {}\n")
    (root / "data" / "weights.bin").write_bytes(os.urandom(100))
    return root


def test_upload_model_into_a_new_run(registry, gateway, experiment_id, tmp_path):
    source = model_dir(tmp_path / "m")
    version = registry.upload_model(
        "policy",
        source,
        experiment_id=experiment_id,
        aliases=["champion", "champion"],
        tags={"k": "v"},
    )
    (run_id,) = gateway.runs
    assert version.source.startswith(f"runs:/{run_id}/models/")
    artifact_dir = version.source.removeprefix(f"runs:/{run_id}/")
    assert gateway.files == {
        (run_id, f"{artifact_dir}/MLmodel"): b"flavors: {}\n",
        (run_id, f"{artifact_dir}/data/weights.bin"): (source / "data/weights.bin").read_bytes(),
    }
    assert version.aliases == ("champion",)
    run = gateway.get_run(run_id)
    # Kept in MLflow, left out of the tags the sidecar returns.
    assert gateway.runs[run_id].tags["mlflow_sidecar.uploaded_model"] == "policy"
    assert not [k for k in run.tags if k.startswith("mlflow_sidecar.")]
    assert run.info.status is domain.RunStatus.FINISHED


def test_a_version_whose_creation_failed_is_undone_with_its_files(
    registry, gateway, experiment_id, tmp_path
):
    # MLflow registers the version, and its answer is lost.
    gateway.fail(
        "create_model_version",
        UnavailableError("MLflow is unavailable"),
        times=None,
        after_effect=True,
    )
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), experiment_id=experiment_id)
    (run_id,) = gateway.runs
    assert gateway.versions == {}
    assert gateway.files == {}
    assert gateway.models == {}  # created by this upload, empty again: removed
    assert gateway.get_run(run_id).info.status is domain.RunStatus.FAILED


def test_a_failed_alias_undoes_the_version_but_keeps_an_existing_model(registry, gateway, tmp_path):
    gateway.create_registered_model("policy", description="", tags={}, request_id="setup")
    mine = gateway.new_run()
    gateway.fail("set_model_alias", UnavailableError("MLflow is unavailable"), times=None)
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), run_id=mine, aliases=["a"])
    assert gateway.versions == {}
    assert gateway.files == {}
    assert set(gateway.models) == {"policy"}
    # The caller's run is the caller's business.
    assert gateway.get_run(mine).info.status is domain.RunStatus.RUNNING


def test_failure_while_storing_files_leaves_no_files(registry, gateway, tmp_path):
    mine = gateway.new_run()
    gateway.fail("log_artifact", UnavailableError("MLflow is unavailable"), times=None)
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), run_id=mine)
    assert (gateway.files, gateway.versions, gateway.models) == ({}, {}, {})


def test_upload_model_checks_before_touching_mlflow(registry, gateway, experiment_id, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "w.bin").write_bytes(b"x" * 4097)
    with pytest.raises(ResourceExhaustedError) as err:
        registry.upload_model("policy", big, experiment_id=experiment_id)
    assert err.value.reason == ErrorReason.UPLOAD_TOO_LARGE
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError) as err:
        registry.upload_model("policy", empty, experiment_id=experiment_id)
    assert err.value.field == "local_dir"
    assert gateway.runs == {}


def test_a_stored_file_takes_the_target_name(gateway, staging, tmp_path):
    run_id = gateway.new_run()
    source = tmp_path / "local-name.tmp"
    source.write_bytes(b"weights")
    store_file(gateway, staging, run_id, source, "ckpt/step_1.pt", writers=ArtifactWriters())
    assert gateway.files == {(run_id, "ckpt/step_1.pt"): b"weights"}
    assert staging.in_flight() == []
    assert source.read_bytes() == b"weights"  # the caller's file is untouched


class _Killed(BaseException):
    """The sidecar killed mid-call: no handler runs, nothing is undone."""


@pytest.mark.parametrize("into", ["new-run", "given-run"])
def test_a_repeat_of_an_upload_cut_short_after_registering_finishes_it(
    registry, gateway, experiment_id, tmp_path, into
):
    where = {"experiment_id": experiment_id} if into == "new-run" else {"run_id": gateway.new_run()}
    source = model_dir(tmp_path / "m")

    def upload() -> domain.ModelVersion:
        return registry.upload_model(
            "policy", source, aliases=["champion", "canary"], request_id="rid-1", **where
        )

    def killed() -> None:
        gateway.on_call("set_model_alias", None)
        raise _Killed

    gateway.on_call("set_model_alias", killed)
    with pytest.raises(_Killed):
        upload()
    assert [v.version.aliases for v in gateway.versions.values()] == [()]
    version = registry.upload_once(
        "policy", "rid-1", "print", upload, aliases=["champion", "canary"], **where_run(where)
    )
    assert (version.version, version.aliases) == (1, ("canary", "champion"))
    assert len(gateway.versions) == 1
    assert gateway.get_run(version.run_id).info.status is (
        domain.RunStatus.FINISHED if into == "new-run" else domain.RunStatus.RUNNING
    )
    assert "mlflow_sidecar.upload_complete" not in version.tags


def test_a_late_repeat_of_a_complete_upload_moves_no_alias_back(
    registry, gateway, experiment_id, tmp_path
):
    source = model_dir(tmp_path / "m")

    def upload() -> domain.ModelVersion:
        return registry.upload_model(
            "policy", source, experiment_id=experiment_id, aliases=["champion"], request_id="r"
        )

    first = upload()
    second = registry.upload_model("policy", model_dir(tmp_path / "n"), experiment_id=experiment_id)
    registry.set_model_alias("policy", "champion", second.version)
    again = registry.upload_once("policy", "r", "print", upload, aliases=["champion"])
    assert again.version == first.version and again.aliases == ()
    assert gateway.get_model_version_by_alias("policy", "champion").version == second.version


def where_run(where: dict[str, str]) -> dict[str, str]:
    """upload_once's own view of where the files went: a given run, or a new one."""
    return {"run_id": where["run_id"]} if "run_id" in where else {}


def test_an_upload_makes_the_model_again_when_a_concurrent_failed_upload_took_it_back(
    registry, gateway, experiment_id, tmp_path
):
    # Another upload of the same new name made the model, failed, and removed it as
    # empty just before this one registered its version: this upload must not fail for it.
    removed: list[str] = []

    def taken_back_once() -> None:
        if not removed:
            removed.append("policy")
            gateway.delete_registered_model("policy")

    gateway.create_registered_model("policy", description="", tags={}, request_id="other")
    gateway.on_call("create_model_version", taken_back_once)
    version = registry.upload_model(
        "policy", model_dir(tmp_path / "m"), experiment_id=experiment_id
    )
    assert removed == ["policy"]
    assert (version.name, version.version) == ("policy", 1)
    assert set(gateway.models) == {"policy"}
