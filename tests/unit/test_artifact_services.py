"""The services' artifact and model rules, with a recording fake of the MLflow gateway."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import (
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.services.metric_ingest import MetricIngest
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.spool.deliverer import MetricDeliverer
from mlflow_sidecar.server.spool.store import SpoolStore
from mlflow_sidecar.server.staging import Staging


class ArtifactGateway:
    """Just enough of MlflowGateway for uploads: runs, stored files, models and versions."""

    def __init__(self) -> None:
        self.runs: dict[str, domain.Run] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.models: set[str] = set()
        self.versions: dict[tuple[str, int], domain.ModelVersion] = {}
        self.aliases: dict[tuple[str, str], int] = {}
        self.terminated: dict[str, domain.RunStatus] = {}
        self.fail_on: dict[str, Exception] = {}
        self._ids = itertools.count(1)

    def _maybe_fail(self, method: str) -> None:
        if method in self.fail_on:
            raise self.fail_on[method]

    def get_experiment(self, experiment_id: str) -> domain.Experiment:
        return domain.Experiment(experiment_id, f"exp-{experiment_id}")

    def find_or_create_run(
        self, experiment_id, *, run_name, tags, start_time_ms, key_tag
    ) -> domain.Run:
        for run in self.runs.values():
            if run.tags.get(key_tag) == tags[key_tag]:
                return run
        run = domain.Run(domain.RunInfo(f"run{next(self._ids)}", experiment_id), tags=dict(tags))
        self.runs[run.run_id] = run
        return run

    def get_run(self, run_id: str) -> domain.Run:
        if run_id not in self.runs:
            raise NotFoundError(f"run {run_id} does not exist")
        return self.runs[run_id]

    def set_terminated(self, run_id, status, end_time_ms) -> None:
        self.terminated[run_id] = status

    def log_artifact(self, run_id: str, local_file: Path, artifact_dir: str) -> None:
        self._maybe_fail("log_artifact")
        path = f"{artifact_dir}/{local_file.name}" if artifact_dir else local_file.name
        self.files[(run_id, path)] = local_file.read_bytes()

    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        for key in [k for k in self.files if k[0] == run_id and k[1].startswith(artifact_path)]:
            del self.files[key]

    def get_registered_model(self, name: str) -> domain.RegisteredModel:
        if name not in self.models:
            raise NotFoundError(f"registered model {name!r} does not exist")
        return domain.RegisteredModel(name)

    def create_registered_model(
        self, name, *, description, tags, request_id
    ) -> domain.RegisteredModel:
        self.models.add(name)
        return domain.RegisteredModel(name)

    def find_model_version(self, name: str, request_id: str) -> domain.ModelVersion | None:
        return None

    def delete_registered_model(self, name: str) -> None:
        self.models.discard(name)

    def create_model_version(
        self, name, *, source, run_id, description, tags, request_id
    ) -> domain.ModelVersion:
        number = 1 + max((v for n, v in self.versions if n == name), default=0)
        version = domain.ModelVersion(
            name, number, source=source, run_id=run_id, description=description, tags=dict(tags)
        )
        self.versions[(name, number)] = version
        # The version exists in MLflow even when the answer does not come back.
        self._maybe_fail("create_model_version")
        return version

    def get_model_version(self, name: str, version: int) -> domain.ModelVersion:
        if (name, version) not in self.versions:
            raise NotFoundError(f"{name} v{version} does not exist")
        found = self.versions[(name, version)]
        aliases = tuple(a for (n, a), v in self.aliases.items() if n == name and v == version)
        return domain.ModelVersion(
            name, version, source=found.source, run_id=found.run_id, aliases=aliases
        )

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        self._maybe_fail("set_model_alias")
        self.aliases[(name, alias)] = version

    def search_model_versions(self, *, filter_string, order_by, page_size, page_token):
        found = [v for (n, _), v in self.versions.items() if f"'{n}'" in filter_string]
        return domain.Page(tuple(found[:page_size]))

    def delete_model_version(self, name: str, version: int) -> None:
        del self.versions[(name, version)]
        for key in [k for k, v in self.aliases.items() if k[0] == name and v == version]:
            del self.aliases[key]


@pytest.fixture()
def staging(tmp_path) -> Staging:
    return Staging(load_config(data_dir=tmp_path / "data", artifacts={"max_upload_bytes": 4096}))


@pytest.fixture()
def gateway() -> ArtifactGateway:
    return ArtifactGateway()


@pytest.fixture()
def registry(gateway, staging) -> RegistryService:
    return RegistryService(gateway, staging)  # type: ignore[arg-type]


@pytest.fixture()
def tracking(gateway, staging, tmp_path) -> TrackingService:
    store = SpoolStore(tmp_path / "spool.db", max_points=100)
    # Never started: these tests stream no metrics.
    deliverer = MetricDeliverer(
        store, lambda run_id, metrics: None, batch_size=10, backoff_factor_s=1, max_backoff_s=1
    )
    ingest = MetricIngest(store, deliverer, flush_timeout_s=1)
    return TrackingService(gateway, ingest, staging)  # type: ignore[arg-type]


def model_dir(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "MLmodel").write_bytes(b"flavors: {}\n")
    (root / "data" / "weights.bin").write_bytes(os.urandom(100))
    return root


def test_upload_model_into_a_new_run(registry, gateway, tmp_path):
    source = model_dir(tmp_path / "m")
    version = registry.upload_model(
        "policy", source, experiment_id="1", aliases=["champion", "champion"], tags={"k": "v"}
    )
    (run_id,) = gateway.runs
    assert version.source.startswith(f"runs:/{run_id}/models/")
    artifact_dir = version.source.removeprefix(f"runs:/{run_id}/")
    assert gateway.files == {
        (run_id, f"{artifact_dir}/MLmodel"): b"flavors: {}\n",
        (run_id, f"{artifact_dir}/data/weights.bin"): (source / "data/weights.bin").read_bytes(),
    }
    assert version.aliases == ("champion",)
    assert gateway.runs[run_id].tags["mlflow_sidecar.uploaded_model"] == "policy"
    assert gateway.terminated == {run_id: domain.RunStatus.FINISHED}


def test_a_version_whose_creation_failed_is_undone_with_its_files(registry, gateway, tmp_path):
    gateway.fail_on["create_model_version"] = UnavailableError("MLflow is unavailable")
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), experiment_id="1")
    (run_id,) = gateway.runs
    assert gateway.versions == {}
    assert gateway.files == {}
    assert gateway.models == set()  # created by this upload, empty again: removed
    assert gateway.terminated == {run_id: domain.RunStatus.FAILED}


def test_a_failed_alias_undoes_the_version_but_keeps_an_existing_model(registry, gateway, tmp_path):
    gateway.models.add("policy")
    gateway.runs["mine"] = domain.Run(domain.RunInfo("mine", "1"))
    gateway.fail_on["set_model_alias"] = UnavailableError("MLflow is unavailable")
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), run_id="mine", aliases=["a"])
    assert gateway.versions == {}
    assert gateway.files == {}
    assert gateway.models == {"policy"}
    assert gateway.terminated == {}  # the caller's run is the caller's business


def test_failure_while_storing_files_leaves_no_files(registry, gateway, tmp_path):
    gateway.runs["mine"] = domain.Run(domain.RunInfo("mine", "1"))
    gateway.fail_on["log_artifact"] = UnavailableError("MLflow is unavailable")
    with pytest.raises(UnavailableError):
        registry.upload_model("policy", model_dir(tmp_path / "m"), run_id="mine")
    assert (gateway.files, gateway.versions, gateway.models) == ({}, {}, set())


def test_upload_model_checks_before_touching_mlflow(registry, gateway, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "w.bin").write_bytes(b"x" * 4097)
    with pytest.raises(ResourceExhaustedError) as err:
        registry.upload_model("policy", big, experiment_id="1")
    assert err.value.reason == ErrorReason.UPLOAD_TOO_LARGE
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidArgumentError) as err:
        registry.upload_model("policy", empty, experiment_id="1")
    assert err.value.field == "local_dir"
    assert gateway.runs == {}


def test_upload_artifact_stores_the_file_under_the_target_name(
    tracking, gateway, staging, tmp_path
):
    gateway.runs["r"] = domain.Run(domain.RunInfo("r", "1"))
    source = tmp_path / "local-name.tmp"
    source.write_bytes(b"weights")
    info = tracking.upload_artifact("r", source, "ckpt/step_1.pt")
    assert gateway.files == {("r", "ckpt/step_1.pt"): b"weights"}
    assert (info.path, info.size_bytes) == ("ckpt/step_1.pt", 7)
    assert staging.in_flight() == []
    assert source.read_bytes() == b"weights"  # the caller's file is untouched


def test_upload_artifact_enforces_the_limit_and_the_path_rules(tracking, gateway, tmp_path):
    gateway.runs["r"] = domain.Run(domain.RunInfo("r", "1"))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 4097)
    with pytest.raises(ResourceExhaustedError):
        tracking.upload_artifact("r", big)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError) as err:
        tracking.upload_artifact("r", small, "../escape.bin")
    assert err.value.field == "artifact_path"
    assert gateway.files == {}
