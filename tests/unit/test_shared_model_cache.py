"""Model downloads through a shared volume (`accept_cache_entry`): a cached version is
named, not streamed, and the client copies it from the sidecar's cache verifying every
file; whatever stops that copy (entry not mounted here, evicted, damaged) ends in a
streamed download of the right files, never in a wrong model."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest

from mlflow_sidecar.client import ClientContainer, shared_cache
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.shared_cache import CacheEntryUnreadableError, copy_entry, entry_root
from mlflow_sidecar.core.errors import DataLossError
from mlflow_sidecar.server.model_cache.cache import FILES_DIR
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc
from tests.unit.test_model_cache import MODEL, Sidecar, flip_a_byte, read_all, truncate
from tests.unit.test_model_sync import files_under, serve_registry

HANDOFFS = "mlflow_sidecar_model_cache_handoffs_total"
DOWNLOADED = ("mlflow_sidecar_stream_bytes_total", {"direction": "download"})


@pytest.fixture()
def sidecar(tmp_path: Path) -> Sidecar:
    return Sidecar(tmp_path / "sidecar")


@pytest.fixture()
def channel(sidecar: Sidecar) -> Iterator[grpc.Channel]:
    with serve_registry(sidecar) as chan:
        yield chan


@pytest.fixture()
def shared(sidecar: Sidecar, channel: grpc.Channel) -> GrpcModelRegistry:
    """A client that sees the sidecar's model cache, as through a shared volume."""
    return GrpcModelRegistry(
        pb_grpc.ModelRegistryServiceStub(channel), shared_cache_dir=sidecar.cache.root
    )


def payloads(channel, **request: object) -> list[str | None]:
    stub = pb_grpc.ModelRegistryServiceStub(channel)
    answers = stub.DownloadModel(pb.DownloadModelRequest(**request))  # type: ignore[arg-type]
    return [a.WhichOneof("payload") for a in answers]


def streamed_bytes(sidecar: Sidecar) -> float:
    name, labels = DOWNLOADED
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_cached_version_is_named_instead_of_streamed(sidecar, channel):
    sidecar.register("agent")
    streamed = payloads(channel, name="agent", version=1)
    assert streamed[0] == "manifest" and set(streamed[1:]) == {"chunk"}
    answered = payloads(channel, name="agent", version=1, accept_cache_entry=True)
    assert answered == ["manifest", "cache_entry"]
    assert sidecar.sample(HANDOFFS) == 1


def test_the_first_download_is_named_once_it_is_cached(sidecar, channel):
    sidecar.register("agent")
    stub = pb_grpc.ModelRegistryServiceStub(channel)
    request = pb.DownloadModelRequest(name="agent", version=1, accept_cache_entry=True)
    manifest, entry = list(stub.DownloadModel(request))
    root = entry_root(sidecar.cache.root, entry.cache_entry.path)
    assert root.parent.parent == sidecar.cache.root and root.name == FILES_DIR
    named = {
        f.path: root.joinpath(*f.path.split("/")).read_bytes() for f in manifest.manifest.files
    }
    assert named == MODEL
    assert sidecar.fetches() == 1


def test_the_client_copies_a_cached_version_without_receiving_its_bytes(
    sidecar, channel, shared, tmp_path
):
    sidecar.register("agent")
    model_bytes = sum(len(data) for data in MODEL.values())
    plain = GrpcModelRegistry(pb_grpc.ModelRegistryServiceStub(channel))
    before = streamed_bytes(sidecar)
    plain.sync_model("agent", tmp_path / "streamed", version=1)
    assert streamed_bytes(sidecar) - before >= model_bytes
    before = streamed_bytes(sidecar)
    synced = shared.sync_model("agent", tmp_path / "out", version=1)
    assert synced.changed and files_under(tmp_path / "out") == MODEL
    assert streamed_bytes(sidecar) - before < model_bytes
    assert sidecar.sample(HANDOFFS) == 1
    assert sidecar.fetches() == 1
    # Nothing is left beside the destination, and the cache entry is untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sidecar", "streamed"]
    assert sidecar.download("agent") == MODEL


def test_progress_is_reported_for_a_copied_version(sidecar, shared, tmp_path):
    sidecar.register("agent")
    seen: list[tuple[int, int]] = []
    shared.sync_model(
        "agent", tmp_path / "out", version=1, progress=lambda d, t: seen.append((d, t))
    )
    total = sum(len(data) for data in MODEL.values())
    assert seen[0] == (0, total) and seen[-1] == (total, total)


def test_a_version_the_cache_does_not_hold_is_streamed(tmp_path):
    sidecar = Sidecar(tmp_path / "sidecar", max_bytes=0)
    sidecar.register("agent")
    opened = sidecar.downloads.open("agent", version=1, accept_cache_entry=True)
    assert opened.cache_entry is None
    assert read_all(opened) == MODEL
    assert sidecar.sample(HANDOFFS) == 0


