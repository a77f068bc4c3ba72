"""The model cache against a real `mlflow server` (behind a proxy that counts MLflow's
requests): a second download needs no artifact request, a damaged entry is fetched again,
and the cache outlives a restart of the sidecar."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.core.errors import ErrorReason, ResourceExhaustedError
from mlflow_sidecar.v1 import registry_pb2, registry_pb2_grpc
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

    def __init__(self, data_dir: Path, mlflow_url: str, **sections: dict[str, object]) -> None:
        self.config = sidecar_config(data_dir, mlflow_url, **sections)
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


def test_models_travel_after_the_staging_directory_was_removed(sidecar, tmp_path, unique):
    registry = sidecar.start()
    model = a_model(tmp_path / "model")
    name = f"restaged-{unique}"
    registry.upload_model(name, model, experiment_id="0")
    shutil.rmtree(sidecar.config.staging_dir)
    first = registry.download_model(name, tmp_path / "first", version=1)
    shutil.rmtree(sidecar.config.staging_dir)
    second = registry.upload_model(name, model, experiment_id="0")
    assert second.version == 2
    assert tree_digests(first) == tree_digests(model)
    assert list(sidecar.config.staging_dir.iterdir()) == []


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


def test_a_download_waiting_for_a_fetch_that_ran_out_of_its_callers_deadline_gets_the_version(
    mlflow_server, tmp_path, unique
):
    # Two downloads of one uncached version share a fetch; MLflow's artifact proxy is
    # unavailable until the first call (4 s deadline) has given up. The second, with time
    # left, fetches the version within its own deadline instead of failing with the first.
    outage = threading.Event()

    def refused(_method: str, path: str) -> bool:
        return outage.is_set() and path.startswith(ARTIFACTS)

    never = lambda _m, _p: False  # noqa: E731
    with DelayProxy(mlflow_server.url, delay_s=0, delayed=never, refused=refused) as proxy:
        # Retries bounded by the calls' deadlines, not by a count of tries.
        sidecar = Sidecar(
            tmp_path / "sidecar", proxy.url, retry={"max_tries": 100, "max_time_s": 60.0}
        )
        try:
            registry = sidecar.start()
            model = a_model(tmp_path / "model")
            name = f"flight-{unique}"
            registry.upload_model(name, model, experiment_id="0")
            assert sidecar.running is not None
            running = sidecar.running
            uploaded = proxy.count_under(ARTIFACTS)
            outage.set()
            request = registry_pb2.DownloadModelRequest(name=name, version=1)
            with grpc.insecure_channel(running.target) as channel:
                stub = registry_pb2_grpc.ModelRegistryServiceStub(channel)
                first = Download(stub, request, timeout_s=4)
                wait_until(lambda: proxy.count_under(ARTIFACTS) > uploaded, "the first fetch began")
                second = Download(stub, request, timeout_s=120)
                wait_until(lambda: waiting_downloads(running) == 1, "the second download waits")
                assert first.outcome() == (grpc.StatusCode.DEADLINE_EXCEEDED, 0)
                # The sidecar's side of the first call has given up too: MLflow is back
                # only for fetches made after it.
                wait_until(lambda: ended_out_of_time(running) >= 1, "the first fetch gave up")
                outage.clear()
                assert second.outcome() == (grpc.StatusCode.OK, a_model_bytes(model))
        finally:
            sidecar.stop()


class Download:
    """A raw DownloadModel call in a thread: its status code and the bytes it received."""

    def __init__(
        self,
        stub: registry_pb2_grpc.ModelRegistryServiceStub,
        request: registry_pb2.DownloadModelRequest,
        timeout_s: float,
    ) -> None:
        self._result: tuple[grpc.StatusCode, int] | None = None
        self._thread = threading.Thread(target=self._run, args=(stub, request, timeout_s))
        self._thread.start()

    def _run(
        self,
        stub: registry_pb2_grpc.ModelRegistryServiceStub,
        request: registry_pb2.DownloadModelRequest,
        timeout_s: float,
    ) -> None:
        received = 0
        try:
            for message in stub.DownloadModel(request, timeout=timeout_s):
                received += len(message.chunk.data)
            self._result = (grpc.StatusCode.OK, received)
        except grpc.RpcError as exc:
            self._result = (exc.code(), received)

    def outcome(self) -> tuple[grpc.StatusCode, int] | None:
        """Wait for the call to end (within a bound far past any deadline used here)."""
        self._thread.join(PATIENCE_S)
        return self._result


PATIENCE_S = 60.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(PATIENCE_S / 0.01)):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def waiting_downloads(running: RunningSidecar) -> int:
    """Downloads waiting for a fetch another download runs."""
    flights = running.container.model_downloads()._flights
    with flights._lock:
        return sum(flight.followers for flight in flights._flights.values())


def ended_out_of_time(running: RunningSidecar) -> float:
    """DownloadModel calls the sidecar ended with DEADLINE_EXCEEDED."""
    value = running.container.metrics().registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "server_stream",
            "grpc_service": "mlflow_sidecar.v1.ModelRegistryService",
            "grpc_method": "DownloadModel",
            "grpc_code": "DEADLINE_EXCEEDED",
        },
    )
    return value or 0.0


def a_model_bytes(model: Path) -> int:
    return sum(path.stat().st_size for path in model.rglob("*") if path.is_file())
