"""The model cache behind DownloadModel, against the in-memory MlflowPort: hits without
MLflow, verification and refetch, eviction, single flight, recreated models, digests."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from mlflow_sidecar.core.model_digest import directory_digest, model_digest
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.config import ConfigError, load_config
from mlflow_sidecar.server.model_cache import CacheDisk, ModelCache
from mlflow_sidecar.server.model_cache.cache import FILES_DIR, MANIFEST_NAME
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.servicers.streams import model_messages
from mlflow_sidecar.server.services.model_downloads import ModelDownload, ModelDownloads
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.staging import Staging
from tests.fakes.mlflow_port import FakeMlflow

FETCH = "download_model_version"
MODEL = {"MLmodel": b"flavors: {}\n", "data/weights.bin": bytes(range(256)) * 40, "empty": b""}
MODEL_BYTES = sum(map(len, MODEL.values()))


class FullDisk(CacheDisk):
    """A disk that has no room for a manifest: the cache's last write before an entry
    is in place."""

    def write_manifest(self, path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


class Sidecar:
    """The download use case over a FakeMlflow, with a cache of `max_bytes`."""

    def __init__(
        self, tmp_path: Path, max_bytes: int = 10 * MODEL_BYTES, disk: CacheDisk | None = None
    ) -> None:
        self.tmp_path = tmp_path
        self.fake = FakeMlflow()
        self.fake.add_run("run1")
        self._ids = itertools.count(1)
        self.metrics = SidecarMetrics()
        self.staging = Staging(load_config(data_dir=tmp_path), self.metrics)
        self.start(max_bytes, disk)

    def start(self, max_bytes: int, disk: CacheDisk | None = None, scope: str = "") -> None:
        """(Re)start over the same data dir, as a restarted sidecar would."""
        self.cache = ModelCache(
            self.tmp_path / "models", max_bytes, metrics=self.metrics, disk=disk, chunk_bytes=4096
        )
        self.downloads = ModelDownloads(
            RegistryService(self.fake, self.staging),
            self.fake,
            self.cache,
            self.staging,
            scope=scope,
            metrics=self.metrics,
        )

    def register(self, name: str, files: dict[str, bytes] = MODEL) -> ModelVersion:
        """A new version of `name` (the model created if needed) holding `files`."""
        if name not in self.fake.models:
            self.fake.create_registered_model(name, description="", tags={}, request_id=name)
        prefix = f"m{next(self._ids)}"
        for path, data in files.items():
            self.fake.runs["run1"].files[f"{prefix}/{path}"] = data
        return self.fake.create_model_version(
            name,
            source=f"runs:/run1/{prefix}",
            run_id="run1",
            description="",
            tags={},
            request_id=prefix,
        )

    def download(self, name: str, version: int = 1, if_none_match: str = "") -> dict[str, bytes]:
        """Open a download and read its files as the servicer streams them."""
        opened = self.downloads.open(name, version=version, if_none_match=if_none_match)
        return read_all(opened)

    def fetches(self) -> int:
        return self.fake.calls[FETCH]

    def sample(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value

    def entries(self) -> list[Path]:
        return sorted(self.cache.root.glob("entry-*"))


def read_all(opened: ModelDownload) -> dict[str, bytes]:
    assert opened.lease is not None
    try:
        return {
            f.path: opened.lease.root.joinpath(*f.path.split("/")).read_bytes()
            for f in opened.lease.manifest.files
        }
    finally:
        opened.lease.release()


def digest_of(files: dict[str, bytes]) -> str:
    return model_digest((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())


@pytest.fixture()
def sidecar(tmp_path: Path) -> Sidecar:
    return Sidecar(tmp_path)


# -- hits ------------------------------------------------------------------------------------


def test_a_second_download_comes_from_the_cache_without_mlflow(sidecar):
    sidecar.register("agent")
    assert sidecar.download("agent") == MODEL
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 1
    assert sidecar.sample("mlflow_sidecar_model_cache_misses_total") == 1
    assert sidecar.sample("mlflow_sidecar_model_cache_hits_total") == 1
    assert sidecar.sample("mlflow_sidecar_model_cache_bytes") == MODEL_BYTES
    assert sidecar.staging.in_flight() == []


def test_every_manifest_carries_the_digest_of_its_files(sidecar):
    sidecar.register("agent")
    opened = sidecar.downloads.open("agent", version=1)
    assert opened.lease is not None
    assert opened.digest == opened.lease.manifest.digest == digest_of(MODEL)
    assert directory_digest(opened.lease.root) == digest_of(MODEL)
    opened.lease.release()


def test_an_alias_resolves_to_the_cached_version(sidecar):
    version = sidecar.register("agent")
    sidecar.fake.set_model_alias("agent", "champion", version.version)
    sidecar.download("agent")
    opened = sidecar.downloads.open("agent", alias="champion")
    assert read_all(opened) == MODEL
    assert sidecar.fetches() == 1


def test_the_cache_survives_a_restart(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    sidecar.start(10 * MODEL_BYTES)
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 1


def test_the_cache_off_fetches_every_time_and_still_sends_the_digest(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=0)
    sidecar.register("agent")
    opened = sidecar.downloads.open("agent", version=1)
    assert opened.digest == digest_of(MODEL)
    assert read_all(opened) == MODEL
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2
    assert sidecar.entries() == []
    assert sidecar.staging.in_flight() == []


def test_turning_the_cache_off_removes_its_entries(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    sidecar.start(0)
    assert not sidecar.cache.root.exists()


# -- verification -------------------------------------------------------------------------


def flip_a_byte(entry: Path) -> None:
    path = entry / FILES_DIR / "data" / "weights.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(entry: Path) -> None:
    path = entry / FILES_DIR / "data" / "weights.bin"
    path.write_bytes(path.read_bytes()[:-1])


def remove_a_file(entry: Path) -> None:
    (entry / FILES_DIR / "MLmodel").unlink()


def remove_the_manifest(entry: Path) -> None:
    (entry / MANIFEST_NAME).unlink()


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, remove_a_file, remove_the_manifest])
def test_a_damaged_entry_is_detected_and_fetched_again(sidecar, damage):
    sidecar.register("agent")
    sidecar.download("agent")
    (entry,) = sidecar.entries()
    damage(entry)
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2
    assert sidecar.sample("mlflow_sidecar_model_cache_corrupt_entries_total") == 1
    (fresh,) = sidecar.entries()
    assert fresh != entry
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2


def zero_forever(entry: Path) -> None:
    """The empty file swapped for a symlink to /dev/zero: its size reads 0, its bytes
    never end."""
    path = entry / FILES_DIR / "empty"
    path.unlink()
    path.symlink_to("/dev/zero")


def a_fifo(entry: Path) -> None:
    """The empty file swapped for a FIFO: opening it waits for a writer."""
    path = entry / FILES_DIR / "empty"
    path.unlink()
    os.mkfifo(path)


def a_symlink_to_the_same_bytes(entry: Path) -> None:
    path = entry / FILES_DIR / "MLmodel"
    twin = entry.parent / "twin"
    twin.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(twin)


@pytest.mark.parametrize("damage", [zero_forever, a_fifo, a_symlink_to_the_same_bytes])
@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "sizes-only"])
def test_an_entry_file_that_is_not_a_regular_file_is_damage(sidecar, damage, hashed):
    sidecar.register("agent")
    sidecar.download("agent")
    (entry,) = sidecar.entries()
    damage(entry)
    outcome: list[object] = []

    def download() -> None:
        opened = sidecar.downloads.open("agent", version=1, accept_cache_entry=not hashed)
        assert opened.lease is not None
        try:
            # Read as the manifest bounds them: /dev/zero served must not fill the memory.
            outcome.append(
                {
                    f.path: read_at_most(opened.lease.root / f.path, f.size_bytes + 1)
                    for f in opened.lease.manifest.files
                }
            )
        finally:
            opened.lease.release()

    # A download that reads the damage forever is left behind, not waited for.
    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    worker.join(30)
    assert outcome == [MODEL]
    assert sidecar.fetches() == 2
    assert sidecar.sample("mlflow_sidecar_model_cache_corrupt_entries_total") == 1
    assert sidecar.entries() != [entry]


def read_at_most(path: Path, limit: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(limit)


def test_a_file_that_grew_after_its_check_is_sent_no_further_than_its_size(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    opened = sidecar.downloads.open("agent", version=1)
    assert opened.lease is not None
    (entry,) = sidecar.entries()
    with (entry / FILES_DIR / "data" / "weights.bin").open("ab") as grown:
        grown.write(b"x" * 100_000)
    sent = b"".join(
        message.chunk.data
        for message in model_messages(opened.version, opened.lease, sidecar.staging)
    )
    opened.lease.release()
    assert len(sent) == MODEL_BYTES


def test_an_entry_damaged_while_the_sidecar_was_down_is_fetched_again(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    flip_a_byte(sidecar.entries()[0])
    sidecar.start(10 * MODEL_BYTES)
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2


def test_an_unfinished_entry_is_removed_at_start(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    (entry,) = sidecar.entries()
    # What a crash leaves: an entry being assembled, and one without its manifest.
    shutil.copytree(entry, sidecar.cache.root / ".incoming-0123")
    (entry / MANIFEST_NAME).unlink()
    sidecar.start(10 * MODEL_BYTES)
    assert list(sidecar.cache.root.iterdir()) == []
    assert sidecar.cache.held_bytes == 0


def test_a_cache_directory_removed_while_running_is_created_again(sidecar):
    sidecar.register("agent")
    sidecar.download("agent")
    shutil.rmtree(sidecar.cache.root)
    for _ in range(3):
        assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2
    assert len(sidecar.entries()) == 1
    assert sidecar.cache.held_bytes == MODEL_BYTES
    assert sidecar.sample("mlflow_sidecar_model_cache_misses_total") == 2


# -- the size bound and eviction ------------------------------------------------------------


def test_the_least_recently_used_version_is_evicted_to_stay_within_the_bound(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=2 * MODEL_BYTES)
    for name in ("a", "b", "c"):
        sidecar.register(name)
    sidecar.download("a")
    sidecar.download("b")
    sidecar.download("a")  # b is now the least recently used
    sidecar.download("c")
    assert sidecar.sample("mlflow_sidecar_model_cache_evictions_total") == 1
    assert sidecar.cache.held_bytes == 2 * MODEL_BYTES <= sidecar.cache.max_bytes
    fetched = sidecar.fetches()
    sidecar.download("a")
    sidecar.download("c")
    assert sidecar.fetches() == fetched
    sidecar.download("b")
    assert sidecar.fetches() == fetched + 1


def test_the_order_of_use_survives_a_restart(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=2 * MODEL_BYTES)
    for name in ("a", "b", "c"):
        sidecar.register(name)
    sidecar.download("a")
    sidecar.download("b")
    # The manifests' mtimes carry the order over a restart: "a" was used last.
    manifests = [entry / MANIFEST_NAME for entry in sidecar.entries()]
    by_name = {json.loads(path.read_bytes())["name"]: path for path in manifests}
    os.utime(by_name["b"], (1_000, 1_000))
    os.utime(by_name["a"], (2_000, 2_000))
    sidecar.start(2 * MODEL_BYTES)
    sidecar.download("c")
    fetched = sidecar.fetches()
    sidecar.download("a")
    assert sidecar.fetches() == fetched
    sidecar.download("b")
    assert sidecar.fetches() == fetched + 1


def test_a_lower_bound_at_start_evicts_down_to_it(sidecar):
    for name in ("a", "b"):
        sidecar.register(name)
        sidecar.download(name)
    sidecar.start(MODEL_BYTES)
    assert sidecar.cache.held_bytes == MODEL_BYTES
    assert len(sidecar.entries()) == 1


def test_an_entry_being_sent_is_not_evicted(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=MODEL_BYTES)
    sidecar.register("a")
    sidecar.register("b")
    sending = sidecar.downloads.open("a", version=1)
    # b does not fit beside a, and a is being sent: b goes out uncached.
    assert sidecar.download("b") == MODEL
    assert read_all(sending) == MODEL
    assert sidecar.sample("mlflow_sidecar_model_cache_evictions_total") == 0
    sidecar.download("a")
    assert sidecar.fetches() == 2
    assert sidecar.staging.in_flight() == []


def test_a_version_larger_than_the_bound_is_sent_without_caching(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=MODEL_BYTES - 1)
    sidecar.register("agent")
    assert sidecar.download("agent") == MODEL
    assert sidecar.entries() == []
    assert sidecar.cache.held_bytes == 0
    assert sidecar.staging.in_flight() == []


@pytest.mark.parametrize("max_bytes", [MODEL_BYTES - 1, 0])
def test_a_client_holding_a_version_the_cache_does_not_keep_is_not_fetched_for_again(
    tmp_path, max_bytes
):
    # An inference service syncing a model too large to cache (or with the cache off)
    # must not make the sidecar fetch the whole model from MLflow at every sync to find
    # that nothing changed.
    sidecar = Sidecar(tmp_path, max_bytes=max_bytes)
    sidecar.register("agent")
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 1
    unchanged = sidecar.downloads.open("agent", version=1, if_none_match=digest_of(MODEL))
    assert unchanged.lease is None and unchanged.digest == digest_of(MODEL)
    assert sidecar.fetches() == 1
    # Without the client's digest, the files are fetched and sent again.
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2
    assert sidecar.entries() == [] and sidecar.staging.in_flight() == []


# -- concurrency ---------------------------------------------------------------------------


def test_concurrent_downloads_of_one_version_fetch_it_once(sidecar):
    sidecar.register("agent")
    threads = 8
    barrier = threading.Barrier(threads)
    # The fetch waits until every other download is waiting for it.
    sidecar.fake.on_call(FETCH, lambda: wait_for_followers(sidecar, threads))
    results: list[dict[str, bytes]] = []

    def download() -> None:
        barrier.wait()
        results.append(sidecar.download("agent"))

    workers = [threading.Thread(target=download) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [MODEL] * threads
    assert sidecar.fetches() == 1


def wait_for_followers(sidecar: Sidecar, downloads: int) -> None:
    """Hold the fetch until the other downloads are waiting for it (or, should they
    never wait, long enough for the test to fail on the count of fetches, not hang)."""
    flights = sidecar.downloads._flights
    for _ in range(10_000):
        with flights._lock:
            waiting = sum(f.followers for f in flights._flights.values())
        if waiting == downloads - 1:
            return
        threading.Event().wait(0.001)


def test_concurrent_downloads_share_one_fetch_with_the_cache_off(tmp_path):
    sidecar = Sidecar(tmp_path, max_bytes=0)
    sidecar.register("agent")
    sidecar.fake.on_call(FETCH, lambda: wait_for_followers(sidecar, 4))
    results: list[dict[str, bytes]] = []
    workers = [
        threading.Thread(target=lambda: results.append(sidecar.download("agent"))) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == [MODEL] * 4
    assert sidecar.fetches() == 1
    assert sidecar.staging.in_flight() == []


def test_a_failed_fetch_fails_every_download_waiting_for_it(sidecar):
    sidecar.register("agent")
    sidecar.fake.fail(FETCH, NotFoundError("gone"))
    with pytest.raises(NotFoundError):
        sidecar.download("agent")
    assert sidecar.entries() == []
    assert sidecar.staging.in_flight() == []
    assert sidecar.download("agent") == MODEL


def leader_out_of_time_once_followed(sidecar: Sidecar) -> None:
    """The first fetch waits for a second download to wait for it, then fails as the
    gateway does when MLflow stays unavailable past the deadline of the call fetching."""
    fetches = itertools.count()

    def hook() -> None:
        if next(fetches) == 0:
            wait_for_followers(sidecar, 2)

    sidecar.fake.on_call(FETCH, hook)
    sidecar.fake.fail(
        FETCH, DeadlineExceededError("deadline exceeded while MLflow was unavailable: down")
    )


def download_within(sidecar: Sidecar, deadline_s: float, outcome: list[object]) -> None:
    """A download by a call whose deadline is `deadline_s` away; its files or error."""
    with call_deadline.deadline_scope(deadline_s):
        try:
            outcome.append(sidecar.download("agent"))
        except DeadlineExceededError as exc:
            outcome.append(exc)


def test_a_download_waiting_for_a_fetch_that_ran_out_of_its_callers_deadline_fetches_again(
    sidecar,
):
    sidecar.register("agent")
    leader_out_of_time_once_followed(sidecar)
    short: list[object] = []
    long: list[object] = []
    first = threading.Thread(target=download_within, args=(sidecar, 4, short))
    first.start()
    wait_for_flight(sidecar)
    second = threading.Thread(target=download_within, args=(sidecar, 120, long))
    second.start()
    first.join()
    second.join()
    assert len(short) == 1 and isinstance(short[0], DeadlineExceededError)
    assert long == [MODEL]
    assert sidecar.fetches() == 2
    assert sidecar.staging.in_flight() == []


def test_a_download_whose_own_deadline_passed_too_gets_the_deadline_error(sidecar):
    sidecar.register("agent")
    leader_out_of_time_once_followed(sidecar)
    short: list[object] = []
    late: list[object] = []
    first = threading.Thread(target=download_within, args=(sidecar, 4, short))
    first.start()
    wait_for_flight(sidecar)
    second = threading.Thread(target=download_within, args=(sidecar, 0, late))
    second.start()
    first.join()
    second.join()
    assert len(late) == 1 and isinstance(late[0], DeadlineExceededError)
    assert sidecar.fetches() == 1


@pytest.mark.parametrize("max_bytes", [10 * MODEL_BYTES, 0], ids=["cached", "cache-off"])
def test_a_download_waiting_for_a_hung_fetch_ends_at_its_own_deadline(tmp_path, max_bytes):
    # MLflow hangs mid-transfer for the first download (its deadline far away): a second
    # one waits no longer than its own deadline, and nothing is left held for it.
    sidecar = Sidecar(tmp_path, max_bytes=max_bytes)
    sidecar.register("agent")
    waiter_done = threading.Event()
    sidecar.fake.on_call(FETCH, lambda: waiter_done.wait(60))
    long: list[object] = []
    short: list[object] = []
    first = threading.Thread(target=download_within, args=(sidecar, 120, long))
    first.start()
    wait_for_flight(sidecar)
    download_within(sidecar, 0.2, short)
    waiter_done.set()
    first.join()
    assert len(short) == 1 and isinstance(short[0], DeadlineExceededError)
    assert "still being fetched" in str(short[0])
    assert long == [MODEL]
    assert sidecar.fetches() == 1
    assert sidecar.staging.in_flight() == []
    # Every lease given back: the cached entry (when cached) is pinned by no one.
    pins = [entry.pins for entry in sidecar.cache._entries.values()]
    assert pins == ([0] if max_bytes else [])


def wait_for_flight(sidecar: Sidecar) -> None:
    """Return once a fetch is in progress, so that the next download waits for it."""
    for _ in range(10_000):
        if sidecar.fake.in_flight[FETCH]:
            return
        threading.Event().wait(0.001)
    raise AssertionError("the first download never started its fetch")


# -- a recreated model ---------------------------------------------------------------------


def test_a_recreated_model_with_the_same_version_number_is_not_served_stale(sidecar):
    sidecar.register("agent", {"weights": b"old"})
    assert sidecar.download("agent") == {"weights": b"old"}
    sidecar.fake.delete_registered_model("agent")
    recreated = sidecar.register("agent", {"weights": b"new"})
    assert recreated.version == 1
    # Created later than the first: MLflow's clock moved on (the fake's may not have).
    stored = sidecar.fake.versions[("agent", 1)]
    stored.version = replace(stored.version, creation_time_ms=stored.version.creation_time_ms + 1)
    assert sidecar.download("agent") == {"weights": b"new"}
    assert sidecar.fetches() == 2


# -- a version made elsewhere that cannot be sent --------------------------------------------


def test_a_stored_path_no_download_can_carry_is_a_failed_precondition_naming_it(sidecar):
    deep = "/".join(["d" * 120] * 9) + "/weights.bin"  # 1100 bytes, every segment fine
    sidecar.register("agent", {"MLmodel": b"flavors: {}\n", deep: b"W"})
    with pytest.raises(FailedPreconditionError) as err:
        sidecar.download("agent")
    assert "agent version 1" in err.value.message
    assert "1100 bytes" in err.value.message and repr("d" * 77 + "...") in err.value.message
    assert err.value.field == ""


# -- another registry or artifact policy -----------------------------------------------------


def test_a_version_cached_under_another_registry_or_policy_is_fetched_again(sidecar):
    sidecar.start(10 * MODEL_BYTES, scope="policy-a")
    sidecar.register("agent")
    sidecar.download("agent")
    sidecar.start(10 * MODEL_BYTES, scope="policy-b")
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2


def test_the_scope_follows_the_registry_and_the_artifact_policy(tmp_path):
    base = load_config(data_dir=tmp_path)
    assert load_config(data_dir=tmp_path).model_cache_scope == base.model_cache_scope
    for changed in (
        load_config(data_dir=tmp_path, mlflow={"registry_uri": "http://elsewhere:5000"}),
        load_config(data_dir=tmp_path, artifacts={"allowed_roots": [str(tmp_path / "x")]}),
        load_config(data_dir=tmp_path, artifacts={"allowed_uris": ["s3://bucket/team"]}),
    ):
        assert changed.model_cache_scope != base.model_cache_scope


# -- if_none_match -------------------------------------------------------------------------


def test_a_matching_digest_is_answered_unchanged_without_files(sidecar):
    sidecar.register("agent")
    for _ in range(2):  # uncached, then cached
        opened = sidecar.downloads.open("agent", version=1, if_none_match=digest_of(MODEL))
        assert opened.lease is None
        assert opened.digest == digest_of(MODEL)
        assert opened.version.name == "agent"
    assert sidecar.fetches() == 1
    assert sidecar.staging.in_flight() == []


@pytest.mark.parametrize("matching", [True, False], ids=["unchanged", "other-digest"])
def test_a_cached_download_with_a_digest_counts_one_hit(sidecar, matching):
    sidecar.register("agent")
    sidecar.download("agent")
    known = digest_of(MODEL) if matching else digest_of({"x": b"y"})
    opened = sidecar.downloads.open("agent", version=1, if_none_match=known)
    if opened.lease is not None:
        opened.lease.release()
    assert sidecar.sample("mlflow_sidecar_model_cache_hits_total") == 1
    assert sidecar.sample("mlflow_sidecar_model_cache_misses_total") == 1


def test_a_digest_in_capitals_matches_too(sidecar):
    sidecar.register("agent")
    opened = sidecar.downloads.open("agent", version=1, if_none_match=digest_of(MODEL).upper())
    assert opened.lease is None


def test_another_digest_gets_the_files(sidecar):
    sidecar.register("agent")
    opened = sidecar.downloads.open("agent", version=1, if_none_match=digest_of({"x": b"y"}))
    assert read_all(opened) == MODEL


@pytest.mark.parametrize("value", ["a" * 65, "xyz", "ab cd", digest_of(MODEL) + "0"])
def test_a_malformed_if_none_match_is_refused_naming_the_field(sidecar, value):
    sidecar.register("agent")
    with pytest.raises(InvalidArgumentError) as err:
        sidecar.downloads.open("agent", version=1, if_none_match=value)
    assert err.value.field == "if_none_match"
    assert sidecar.fetches() == 0


def test_a_download_needs_a_version_or_an_alias(sidecar):
    with pytest.raises(InvalidArgumentError) as err:
        sidecar.downloads.open("agent")
    assert err.value.field == "selector"


# -- a full disk ---------------------------------------------------------------------------


def test_a_full_disk_while_caching_still_serves_the_download(tmp_path, caplog):
    sidecar = Sidecar(tmp_path, disk=FullDisk())
    sidecar.register("agent")
    assert sidecar.download("agent") == MODEL
    assert "the disk is full" in caplog.text
    assert list(sidecar.cache.root.iterdir()) == []
    assert sidecar.cache.held_bytes == 0
    assert sidecar.staging.in_flight() == []
    assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2


def test_a_cache_directory_that_cannot_be_made_at_start_sends_versions_uncached(tmp_path, caplog):
    (tmp_path / "models").write_bytes(b"not a directory")
    sidecar = Sidecar(tmp_path)
    assert f"the model cache directory {tmp_path / 'models'} cannot be used" in caplog.text
    sidecar.register("agent")
    for _ in range(2):
        assert sidecar.download("agent") == MODEL
    assert sidecar.fetches() == 2
    assert (tmp_path / "models").read_bytes() == b"not a directory"
    assert sidecar.staging.in_flight() == []


# -- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "ten", "1.5"])
def test_a_bad_max_bytes_is_refused_naming_the_key(monkeypatch, value):
    monkeypatch.setenv("MLFLOW_SIDECAR__MODEL_CACHE__MAX_BYTES", value)
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert "invalid config key model_cache.max_bytes (MLFLOW_SIDECAR__MODEL_CACHE__MAX_BYTES)" in (
        message
    )
    assert "\n" not in message


def test_max_bytes_defaults_to_ten_gib_and_zero_is_allowed(monkeypatch):
    assert load_config().model_cache.max_bytes == 10 * 1024**3
    monkeypatch.setenv("MLFLOW_SIDECAR__MODEL_CACHE__MAX_BYTES", "0")
    assert load_config().model_cache.max_bytes == 0
