"""The model cache against a real `mlflow server` (behind a proxy that counts MLflow's
requests): a second download needs no artifact request, a damaged entry is fetched again,
and the cache outlives a restart of the sidecar."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.integration.test_spool_lifecycle import small_disk
from tests.support.delay_proxy import DelayProxy
from tests.support.files import MIB, tree_digests
from tests.support.processes import MlflowServer

# MLflow's artifact proxy: every listing and file of a download goes through it.
ARTIFACTS = "/api/2.0/mlflow-artifacts/"


@pytest.fixture()
def proxy(mlflow_server: MlflowServer) -> Iterator[DelayProxy]:
    with DelayProxy(mlflow_server.url, delay_s=0, delayed=lambda _m, _p: False) as counting:
        yield counting


class Sidecar:
    """An in-process sidecar behind the counting proxy, restartable on its data dir."""

    def __init__(self, data_dir: Path, mlflow_url: str) -> None:
        self.config = sidecar_config(data_dir, mlflow_url)
        self.running: RunningSidecar | None = None
        self.container: ClientContainer | None = None

    def start(self) -> ModelRegistry:
        self.running = RunningSidecar(self.config)
        self.container = ClientContainer()
        self.container.config.from_dict({"target": self.running.target, "timeout_s": 60})
        return self.container.model_registry()

    def stop(self) -> None:
        if self.container is not None:
            self.container.shutdown_resources()
        if self.running is not None:
            self.running.stop()

    def entries(self) -> list[Path]:
        return sorted((self.config.data_dir / "models").glob("entry-*"))


@pytest.fixture()
def sidecar(tmp_path: Path, proxy: DelayProxy) -> Iterator[Sidecar]:
    running = Sidecar(tmp_path / "sidecar", proxy.url)
    yield running
    running.stop()


def a_model(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "data" / "weights.bin").write_bytes(bytes(range(256)) * 4096)
    return root


def test_the_second_download_makes_no_mlflow_artifact_request(sidecar, proxy, tmp_path, unique):
    registry = sidecar.start()
    model = a_model(tmp_path / "model")
    version = registry.upload_model(f"cached-{unique}", model, experiment_id="0")
    first = registry.download_model(f"cached-{unique}", tmp_path / "first", version=version.version)
    assert tree_digests(first) == tree_digests(model)
    fetched = proxy.count_under(ARTIFACTS)
    assert fetched > 0
    second = registry.download_model(f"cached-{unique}", tmp_path / "second", version=1)
    assert tree_digests(second) == tree_digests(model)
    assert proxy.count_under(ARTIFACTS) == fetched
    # The client's own copy matches: nothing moves at all.
    synced = registry.sync_model(f"cached-{unique}", tmp_path / "first", version=1)
    assert not synced.changed
    assert proxy.count_under(ARTIFACTS) == fetched


def test_a_damaged_entry_is_fetched_again(sidecar, proxy, tmp_path, unique):
    registry = sidecar.start()
    model = a_model(tmp_path / "model")
    registry.upload_model(f"damaged-{unique}", model, experiment_id="0")
    registry.download_model(f"damaged-{unique}", tmp_path / "first", version=1)
    fetched = proxy.count_under(ARTIFACTS)
    (entry,) = sidecar.entries()
    weights = entry / "files" / "data" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1234] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = registry.download_model(f"damaged-{unique}", tmp_path / "again", version=1)
    assert tree_digests(again) == tree_digests(model)
    assert proxy.count_under(ARTIFACTS) > fetched
    assert sidecar.entries() != [entry]


def test_the_cache_outlives_a_restart(sidecar, proxy, tmp_path, unique):
    registry = sidecar.start()
    model = a_model(tmp_path / "model")
    registry.upload_model(f"kept-{unique}", model, experiment_id="0", aliases=["champion"])
    registry.download_model(f"kept-{unique}", tmp_path / "first", alias="champion")
    sidecar.stop()
    fetched = proxy.count_under(ARTIFACTS)
    registry = sidecar.start()
    after = registry.download_model(f"kept-{unique}", tmp_path / "after", alias="champion")
    assert tree_digests(after) == tree_digests(model)
    assert proxy.count_under(ARTIFACTS) == fetched


def test_a_client_sharing_the_cache_directory_copies_the_version_from_it(
    sidecar, proxy, tmp_path, unique
):
    registry = sidecar.start()
    model = a_model(tmp_path / "model")
    version = registry.upload_model(f"shared-{unique}", model, experiment_id="0")
    assert sidecar.running is not None
    shared = ClientContainer()
    shared.config.from_dict(
        {
            "target": sidecar.running.target,
            "timeout_s": 60,
            "model_cache_dir": str(sidecar.config.data_dir / "models"),
        }
    )
    try:
        first = shared.model_registry().download_model(
            f"shared-{unique}", tmp_path / "first", version=version.version
        )
        fetched = proxy.count_under(ARTIFACTS)
        second = shared.model_registry().download_model(
            f"shared-{unique}", tmp_path / "second", version=version.version
        )
    finally:
        shared.shutdown_resources()
    assert tree_digests(first) == tree_digests(second) == tree_digests(model)
    assert proxy.count_under(ARTIFACTS) == fetched
    metrics = sidecar.running.container.metrics().registry
    assert metrics.get_sample_value("mlflow_sidecar_model_cache_handoffs_total") == 2
    # Both copies were read from the cache directory, not streamed: only the manifests went.
    streamed = metrics.get_sample_value(
        "mlflow_sidecar_stream_bytes_total", {"direction": "download"}
    )
    assert (
        streamed is not None
        and streamed < (tmp_path / "model" / "data" / "weights.bin").stat().st_size
    )


def test_a_download_with_no_room_to_stage_the_version_says_disk_full(
    mlflow_server, tmp_path, unique
):
    # The version is staged whole (and hashed) before its manifest goes out: a data dir
    # without room for it answers RESOURCE_EXHAUSTED, DISK_FULL, and leaves nothing behind.
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "weights.bin").write_bytes(os.urandom(6 * MIB))
    with small_disk(tmp_path / "disk") as disk:
        sidecar = Sidecar(disk / "sidecar", mlflow_server.url)
        try:
            registry = sidecar.start()
            registry.upload_model(f"full-{unique}", model, experiment_id="0")
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            ballast = disk / "ballast"
            ballast.write_bytes(b"\0" * (free - 2 * MIB))
            with pytest.raises(ResourceExhaustedError) as err:
                registry.download_model(f"full-{unique}", tmp_path / "first", version=1)
            assert err.value.reason == ErrorReason.DISK_FULL
            assert not (tmp_path / "first").exists()
            assert list((disk / "sidecar" / "tmp").iterdir()) == []
            ballast.unlink()
            done = registry.download_model(f"full-{unique}", tmp_path / "again", version=1)
            assert tree_digests(done) == tree_digests(model)
        finally:
            sidecar.stop()


def test_a_cache_on_a_volume_of_its_own_caches(proxy, tmp_path, unique):
    # <data_dir>/models alone shared with an inference container: a fetched version is
    # staged on the data dir's filesystem and copied into the cache, not left uncached.
    with small_disk(tmp_path / "sidecar" / "models", "40m"):
        sidecar = Sidecar(tmp_path / "sidecar", proxy.url)
        try:
            registry = sidecar.start()
            model = a_model(tmp_path / "model")
            registry.upload_model(f"volume-{unique}", model, experiment_id="0")
            first = registry.download_model(f"volume-{unique}", tmp_path / "first", version=1)
            assert tree_digests(first) == tree_digests(model)
            assert len(sidecar.entries()) == 1
            fetched = proxy.count_under(ARTIFACTS)
            second = registry.download_model(f"volume-{unique}", tmp_path / "second", version=1)
            assert tree_digests(second) == tree_digests(model)
            assert proxy.count_under(ARTIFACTS) == fetched
            assert list((tmp_path / "sidecar" / "tmp").iterdir()) == []
        finally:
            sidecar.stop()
