"""The typed clients' side of streamed transfers, against fake stubs: what they send, and how
they verify what they receive before anything appears in the destination."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.client.grpc_tracking import GrpcExperimentTracking
from mlflow_sidecar.core.errors import DataLossError, InvalidArgumentError
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb

CHUNK = 64 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeCall:
    """A server-streaming call: iterates canned messages, remembers a cancel."""

    def __init__(self, messages: list) -> None:
        self._messages = iter(messages)
        self.cancelled = False

    def __iter__(self) -> FakeCall:
        return self

    def __next__(self):
        return next(self._messages)

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    """Answers downloads with canned messages and records what uploads send."""

    def __init__(self, messages: list | None = None) -> None:
        self.messages = messages or []
        self.sent: list = []
        self.calls: list[FakeCall] = []
        self.stored_sha256 = ""

    def _stream(self, request, timeout=None) -> FakeCall:
        call = FakeCall(self.messages)
        self.calls.append(call)
        return call

    DownloadArtifact = _stream
    DownloadModel = _stream

    def UploadArtifact(self, requests, timeout=None):
        self.sent = list(requests)
        header = self.sent[0].header
        trailer = self.sent[-1].trailer
        return pb.UploadArtifactResponse(
            artifact_path=header.artifact_path,
            size_bytes=header.size_bytes,
            sha256=self.stored_sha256 or header.sha256 or trailer.sha256,
        )

    def UploadModel(self, requests, timeout=None):
        self.sent = list(requests)
        return reg_pb.UploadModelResponse(model_version=reg_pb.ModelVersion(name="m", version=1))


def artifact_messages(data: bytes, *, size: int | None = None, digest: str | None = None):
    header = pb.DownloadArtifactHeader(
        artifact_path="a/b.bin",
        size_bytes=len(data) if size is None else size,
        sha256=sha(data) if digest is None else digest,
    )
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return [pb.DownloadArtifactResponse(header=header)] + [
        pb.DownloadArtifactResponse(chunk=c) for c in chunks
    ]


def trailed_messages(data: bytes, *, digest: str | None = None):
    """A download as the sidecar sends it: size in the header, sha256 in the trailer."""
    header = pb.DownloadArtifactHeader(artifact_path="a/b.bin", size_bytes=len(data))
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    trailer = pb.DownloadArtifactTrailer(sha256=sha(data) if digest is None else digest)
    return [
        pb.DownloadArtifactResponse(header=header),
        *(pb.DownloadArtifactResponse(chunk=c) for c in chunks),
        pb.DownloadArtifactResponse(trailer=trailer),
    ]


def tracking_with(messages) -> tuple[GrpcExperimentTracking, FakeStub]:
    stub = FakeStub(messages)
    return GrpcExperimentTracking(stub, chunk_bytes=CHUNK), stub  # type: ignore[arg-type]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_verified_download_lands_at_its_path(tmp_path):
    data = bytes(range(256)) * 1000
    tracking, _ = tracking_with(artifact_messages(data))
    seen = []
    path = tracking.download_artifact(
        "r", "a/b.bin", tmp_path, progress=lambda d, t: seen.append(d)
    )
    assert path == tmp_path / "a" / "b.bin"
    assert path.read_bytes() == data
    assert files_under(tmp_path) == ["a/b.bin"]
    assert seen[-1] == len(data)


def test_download_verified_by_its_trailer_lands_at_its_path(tmp_path):
    data = bytes(range(256)) * 1000
    tracking, _ = tracking_with(trailed_messages(data))
    path = tracking.download_artifact("r", "a/b.bin", tmp_path)
    assert path.read_bytes() == data
    assert files_under(tmp_path) == ["a/b.bin"]


@pytest.mark.parametrize(
    "messages",
    [
        trailed_messages(b"x" * 1000, digest=sha(b"y" * 1000)),  # trailer disagrees
        trailed_messages(b"x" * 1000)[:-1],  # no trailer, no header digest
        trailed_messages(b"x" * 1000, digest=""),  # empty trailer
        [*trailed_messages(b"x" * 1000), pb.DownloadArtifactResponse(chunk=b"x")],  # after it
        [*artifact_messages(b"x" * 1000), trailed_messages(b"x" * 1000, digest=sha(b"z"))[-1]],
        artifact_messages(b"x" * 1000, digest=sha(b"y" * 1000)),  # corrupted
        artifact_messages(b"x" * 1000, size=1001, digest=sha(b"x" * 1001)),  # cut short
        artifact_messages(b"x" * 1000, size=999, digest=sha(b"x" * 999)),  # too long
        artifact_messages(b"x" * 1000)[1:],  # no header
        [*artifact_messages(b"x"), *artifact_messages(b"x")],  # two headers
    ],
    ids=[
        "trailer sha256",
        "no digest",
        "empty trailer",
        "chunk after trailer",
        "trailer contradicts header",
        "sha256",
        "short",
        "long",
        "no header",
        "two headers",
    ],
)
def test_a_bad_download_is_data_loss_and_leaves_no_file(tmp_path, messages):
    tracking, stub = tracking_with(messages)
    with pytest.raises(DataLossError):
        tracking.download_artifact("r", "a/b.bin", tmp_path)
    assert files_under(tmp_path) == []
    assert stub.calls[0].cancelled


def test_download_refuses_an_unsafe_artifact_path(tmp_path):
    tracking, stub = tracking_with([])
    with pytest.raises(InvalidArgumentError):
        tracking.download_artifact("r", "../../etc/passwd", tmp_path)
    assert stub.calls == []


def test_upload_sends_header_then_chunks_then_the_digest_and_reports_progress(tmp_path):
    data = bytes(range(256)) * 700  # 179200 bytes: 2 full chunks and a partial one
    source = tmp_path / "local.bin"
    source.write_bytes(data)
    tracking, stub = tracking_with([])
    seen = []
    info = tracking.upload_artifact("r", source, "x/y.bin", progress=lambda d, t: seen.append(d))
    header = stub.sent[0].header
    # The file is read once: the digest is not known before the bytes go out.
    assert (header.run_id, header.artifact_path, header.size_bytes, header.sha256) == (
        "r",
        "x/y.bin",
        len(data),
        "",
    )
    assert stub.sent[-1].trailer.sha256 == sha(data)
    chunks = [m.chunk for m in stub.sent[1:-1]]
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, len(data) - 2 * CHUNK]
    assert b"".join(chunks) == data
    assert seen == [0, CHUNK, 2 * CHUNK, len(data)]
    assert info.sha256 == sha(data)


def test_upload_whose_stored_digest_differs_is_data_loss(tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(b"abc")
    tracking, stub = tracking_with([])
    stub.stored_sha256 = sha(b"abd")
    with pytest.raises(DataLossError, match="stored sha256"):
        tracking.upload_artifact("r", source, "x/y.bin")


def test_upload_refuses_what_is_not_a_file(tmp_path):
    tracking, stub = tracking_with([])
    with pytest.raises(InvalidArgumentError) as err:
        tracking.upload_artifact("r", tmp_path)
    assert err.value.field == "local_path"
    assert stub.sent == []


# -- models -------------------------------------------------------------------------------


def model_messages(files: dict[str, bytes], overrides: dict[int, tuple[str, object]] | None = None):
    entries = [reg_pb.ModelFile(path=p, size_bytes=len(d), sha256=sha(d)) for p, d in files.items()]
    for index, (field, value) in (overrides or {}).items():
        setattr(entries[index], field, value)
    messages = [
        reg_pb.DownloadModelResponse(
            manifest=reg_pb.ModelManifest(
                model_version=reg_pb.ModelVersion(name="m", version=1), files=entries
            )
        )
    ]
    for index, data in enumerate(files.values()):
        for start in range(0, len(data), CHUNK):
            chunk = reg_pb.ModelChunk(file_index=index, data=data[start : start + CHUNK])
            messages.append(reg_pb.DownloadModelResponse(chunk=chunk))
    return messages


def registry_with(messages) -> tuple[GrpcModelRegistry, FakeStub]:
    stub = FakeStub(messages)
    return GrpcModelRegistry(stub, chunk_bytes=CHUNK), stub  # type: ignore[arg-type]


MODEL = {
    "0_empty_first": b"",
    "MLmodel": b"flavors: {}\n",
    "data/mid_empty": b"",
    "data/weights.bin": bytes(range(256)) * 600,
    "z_empty_last": b"",
}


def test_model_download_writes_every_file_including_empty_ones(tmp_path):
    registry, _ = registry_with(model_messages(MODEL))
    out = registry.download_model("m", tmp_path / "out", version=1)
    assert out == tmp_path / "out"
    assert {p: (out / p).read_bytes() for p in files_under(out)} == MODEL
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "messages",
    [
        model_messages(MODEL, {3: ("sha256", sha(b"other"))}),
        model_messages(MODEL, {1: ("path", "../escape")}),
        model_messages(MODEL, {1: ("path", "/abs")}),
        model_messages({"a": b"1", "a/b": b"2"}),
        model_messages(MODEL)[:-1],  # the last chunk of weights.bin is missing
        [model_messages(MODEL)[0], *reversed(model_messages(MODEL)[1:])],  # out of order
        [
            *model_messages(MODEL),
            reg_pb.DownloadModelResponse(chunk=reg_pb.ModelChunk(file_index=9)),
        ],
        model_messages(MODEL)[1:],  # no manifest
    ],
    ids=["sha256", "parent", "absolute", "file and dir", "short", "order", "index", "manifest"],
)
def test_a_bad_model_download_is_data_loss_and_leaves_the_old_copy(tmp_path, messages):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.bin").write_bytes(b"the model before")
    registry, stub = registry_with(messages)
    with pytest.raises(DataLossError):
        registry.download_model("m", tmp_path / "out", alias="champion")
    assert files_under(tmp_path) == ["out/old.bin"]
    assert (tmp_path / "out" / "old.bin").read_bytes() == b"the model before"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert stub.calls[0].cancelled


def test_a_bad_model_download_into_a_new_destination_leaves_nothing(tmp_path):
    registry, _ = registry_with(model_messages(MODEL)[:-1])
    with pytest.raises(DataLossError):
        registry.download_model("m", tmp_path / "out", alias="champion")
    assert list(tmp_path.iterdir()) == []


def test_model_upload_announces_each_file_before_its_chunks(tmp_path):
    root = tmp_path / "model"
    for path, data in MODEL.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    registry, stub = registry_with([])
    seen = []
    registry.upload_model(
        "m", root, run_id="r", aliases=["a"], progress=lambda d, t: seen.append((d, t))
    )
    header = stub.sent[0].header
    total = sum(map(len, MODEL.values()))
    assert (header.name, header.run_id, list(header.aliases), header.total_size_bytes) == (
        "m",
        "r",
        ["a"],
        total,
    )
    received: dict[str, bytes] = {}
    current = None
    for message in stub.sent[1:]:
        if message.WhichOneof("payload") == "file":
            current = message.file.path
            received[current] = b""
            assert message.file.sha256 == sha(MODEL[current])
        else:
            received[current] += message.chunk
    assert received == MODEL
    assert seen[0] == (0, total) and seen[-1] == (total, total)


def test_a_symlink_destination_keeps_the_link_and_its_directory_gets_the_model(tmp_path):
    real = tmp_path / "releases" / "a"
    real.mkdir(parents=True)
    (real / "old.bin").write_bytes(b"the model before")
    (tmp_path / "current").symlink_to("releases/a")
    registry, _ = registry_with(model_messages(MODEL))
    synced = registry.sync_model("m", tmp_path / "current", version=1)
    assert synced.path == tmp_path / "current" and synced.changed
    assert (tmp_path / "current").is_symlink()
    assert {p: (real / p).read_bytes() for p in files_under(real)} == MODEL
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["a"]


@pytest.mark.parametrize("dst", [".", "./", "", "x/..", "x/.", "x/../", "/", "link_up"])
def test_a_destination_without_a_name_of_its_own_is_refused_before_any_transfer(
    tmp_path, monkeypatch, dst
):
    (tmp_path / "link_up").symlink_to("..")
    monkeypatch.chdir(tmp_path)
    registry, stub = registry_with(model_messages(MODEL))
    with pytest.raises(InvalidArgumentError) as err:
        registry.download_model("m", dst, version=1)
    assert err.value.field == "dst_dir"
    assert stub.calls == []
    assert [p.name for p in tmp_path.iterdir()] == ["link_up"]


def test_a_loop_of_symlinks_as_destination_is_refused(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    registry, stub = registry_with(model_messages(MODEL))
    with pytest.raises(InvalidArgumentError) as err:
        registry.download_model("m", tmp_path / "a", version=1)
    assert err.value.field == "dst_dir"
    assert stub.calls == []