def test_the_sidecar_checks_sizes_but_leaves_the_sha256s_to_the_client(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    (entry,) = sidecar.entries()
    flip_a_byte(entry)
    opened = sidecar.downloads.open("agent", version=1, accept_cache_entry=True)
    assert opened.cache_entry is not None  # same size: named, the client will catch it
    assert opened.lease is not None
    opened.lease.release()
    truncate(entry)
    refetched = sidecar.downloads.open("agent", version=1, accept_cache_entry=True)
    assert sidecar.fetches() == 2  # a size that differs is caught without reading
    assert read_all(refetched) == MODEL


def test_a_damaged_entry_is_caught_by_the_client_and_streamed_fixed(
    sidecar,
    shared,
    tmp_path,
    caplog,
):
    sidecar.register("agent")
    sidecar.download("agent")
    (entry,) = sidecar.entries()
    flip_a_byte(entry)
    with caplog.at_level(logging.WARNING):
        synced = shared.sync_model("agent", tmp_path / "out", version=1)
    assert files_under(synced.path) == MODEL
    assert (
        "do not match the manifest" in caplog.text
        and "downloading it from the sidecar" in caplog.text
    )
    # The streamed retry had the sidecar hash the entry: found damaged, fetched again.
    assert sidecar.sample("mlflow_sidecar_model_cache_corrupt_entries_total") == 1
    assert sidecar.fetches() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out", "sidecar"]


def test_a_client_that_does_not_see_the_cache_still_gets_the_model(
    sidecar,
    channel,
    tmp_path,
    caplog,
):
    sidecar.register("agent")
    elsewhere = tmp_path / "not-mounted"
    elsewhere.mkdir()
    registry = GrpcModelRegistry(
        pb_grpc.ModelRegistryServiceStub(channel), shared_cache_dir=elsewhere
    )
    with caplog.at_level(logging.WARNING):
        synced = registry.sync_model("agent", tmp_path / "out", alias=None, version=1)
    assert files_under(synced.path) == MODEL
    assert str(elsewhere) in caplog.text
    assert list(elsewhere.iterdir()) == []


def test_an_unchanged_copy_is_answered_unchanged_before_any_entry(
    sidecar,
    shared,
    tmp_path,
):
    sidecar.register("agent")
    shared.sync_model("agent", tmp_path / "out", version=1)
    again = shared.sync_model("agent", tmp_path / "out", version=1)
    assert not again.changed
    assert sidecar.sample(HANDOFFS) == 1


def entry_of(tmp_path: Path, data: bytes) -> tuple[Path, pb.ModelFile]:
    """A cache entry holding one file `data`, and its manifest line."""
    source = tmp_path / "entry" / "files"
    source.mkdir(parents=True)
    (source / "weights.bin").write_bytes(data)
    line = pb.ModelFile(
        path="weights.bin", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    return source, line


def test_a_file_of_the_entry_that_is_a_symlink_is_not_copied(tmp_path):
    source, line = entry_of(tmp_path, b"weights")
    # Even to the very bytes the manifest names: a symlink may as well name /dev/zero.
    twin = tmp_path / "twin"
    twin.write_bytes(b"weights")
    (source / "weights.bin").unlink()
    (source / "weights.bin").symlink_to(twin)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(CacheEntryUnreadableError) as err:
        copy_entry([line], source, staging, None)
    assert "not a regular file" in str(err.value)
    assert list(staging.iterdir()) == []


def test_a_file_longer_than_its_manifest_says_is_copied_one_byte_past_its_size(tmp_path):
    source, line = entry_of(tmp_path, b"weights")
    # 64 MiB more, sparse: it takes no room to hold, only to copy.
    with (source / "weights.bin").open("r+b") as grown:
        grown.truncate(64 * 1024 * 1024)
    staging = tmp_path / "staging"
    staging.mkdir()
    copied: list[int] = []
    real_copy = shared_cache.copy_at_most

    def counting(original: BinaryIO, copy: BinaryIO, limit: int) -> int:
        copied.append(real_copy(original, copy, limit))
        return copied[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shared_cache, "copy_at_most", counting)
        with pytest.raises(CacheEntryUnreadableError) as err:
            copy_entry([line], source, staging, None)
    assert "longer than the manifest's 7 bytes" in str(err.value)
    assert copied == [8]
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize("path", ["../entry/files", "/etc", "entry/../../x", "", "a//b"])
def test_an_entry_path_that_could_leave_the_cache_is_refused(tmp_path, path):
    with pytest.raises(DataLossError) as err:
        entry_root(tmp_path, path)
    assert "unsafe cache entry" in err.value.message


def test_the_setting_reaches_the_registry_client(monkeypatch, tmp_path):
    from mlflow_sidecar.client import load_env

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_MODEL_CACHE_DIR", str(tmp_path))
    container = ClientContainer()
    load_env(container)
    try:
        registry = container.model_registry()
        assert isinstance(registry, GrpcModelRegistry)
        assert registry.shared_cache_dir == tmp_path
    finally:
        container.shutdown_resources()
