"""Hidden siblings of downloads that died (kill -9) are removed by the next download into
the same directory; a live download's siblings never are."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlflow_sidecar.client import directory_swap, downloads
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

CHUNK = 1024
DATA = bytes(range(256)) * 16  # four chunks

# A child that downloads into PARENT/model (or PARENT/a.bin) from a stream that stops
# after its first chunk, says so, and waits there until it is killed.
CHILD = """
import hashlib, sys, threading
from pathlib import Path
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

kind, parent = sys.argv[1], Path(sys.argv[2])
data = bytes(range(256)) * 16

class Call:
    def __init__(self, messages):
        self.messages = iter(messages)
    def __iter__(self):
        return self
    def __next__(self):
        message = next(self.messages, None)
        if message is None:
            print("receiving", flush=True)
            threading.Event().wait()
        return message
    def cancel(self):
        pass

class Stub:
    def DownloadModel(self, request, timeout=None):
        entry = reg_pb.ModelFile(path="w.bin", size_bytes=len(data),
                                 sha256=hashlib.sha256(data).hexdigest())
        manifest = reg_pb.ModelManifest(
            model_version=reg_pb.ModelVersion(name="m", version=1), files=[entry])
        return Call([reg_pb.DownloadModelResponse(manifest=manifest),
                     reg_pb.DownloadModelResponse(
                         chunk=reg_pb.ModelChunk(file_index=0, data=data[:1024]))])
    def DownloadArtifact(self, request, timeout=None):
        header = pb.DownloadArtifactHeader(artifact_path="a.bin", size_bytes=len(data))
        return Call([pb.DownloadArtifactResponse(header=header),
                     pb.DownloadArtifactResponse(chunk=data[:1024])])

if kind == "model":
    GrpcModelRegistry(Stub(), chunk_bytes=1024).download_model("m", parent / "model", version=1)
else:
    GrpcExperimentTracking(Stub(), chunk_bytes=1024).download_artifact("r", "a.bin", parent)
"""


class FakeCall:
    def __init__(self, messages: list) -> None:
        self._messages = iter(messages)

    def __iter__(self) -> Iterator:
        return self._messages

    def __next__(self):
        return next(self._messages)

    def cancel(self) -> None:
        pass


class FakeStub:
    def DownloadModel(self, request, timeout=None) -> FakeCall:
        entry = reg_pb.ModelFile(
            path="w.bin", size_bytes=len(DATA), sha256=hashlib.sha256(DATA).hexdigest()
        )
        manifest = reg_pb.ModelManifest(
            model_version=reg_pb.ModelVersion(name="m", version=1), files=[entry]
        )
        return FakeCall(
            [
                reg_pb.DownloadModelResponse(manifest=manifest),
                reg_pb.DownloadModelResponse(chunk=reg_pb.ModelChunk(file_index=0, data=DATA)),
            ]
        )

    def DownloadArtifact(self, request, timeout=None) -> FakeCall:
        header = pb.DownloadArtifactHeader(
            artifact_path=request.artifact_path,
            size_bytes=len(DATA),
            sha256=hashlib.sha256(DATA).hexdigest(),
        )
        return FakeCall(
            [pb.DownloadArtifactResponse(header=header), pb.DownloadArtifactResponse(chunk=DATA)]
        )


@pytest.fixture(autouse=True)
def fresh_sweeps() -> Iterator[None]:
    downloads.forget_sweeps()
    yield
    downloads.forget_sweeps()


def download_model(parent: Path) -> Path:
    registry = GrpcModelRegistry(FakeStub(), chunk_bytes=CHUNK)  # type: ignore[arg-type]
    return registry.download_model("m", parent / "model", version=1)


def download_artifact(parent: Path, name: str) -> Path:
    tracking = GrpcExperimentTracking(FakeStub(), chunk_bytes=CHUNK)  # type: ignore[arg-type]
    return tracking.download_artifact("r", name, parent)


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".sidecar-"))


def age(path: Path) -> None:
    """Make `path` look as old as a sibling left by a download that died a while ago."""
    then = time.time() - 2 * downloads.STALE_AFTER_S
    os.utime(path, (then, then))


def start_child(kind: str, parent: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "receiving\n"
    return child


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


@pytest.mark.parametrize("kind", ["model", "artifact"])
def test_the_sibling_of_a_killed_download_is_removed_by_the_next_one(tmp_path, kind):
    kill(start_child(kind, tmp_path))
    (left,) = siblings(tmp_path)
    assert left.endswith(".download" if kind == "model" else ".partial")
    age(tmp_path / left)

    if kind == "model":
        assert (download_model(tmp_path) / "w.bin").read_bytes() == DATA
    else:
        assert download_artifact(tmp_path, "other.bin").read_bytes() == DATA
    assert siblings(tmp_path) == []


@pytest.mark.parametrize("kind", ["model", "artifact"])
def test_a_live_download_keeps_its_sibling_however_old(tmp_path, kind):
    child = start_child(kind, tmp_path)
    try:
        (live,) = siblings(tmp_path)
        age(tmp_path / live)
        if kind == "model":
            download_model(tmp_path)
        else:
            download_artifact(tmp_path, "other.bin")
        assert siblings(tmp_path) == [live]
    finally:
        kill(child)


def test_a_sibling_younger_than_the_threshold_is_left_for_its_owner_to_lock(tmp_path):
    # Between a sibling's creation and its lock, only its age tells it is alive.
    young = tmp_path / f".sidecar-{uuid.uuid4().hex}.download"
    young.mkdir()
    download_model(tmp_path)
    assert siblings(tmp_path) == [young.name]


def test_a_sweep_removes_only_names_a_download_makes(tmp_path):
    others = [".sidecar-notours.download", "sidecar-" + uuid.uuid4().hex + ".partial", ".x.old"]
    for name in others:
        (tmp_path / name).mkdir()
        age(tmp_path / name)
    download_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "model"])


def test_the_copy_a_killed_swap_moved_aside_is_never_swept(tmp_path):
    # Where the swap is two renames, a process killed between them leaves the model only
    # here: removing it would lose the destination's one copy.
    aside = tmp_path / f".sidecar-{uuid.uuid4().hex}.old"
    aside.mkdir()
    (aside / "MLmodel").write_text("the copy a killed swap moved aside")
    age(aside)
    download_model(tmp_path)
    assert (aside / "MLmodel").read_text() == "the copy a killed swap moved aside"


def test_the_copy_moved_aside_by_a_swap_is_never_swept_while_it_may_come_back(
    tmp_path, monkeypatch
):
    old, new = tmp_path / "model", tmp_path / "new"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir()
        (directory / "MLmodel").write_text(text)
    seen: list[list[str]] = []

    def rename_then_sweep(source: Path, target: Path) -> None:
        os.rename(source, target)
        for sibling in siblings(tmp_path):
            age(tmp_path / sibling)
        downloads.forget_sweeps()
        downloads.sweep_stale(tmp_path)  # another process's download, in the middle
        seen.append(siblings(tmp_path))

    monkeypatch.setattr(directory_swap, "_rename", rename_then_sweep)
    directory_swap.replace_directory(new, old, atomic=False)
    assert (old / "MLmodel").read_text() == "new"
    assert len(seen[0]) == 1 and seen[0][0].endswith(".old"), seen
    assert siblings(tmp_path) == []
