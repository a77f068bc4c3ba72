"""One writer per artifact path: a store of a path waits for the store of that path under
way, within its own deadline; other paths and owners never wait; a writer whose deadline
passes first stores nothing. Every store of an artifact file goes through it: a run's
files (UploadArtifact, UploadModel) and a logged model's. The removal of an abandoned
upload's empty directories spares those a write is under way in."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import cast

import pytest

from mlflow_sidecar.core.errors import DeadlineExceededError
from mlflow_sidecar.server.artifact_writers import (
    ArtifactWriters,
    logged_model_files,
    run_files,
)
from mlflow_sidecar.server.call_deadline import deadline_scope
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.keyed_locks import KeyedLocks, LockWaitExpiredError
from mlflow_sidecar.server.mlflow_gateway.port import LoggedModelsPort
from mlflow_sidecar.server.services.artifacts import store_file
from mlflow_sidecar.server.services.logged_models import ModelFileUpload
from mlflow_sidecar.server.staging import Staging
from tests.fakes.mlflow_port import FakeMlflow

WRITERS_LOG = "mlflow_sidecar.server.artifact_writers"
WAIT_S = 60.0
# A deadline that has passed by the time the path is asked for.
EXPIRED_S = 0.0


def test_a_writer_of_a_path_waits_for_the_store_under_way(caplog: pytest.LogCaptureFixture):
    writers = ArtifactWriters()
    stored = threading.Event()

    def second() -> None:
        with deadline_scope(WAIT_S), writers.writing(run_files("r1"), "ckpt/model.pt"):
            stored.set()

    with caplog.at_level(logging.INFO, logger=WRITERS_LOG):
        with writers.writing(run_files("r1"), "ckpt/model.pt"):
            thread = threading.Thread(target=second)
            thread.start()
            give_up = time.monotonic() + WAIT_S
            while not any("waits" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < give_up, "the second writer never asked for the path"
                time.sleep(0.05)
            assert not stored.is_set()
        thread.join(WAIT_S)
    assert stored.is_set()
    assert len(writers) == 0


def test_other_paths_and_owners_never_wait():
    writers = ArtifactWriters()
    # With no time left, a writer that had to wait would fail at once.
    with writers.writing(run_files("r1"), "ckpt/model.pt"), deadline_scope(EXPIRED_S):
        with writers.writing(run_files("r1"), "ckpt/other.pt"):
            pass
        with writers.writing(run_files("r2"), "ckpt/model.pt"):
            pass
        with writers.writing(logged_model_files("r1"), "ckpt/model.pt"):
            pass
    assert len(writers) == 0


def test_a_writer_whose_deadline_passes_first_stores_nothing():
    writers = ArtifactWriters()
    ran = False
    with (
        writers.writing(run_files("r1"), "m.bin"),
        deadline_scope(EXPIRED_S),
        pytest.raises(DeadlineExceededError) as err,
        writers.writing(run_files("r1"), "m.bin"),
    ):
        ran = True
    assert not ran
    assert "nothing of this upload was stored" in err.value.message
    # The path is free again for the next writer.
    with deadline_scope(EXPIRED_S), writers.writing(run_files("r1"), "m.bin"):
        ran = True
    assert ran
    assert len(writers) == 0


def test_a_keyed_lock_waited_for_too_long_is_given_up_and_forgotten():
    locks = KeyedLocks()
    waited: list[bool] = []
    with locks.hold("k"):
        with pytest.raises(LockWaitExpiredError), locks.hold("k", timeout=0.0):
            pytest.fail("the block ran without the lock")
        with locks.hold("other", timeout=0.0, on_wait=lambda: waited.append(True)):
            pass
    assert waited == []
    assert len(locks) == 0


def test_a_runs_file_is_stored_only_by_the_writer_of_its_path(tmp_path: Path):
    gateway = FakeMlflow()
    run_id = gateway.new_run()
    staging = Staging(load_config(data_dir=tmp_path / "data"))
    source = tmp_path / "model.pt"
    source.write_bytes(b"late")
    writers = ArtifactWriters()
    with (
        writers.writing(run_files(run_id), "ckpt/model.pt"),
        deadline_scope(EXPIRED_S),
        pytest.raises(DeadlineExceededError),
    ):
        store_file(gateway, staging, run_id, source, "ckpt/model.pt", writers=writers)
    assert gateway.files == {}
    store_file(gateway, staging, run_id, source, "ckpt/model.pt", writers=writers)
    assert gateway.files == {(run_id, "ckpt/model.pt"): b"late"}


class _RecordingModels:
    """Only what a logged model's file store calls."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str]] = []

    def log_artifact(self, model_id: str, local_file: Path, artifact_dir: str) -> None:
        self.stored.append((model_id, f"{artifact_dir}/{local_file.name}"))


def test_a_logged_models_file_is_stored_only_by_the_writer_of_its_path(tmp_path: Path):
    models = _RecordingModels()
    writers = ArtifactWriters()
    upload = ModelFileUpload(cast(LoggedModelsPort, models), writers, "m-1", "data/model.pt")
    staged = tmp_path / "model.pt"
    staged.write_bytes(b"weights")
    with (
        writers.writing(logged_model_files("m-1"), "data/model.pt"),
        deadline_scope(EXPIRED_S),
        pytest.raises(DeadlineExceededError),
    ):
        upload.store(staged)
    assert models.stored == []
    upload.store(staged)
    assert models.stored == [("m-1", "data/model.pt")]


def test_a_directory_with_a_write_under_way_below_it_is_not_cleared():
    writers = ArtifactWriters()
    owner = run_files("r1")
    with deadline_scope(WAIT_S), writers.under_way(owner, "shared/deep/kept.bin"):
        for directory in ("shared", "shared/deep"):
            with writers.clearing(owner, directory) as unused:
                assert not unused
        for elsewhere in ("share", "shared/deeper", "other"):
            with writers.clearing(owner, elsewhere) as unused:
                assert unused
        with writers.clearing(run_files("r2"), "shared") as unused:
            assert unused
    with (
        deadline_scope(WAIT_S),
        writers.writing(owner, "shared/stored.bin"),
        writers.clearing(owner, "shared") as unused,
    ):
        assert not unused
    with deadline_scope(WAIT_S), writers.clearing(owner, "shared") as unused:
        assert unused


def test_a_write_waits_for_a_directory_removal_of_its_owner_to_finish():
    # Else it could begin in the directory between the check that it is empty and its
    # removal, which would take the new write's file in progress with it.
    writers = ArtifactWriters()
    owner = run_files("r1")
    with (
        deadline_scope(WAIT_S),
        writers.clearing(owner, "shared"),
        deadline_scope(EXPIRED_S),
        pytest.raises(DeadlineExceededError),
        writers.under_way(owner, "shared/new.bin"),
    ):
        pass
    with deadline_scope(WAIT_S), writers.under_way(owner, "shared/new.bin"):
        pass
