"""The typed client's `sync_model` / `download_model` against the sidecar's DownloadModel
servicer (over the in-memory MlflowPort and a real model cache): verified files swapped in
whole, nothing transferred for an unchanged model, the old copy kept on failure."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.client import directory_swap
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import InvalidArgumentError, error_from_rpc
from mlflow_sidecar.core.model_digest import directory_digest
from mlflow_sidecar.server.alias_watch import AliasWatchHub
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.interceptors import ErrorMappingInterceptor
from mlflow_sidecar.server.servicers.registry import RegistryServicer
from mlflow_sidecar.server.services.alias_watch import AliasWatchService
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc
from tests.unit.test_model_cache import FETCH, MODEL, Sidecar, digest_of


def unused_watches(sidecar: Sidecar) -> AliasWatchService:
    """The servicer's watches, which these tests never open."""
    config = load_config(data_dir=sidecar.tmp_path)
    return AliasWatchService(AliasWatchHub(sidecar.fake, config.watch, sidecar.metrics))


OTHER = {"MLmodel": b"flavors: {}\n", "weights/new.bin": b"\x01" * 5000}


@pytest.fixture()
def sidecar(tmp_path: Path) -> Sidecar:
    return Sidecar(tmp_path / "sidecar")


@contextlib.contextmanager
def serve_registry(sidecar: Sidecar) -> Iterator[grpc.Channel]:
    """The registry servicer over `sidecar`'s downloads on a loopback port, and a channel."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorMappingInterceptor()]
    )
    servicer = RegistryServicer(
        sidecar.downloads._registry, sidecar.staging, sidecar.downloads, unused_watches(sidecar)
    )
    pb_grpc.add_ModelRegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        server.stop(0)


@pytest.fixture()
def channel(sidecar: Sidecar) -> Iterator[grpc.Channel]:
    with serve_registry(sidecar) as chan:
        yield chan


@pytest.fixture()
def registry(channel: grpc.Channel) -> GrpcModelRegistry:
    return GrpcModelRegistry(pb_grpc.ModelRegistryServiceStub(channel))


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_download_holds_exactly_the_models_files(sidecar, registry, tmp_path):
    sidecar.register("agent")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_bytes(b"from before")  # no longer merged into
    synced = registry.sync_model("agent", out, version=1)
    assert (synced.path, synced.changed, synced.digest) == (out, True, digest_of(MODEL))
    assert synced.model_version.version == 1
    assert files_under(out) == MODEL
    assert [p.name for p in (tmp_path).iterdir()] == ["out", "sidecar"]


def test_download_model_still_returns_the_destination(sidecar, registry, tmp_path):
    sidecar.register("agent")
    assert registry.download_model("agent", tmp_path / "a" / "b", version=1) == tmp_path / "a" / "b"
    assert files_under(tmp_path / "a" / "b") == MODEL


def test_an_unchanged_model_is_neither_transferred_nor_swapped(sidecar, registry, tmp_path):
    sidecar.register("agent")
    out = tmp_path / "out"
    registry.sync_model("agent", out, version=1)
    inode = out.stat().st_ino
    sent = sidecar.staging.in_flight()
    synced = registry.sync_model("agent", out, version=1)
    assert (synced.changed, synced.digest, synced.model_version.name) == (
        False,
        digest_of(MODEL),
        "agent",
    )
    assert out.stat().st_ino == inode
    assert files_under(out) == MODEL
    assert sidecar.fetches() == 1
    assert sent == sidecar.staging.in_flight() == []


def test_a_changed_model_replaces_the_old_one(sidecar, registry, tmp_path):
    sidecar.register("agent")
    sidecar.register("agent", OTHER)
    out = tmp_path / "out"
    registry.sync_model("agent", out, version=1)
    synced = registry.sync_model("agent", out, version=2)
    assert synced.changed
    assert files_under(out) == OTHER
    assert [p.name for p in tmp_path.iterdir()] == ["out", "sidecar"]


def test_the_unchanged_answer_is_one_message_without_files(sidecar, channel):
    sidecar.register("agent")
    stub = pb_grpc.ModelRegistryServiceStub(channel)
    answers = list(
        stub.DownloadModel(
            pb.DownloadModelRequest(name="agent", version=1, if_none_match=digest_of(MODEL))
        )
    )
    assert [a.WhichOneof("payload") for a in answers] == ["unchanged"]
    assert answers[0].unchanged.digest == digest_of(MODEL)
    assert answers[0].unchanged.model_version.version == 1
    full = list(stub.DownloadModel(pb.DownloadModelRequest(name="agent", version=1)))
    assert full[0].manifest.digest == digest_of(MODEL)


@pytest.mark.parametrize("value", ["f" * 65, "not-hex"])
def test_a_malformed_if_none_match_is_invalid_argument_on_the_field(sidecar, channel, value):
    sidecar.register("agent")
    stub = pb_grpc.ModelRegistryServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.DownloadModel(
                pb.DownloadModelRequest(name="agent", version=1, if_none_match=value)
            )
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_rpc(err.value).field == "if_none_match"


def test_a_file_as_destination_is_refused(sidecar, registry, tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError) as err:
        registry.sync_model("agent", tmp_path / "file", version=1)
    assert err.value.field == "dst_dir"


def test_a_failed_download_leaves_the_old_copy_and_no_sibling(sidecar, registry, tmp_path):
    sidecar.register("agent")
    sidecar.register("agent", OTHER)
    out = tmp_path / "out"
    registry.sync_model("agent", out, version=1)
    # The cached copy of version 2 is damaged and MLflow fails meanwhile.
    registry.sync_model("agent", tmp_path / "warm", version=2)
    sidecar.fake.fail(FETCH, OSError("MLflow's store is gone"))
    for entry in sidecar.entries():
        for path in entry.rglob("new.bin"):
            path.write_bytes(b"\x02" * 5000)
    with pytest.raises(Exception):  # noqa: B017 - the failure's kind is not the point
        registry.sync_model("agent", out, version=2)
    assert files_under(out) == MODEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sidecar", "warm"]


# -- the swap itself -------------------------------------------------------------------------


def snapshot(destination: Path) -> dict[str, bytes]:
    """The files of the directory `destination` names at the moment it is opened: read
    through that directory's descriptor (Linux's /proc/self/fd link to it), so a later
    swap cannot mix two copies into one reading."""
    fd = os.open(destination, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return files_under(Path(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)


def test_a_reader_sees_the_old_or_the_new_model_never_a_mix_nor_nothing(
    sidecar, registry, tmp_path, monkeypatch
):
    assert directory_swap._renameat2() is not None, "Linux with glibc 2.28+ has renameat2"
    # Replaced copies are kept aside rather than removed, so that a reading begun just
    # before a swap finishes on a whole copy: what is checked is the swap alone.
    graveyard = tmp_path / "replaced"
    graveyard.mkdir()
    monkeypatch.setattr(
        directory_swap,
        "discard",
        lambda old: old.rename(graveyard / str(len(list(graveyard.iterdir())))),
    )
    sidecar.register("agent")
    sidecar.register("agent", OTHER)
    out = tmp_path / "out"
    registry.sync_model("agent", out, version=1)
    seen: list[dict[str, bytes] | OSError] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(snapshot(out))
            except OSError as exc:
                seen.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for swap in range(20):
            registry.sync_model("agent", out, version=2 if swap % 2 == 0 else 1)
    finally:
        stop.set()
        reader.join()
    assert seen
    assert all(s in (MODEL, OTHER) for s in seen), [s for s in seen if s not in (MODEL, OTHER)][:1]


def populated(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def test_the_digest_a_client_computes_is_the_sidecars(sidecar, registry, tmp_path):
    sidecar.register("agent")
    synced = registry.sync_model("agent", tmp_path / "out", version=1)
    assert directory_digest(tmp_path / "out") == synced.digest


def test_the_ports_default_sync_model_serves_older_implementations(tmp_path):
    """An implementation of the port written before sync_model gets it from the port: the
    version resolved first, then downloaded by its number, reported as changed."""

    class OlderRegistry:
        def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
            return ModelVersion(name, 7)

        def download_model(self, name, dst_dir, *, version=None, alias=None, progress=None):
            assert (version, alias) == (7, None)
            return populated(Path(dst_dir), MODEL)

    synced = ModelRegistry.sync_model(OlderRegistry(), "agent", tmp_path / "out", alias="prod")  # type: ignore[arg-type]
    assert (synced.path, synced.model_version.version) == (tmp_path / "out", 7)
    assert (synced.changed, synced.digest) == (True, digest_of(MODEL))


class EndedCall:
    """The context of a call that ended (cancelled, say) while its download waited."""

    def add_callback(self, callback: object) -> bool:
        return False


def test_a_download_whose_call_ended_meanwhile_sends_nothing_and_keeps_nothing(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=0)  # uncached: the fetched copy must be removed
    sidecar.register("agent")
    servicer = RegistryServicer(
        sidecar.downloads._registry, sidecar.staging, sidecar.downloads, unused_watches(sidecar)
    )
    request = pb.DownloadModelRequest(name="agent", version=1)
    assert list(servicer.DownloadModel(request, EndedCall())) == []  # type: ignore[arg-type]
    assert sidecar.staging.in_flight() == []
