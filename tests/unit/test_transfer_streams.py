"""Receiving upload streams into staging, and the file helpers both sides share. No MLflow."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import (
    DISK_FULL_RETRY_AFTER_S,
    CancelledError,
    DataLossError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from mlflow_sidecar.core.transfer import HashingWriter, collect_files, file_digest
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.model_cache import ModelLease
from mlflow_sidecar.server.model_cache.manifest import CacheKey, Manifest
from mlflow_sidecar.server.servicers import streams
from mlflow_sidecar.server.services.artifacts import decode_listing_token, encode_listing_token
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import tracking_pb2 as pb
from tests.unit.test_artifact_paths import UNSAFE

LIMIT = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture()
def staging(tmp_path: Path) -> Staging:
    config = load_config(
        data_dir=tmp_path / "data", artifacts={"max_upload_bytes": LIMIT, "chunk_bytes": CHUNK}
    )
    return Staging(config)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_stream(
    data: bytes, *, path: str = "dir/file.bin", size: int | None = None, digest: str = ""
) -> Iterator[pb.UploadArtifactRequest]:
    header = pb.UploadArtifactHeader(
        run_id="r1",
        artifact_path=path,
        size_bytes=len(data) if size is None else size,
        sha256=digest or sha(data),
    )
    yield pb.UploadArtifactRequest(header=header)
    for start in range(0, len(data), CHUNK):
        yield pb.UploadArtifactRequest(chunk=data[start : start + CHUNK])


class RecordingSink:
    """An upload sink that keeps what it is given."""

    def __init__(self, begun: tuple[str, str, int], needs_file: bool = True) -> None:
        self.begun = begun
        self.needs_file = needs_file
        self.chunks: list[bytes] = []
        self.stored: Path | None = None
        self.aborted = False

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def store(self, verified_file: Path | None) -> None:
        self.stored = verified_file

    def abort(self) -> None:
        self.aborted = True


def receive_artifact(staging: Staging, requests, preflight=lambda run_id: None, sinks=None):
    """As the servicer does it: inside a staging directory that goes away afterwards.

    `preflight(run_id)` runs where the servicer starts the upload; the sinks it hands out
    are appended to `sinks`."""
    sinks = [] if sinks is None else sinks

    def begin(run_id: str, path: str, size: int) -> RecordingSink:
        preflight(run_id)
        sinks.append(RecordingSink((run_id, path, size)))
        return sinks[-1]

    with staging.directory("upload") as scratch:
        staged = streams.receive_artifact(iter(requests), scratch, staging, begin)
        return staged, staged.local_path.read_bytes()


def test_artifact_stream_is_written_and_verified(staging):
    data = os.urandom(200_000)
    sinks: list[RecordingSink] = []
    staged, written = receive_artifact(staging, artifact_stream(data), sinks=sinks)
    assert written == data
    # Every chunk went on to the sink as it arrived; storing is the servicer's decision.
    assert [s.begun for s in sinks] == [("r1", "dir/file.bin", len(data))]
    assert b"".join(sinks[0].chunks) == data
    assert not sinks[0].aborted
    assert sinks[0].stored is None
    staged.sink.store(staged.local_path)
    assert sinks[0].stored == staged.local_path
    assert (staged.run_id, staged.artifact_path, staged.size_bytes, staged.sha256) == (
        "r1",
        "dir/file.bin",
        len(data),
        sha(data),
    )
    assert staged.local_path.name == "file.bin"
    assert staging.in_flight() == []


def test_a_sink_that_streams_gets_the_bytes_and_nothing_is_staged(staging):
    data = os.urandom(3 * CHUNK)
    sinks: list[RecordingSink] = []

    def begin(run_id: str, path: str, size: int) -> RecordingSink:
        sinks.append(RecordingSink((run_id, path, size), needs_file=False))
        return sinks[-1]

    with staging.directory("upload") as scratch:
        staged = streams.receive_artifact(iter(artifact_stream(data)), scratch, staging, begin)
        assert list(scratch.iterdir()) == []
    assert staged.local_path is None
    assert (staged.size_bytes, staged.sha256) == (len(data), sha(data))
    assert b"".join(sinks[0].chunks) == data


def test_upper_case_digest_is_accepted(staging):
    data = b"abc"
    staged, _ = receive_artifact(staging, artifact_stream(data, digest=sha(data).upper()))
    assert staged.sha256 == sha(data)


@pytest.mark.parametrize("path", UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_artifact_path_is_refused_before_preflight(staging, path):
    called = []
    with pytest.raises(InvalidArgumentError) as err:
        receive_artifact(staging, artifact_stream(b"x", path=path), preflight=called.append)
    assert err.value.field == "header.artifact_path"
    assert called == []
    assert staging.in_flight() == []


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "header"),
        ([pb.UploadArtifactRequest(chunk=b"x")], "header"),
        (
            [pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(artifact_path="a"))],
            "header.run_id",
        ),
        (
            [
                pb.UploadArtifactRequest(
                    header=pb.UploadArtifactHeader(run_id="r", artifact_path="a", sha256="zz")
                )
            ],
            "header.sha256",
        ),
        (
            [
                pb.UploadArtifactRequest(
                    header=pb.UploadArtifactHeader(
                        run_id="r", artifact_path="a", size_bytes=-1, sha256="0" * 64
                    )
                )
            ],
            "header.size_bytes",
        ),
    ],
)
def test_malformed_artifact_streams_name_the_field(staging, requests, field):
    with pytest.raises(InvalidArgumentError) as err:
        receive_artifact(staging, requests)
    assert err.value.field == field


def test_second_header_is_refused(staging):
    requests = [*artifact_stream(b"abc"), *artifact_stream(b"abc")]
    with pytest.raises(InvalidArgumentError):
        receive_artifact(staging, requests)
    assert staging.in_flight() == []


def test_wrong_digest_is_data_loss_and_aborts_the_sink(staging):
    sinks: list[RecordingSink] = []
    with pytest.raises(DataLossError, match="sha256"):
        receive_artifact(staging, artifact_stream(b"abc", digest=sha(b"abd")), sinks=sinks)
    assert staging.in_flight() == []
    assert sinks[0].aborted
    assert sinks[0].stored is None


def test_fewer_bytes_than_announced_is_data_loss(staging):
    data = os.urandom(3 * CHUNK)
    truncated = list(artifact_stream(data))[:-1]
    with pytest.raises(DataLossError, match=f"received {2 * CHUNK} of the {3 * CHUNK}"):
        receive_artifact(staging, truncated)
    assert staging.in_flight() == []


def test_more_bytes_than_announced_is_data_loss(staging):
    data = os.urandom(2 * CHUNK)
    sinks: list[RecordingSink] = []
    with pytest.raises(DataLossError, match="more than"):
        receive_artifact(
            staging, artifact_stream(data, size=CHUNK, digest=sha(data[:CHUNK])), sinks=sinks
        )
    assert sinks[0].aborted
    assert b"".join(sinks[0].chunks) == data[:CHUNK]


def test_announced_size_over_the_limit_is_refused_before_any_byte(staging):
    called = []
    with pytest.raises(ResourceExhaustedError, match=r"header\.size_bytes"):
        receive_artifact(
            staging,
            artifact_stream(b"", size=LIMIT + 1, digest="0" * 64),
            preflight=called.append,
        )
    assert called == []


def test_received_bytes_over_the_limit_are_refused(staging):
    data = os.urandom(LIMIT + CHUNK)
    with pytest.raises(ResourceExhaustedError, match="upload limit"):
        receive_artifact(staging, artifact_stream(data, size=LIMIT, digest=sha(data[:LIMIT])))
    assert staging.in_flight() == []


def test_client_going_away_midway_is_cancelled_and_leaves_nothing(staging):
    data = os.urandom(4 * CHUNK)

    def requests():
        yield from list(artifact_stream(data))[:3]
        raise grpc.RpcError()  # what gRPC's request iterator raises on cancellation

    sinks: list[RecordingSink] = []
    with pytest.raises(CancelledError):
        receive_artifact(staging, requests(), sinks=sinks)
    assert staging.in_flight() == []
    assert sinks[0].aborted


def test_preflight_failure_stops_the_upload(staging):
    def unknown_run(run_id: str) -> None:
        raise NotFoundError(f"run {run_id} does not exist")

    with pytest.raises(NotFoundError):
        receive_artifact(staging, artifact_stream(b"abc"), preflight=unknown_run)


def test_download_messages_end_with_the_digest_of_what_was_sent():
    data = os.urandom(3 * CHUNK + 5)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    messages = list(streams.artifact_messages("a/b.bin", len(data), iter(chunks), CHUNK))
    assert [m.WhichOneof("payload") for m in messages] == ["header"] + ["chunk"] * 4 + ["trailer"]
    assert (messages[0].header.artifact_path, messages[0].header.size_bytes) == (
        "a/b.bin",
        len(data),
    )
    assert b"".join(m.chunk for m in messages[1:-1]) == data
    assert messages[-1].trailer.sha256 == sha(data)


def test_download_chunks_are_cut_to_what_the_request_asks_for():
    data = os.urandom(2 * CHUNK + 5)
    chunks = [data[: CHUNK + 3], data[CHUNK + 3 :]]
    messages = list(streams.artifact_messages("a.bin", len(data), iter(chunks), 5000))
    sizes = [len(m.chunk) for m in messages[1:-1]]
    assert max(sizes) <= 5000 and b"".join(m.chunk for m in messages[1:-1]) == data
    assert messages[-1].trailer.sha256 == sha(data)


@pytest.mark.parametrize(("asked", "chunk"), [(0, 65536), (4096, 4096), (10**9, 65536)])
def test_a_download_takes_the_smaller_of_its_asked_and_the_sidecars_chunk_size(
    tmp_path, asked, chunk
):
    staging = Staging(load_config(data_dir=tmp_path, artifacts={"chunk_bytes": 65536}))
    assert streams.download_chunk_bytes(asked, staging) == chunk


@pytest.mark.parametrize("asked", [1, 4095, -1])
def test_a_download_asking_for_tiny_chunks_is_refused_naming_the_field(tmp_path, asked):
    staging = Staging(load_config(data_dir=tmp_path))
    with pytest.raises(InvalidArgumentError) as refused:
        streams.download_chunk_bytes(asked, staging)
    assert refused.value.field == "max_chunk_bytes"


def trailed_stream(data: bytes, *, digest: str | None = None) -> list[pb.UploadArtifactRequest]:
    """An upload whose sha256 follows the bytes, as the typed client sends it."""
    header = pb.UploadArtifactHeader(
        run_id="r1", artifact_path="dir/file.bin", size_bytes=len(data)
    )
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    trailer = pb.UploadArtifactTrailer(sha256=sha(data) if digest is None else digest)
    return [
        pb.UploadArtifactRequest(header=header),
        *(pb.UploadArtifactRequest(chunk=c) for c in chunks),
        pb.UploadArtifactRequest(trailer=trailer),
    ]


def test_upload_verified_by_its_trailer_is_staged(staging):
    data = os.urandom(2 * CHUNK + 3)
    staged, written = receive_artifact(staging, trailed_stream(data))
    assert written == data
    assert staged.sha256 == sha(data)


@pytest.mark.parametrize(
    ("requests", "error", "field"),
    [
        (trailed_stream(b"abc")[:-1], InvalidArgumentError, "trailer.sha256"),
        (trailed_stream(b"abc", digest="nope"), InvalidArgumentError, "trailer.sha256"),
        (
            [*trailed_stream(b"abc"), pb.UploadArtifactRequest(chunk=b"d")],
            InvalidArgumentError,
            "trailer",
        ),
        (trailed_stream(b"abc", digest=sha(b"abd")), DataLossError, None),
        (
            [*artifact_stream(b"abc"), trailed_stream(b"abc", digest=sha(b"abd"))[-1]],
            DataLossError,
            None,
        ),
    ],
    ids=["missing", "malformed", "not last", "wrong", "contradicts header"],
)
def test_bad_trailers_are_refused_and_abort_the_sink(staging, requests, error, field):
    sinks: list[RecordingSink] = []
    with pytest.raises(error) as err:
        receive_artifact(staging, requests, sinks=sinks)
    if field is not None:
        assert err.value.field == field
    assert sinks[0].aborted
    assert staging.in_flight() == []


# -- model streams -----------------------------------------------------------------------


def model_stream(
    files: dict[str, bytes], *, total: int | None = None, **header: object
) -> list[reg_pb.UploadModelRequest]:
    values = {"name": "m", "experiment_id": "1", **header}
    values["total_size_bytes"] = sum(map(len, files.values())) if total is None else total
    requests = [reg_pb.UploadModelRequest(header=reg_pb.UploadModelHeader(**values))]
    for path, data in files.items():
        announced = reg_pb.UploadModelFile(path=path, size_bytes=len(data), sha256=sha(data))
        requests.append(reg_pb.UploadModelRequest(file=announced))
        for start in range(0, len(data), CHUNK):
            requests.append(reg_pb.UploadModelRequest(chunk=data[start : start + CHUNK]))
    return requests


def receive_model(staging: Staging, requests):
    with staging.directory("upload-model") as scratch:
        header, messages = streams.model_header(iter(requests), staging)
        staged = streams.receive_model(header, messages, scratch, staging)
        found = {f.relpath: f.path.read_bytes() for f in collect_files(staged.root)}
        return staged, found


def test_model_stream_builds_the_tree(staging):
    files = {
        "MLmodel": b"flavors: {}\n",
        "data/empty.txt": b"",
        "data/weights/w.bin": os.urandom(3 * CHUNK + 5),
        "z_last_empty": b"",
    }
    staged, found = receive_model(
        staging, model_stream(files, tags={"a": "b"}, aliases=["champion"])
    )
    assert found == files
    assert staged.size_bytes == sum(map(len, files.values()))
    assert (staged.name, staged.experiment_id, dict(staged.tags), staged.aliases) == (
        "m",
        "1",
        {"a": "b"},
        ("champion",),
    )
    assert staging.in_flight() == []


@pytest.mark.parametrize("path", UNSAFE.values(), ids=UNSAFE.keys())
def test_unsafe_model_file_path_is_refused(staging, path):
    requests = model_stream({"ok.bin": b"fine", path: b"evil"})
    with pytest.raises(InvalidArgumentError) as err:
        receive_model(staging, requests)
    assert err.value.field == "file.path"
    assert staging.in_flight() == []


def test_duplicate_model_file_is_refused(staging):
    requests = model_stream({"a.bin": b"1"}) + model_stream({"a.bin": b"1"})[1:]
    with pytest.raises(InvalidArgumentError, match="twice"):
        receive_model(staging, requests)


def test_model_file_cut_short_is_data_loss(staging):
    requests = model_stream({"a.bin": os.urandom(2 * CHUNK), "b.bin": b"x"}, total=0)
    del requests[2]  # the first chunk of a.bin
    with pytest.raises(DataLossError, match=r"a\.bin"):
        receive_model(staging, requests)
    assert staging.in_flight() == []


def test_model_file_with_wrong_digest_is_data_loss(staging):
    requests = model_stream({"a.bin": b"right"})
    requests[1].file.sha256 = sha(b"wrong")
    with pytest.raises(DataLossError, match="sha256"):
        receive_model(staging, requests)


def test_model_total_must_match_what_arrived(staging):
    with pytest.raises(DataLossError, match="total_size_bytes"):
        receive_model(staging, model_stream({"a.bin": b"abc"}, total=4))
    with pytest.raises(DataLossError, match="total_size_bytes"):
        receive_model(staging, model_stream({"a.bin": b"abc", "b.bin": b"abc"}, total=4))


def test_model_over_the_limit_is_refused(staging):
    with pytest.raises(ResourceExhaustedError, match="total_size_bytes"):
        receive_model(staging, model_stream({"a.bin": b"a"}, total=LIMIT + 1))
    # Without a total, the announced file sizes are summed against the limit.
    half = os.urandom(LIMIT // 2 + 1)
    with pytest.raises(ResourceExhaustedError, match="announced"):
        receive_model(staging, model_stream({"a.bin": half, "b.bin": half}, total=0))
    assert staging.in_flight() == []


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "header"),
        (model_stream({}), "file"),
        ([*model_stream({"a": b"x"})[:1], reg_pb.UploadModelRequest(chunk=b"x")], "file"),
    ],
)
def test_malformed_model_streams_name_the_field(staging, requests, field):
    with pytest.raises(InvalidArgumentError) as err:
        receive_model(staging, requests)
    assert err.value.field == field


# -- shared helpers ----------------------------------------------------------------------


def test_hashing_writer_deletes_what_it_could_not_verify(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(DataLossError), HashingWriter(target, 3, sha(b"abc"), what="x") as writer:
        writer.write(b"abd")
        writer.finish()
    assert not target.exists()
    with HashingWriter(target, 3, sha(b"abc"), what="x") as writer:
        writer.write(b"abc")
        writer.finish()
    assert target.read_bytes() == b"abc"
    assert file_digest(target) == (3, sha(b"abc"))


def test_collect_files_follows_symlinks_only_inside_the_root(tmp_path):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(b"a")
    (root / "empty_dir").mkdir()
    os.symlink("sub/a.bin", root / "link.bin")
    os.symlink("sub", root / "linked_dir")
    found = {f.relpath: f.size_bytes for f in collect_files(root)}
    assert found == {"link.bin": 1, "linked_dir/a.bin": 1, "sub/a.bin": 1}

    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    os.symlink(outside, root / "sub" / "leak")
    with pytest.raises(InvalidArgumentError, match="outside") as err:
        collect_files(root)
    assert err.value.field == "local_dir"


@pytest.mark.parametrize(
    ("target", "problem"), [("..", "outside"), (".", "loop"), ("missing", "dangling")]
)
def test_collect_files_refuses_bad_symlinks(tmp_path, target, problem):
    root = tmp_path / "model"
    root.mkdir()
    (root / "a.bin").write_bytes(b"a")
    os.symlink(target, root / "bad")
    with pytest.raises(InvalidArgumentError, match=problem):
        collect_files(root)


def test_staging_removes_leftovers_of_a_killed_sidecar(tmp_path):
    config = load_config(data_dir=tmp_path / "data")
    leftover = config.staging_dir / "transfer-upload-dead"
    leftover.mkdir(parents=True)
    (leftover / "half.bin").write_bytes(b"half")
    unrelated = config.staging_dir / "keep.txt"
    unrelated.write_text("not ours")
    staging = Staging(config)
    assert staging.in_flight() == []
    assert unrelated.exists()


def test_listing_tokens_round_trip_and_are_bound_to_the_run_and_path():
    token = encode_listing_token("run1", "models", "models/b")
    assert decode_listing_token(token, "run1", "models") == "models/b"
    assert decode_listing_token("", "run1", "models") == ""
    another_path = encode_listing_token("run1", "other", "x")
    another_run = encode_listing_token("run2", "models", "models/b")
    for bad in ("garbage", another_path, another_run, "e30="):
        with pytest.raises(InvalidArgumentError) as err:
            decode_listing_token(bad, "run1", "models")
        assert err.value.field == "page_token"


def test_a_model_of_more_files_than_one_download_manifest_holds_is_refused(tmp_path):
    # DownloadModel sends every file's path, size and sha256 in one message: a model whose
    # list would not fit could be stored, then never downloaded.
    config = load_config(
        data_dir=tmp_path / "data",
        server={"max_message_bytes": 128 * 1024},
        artifacts={"max_upload_bytes": LIMIT, "chunk_bytes": CHUNK},
    )
    small = Staging(config)
    long_name = "d" * 200
    fits = {f"{long_name}/{index:04d}": b"x" for index in range(300)}
    _, found = receive_model(small, model_stream(fits))
    assert found == fits
    too_many = {f"{long_name}/{index:04d}": b"x" for index in range(600)}
    with pytest.raises(ResourceExhaustedError) as err:
        receive_model(small, model_stream(too_many))
    assert err.value.reason == ErrorReason.UPLOAD_TOO_LARGE
    assert "server.max_message_bytes" in str(err.value)


def _leased(root: Path, files: dict[str, bytes]) -> ModelLease:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    manifest = Manifest.describe(CacheKey("m", 1, 0), root, CHUNK)
    return ModelLease(root, manifest, pin=lambda: None, unpin=lambda: None)


def test_a_version_tagged_beyond_one_message_after_its_upload_still_downloads(tmp_path):
    config = load_config(data_dir=tmp_path / "data", server={"max_message_bytes": 65536})
    small = Staging(config)
    (tmp_path / "model").mkdir()
    lease = _leased(tmp_path / "model", {"weights.bin": b"W" * 100})
    version = ModelVersion(
        "m",
        1,
        source="runs:/r1/model",
        description="about this model",
        tags={"notes0": "x" * 40_000, "notes1": "x" * 40_000},
        aliases=("champion",),
    )
    manifest, *chunks = streams.model_messages(version, lease, small)
    sent = manifest.manifest.model_version
    assert [f.path for f in manifest.manifest.files] == ["weights.bin"]
    assert (sent.name, sent.version, sent.source) == ("m", 1, "runs:/r1/model")
    assert dict(sent.tags) == {}  # enough to fit: aliases and description stay
    assert list(sent.aliases) == ["champion"] and sent.description == "about this model"
    assert b"".join(c.chunk.data for c in chunks) == b"W" * 100
    unchanged = streams.unchanged_message(version, manifest.manifest.digest, small).unchanged
    assert dict(unchanged.model_version.tags) == {}
    assert unchanged.model_version.aliases == ["champion"]


def test_a_version_whose_file_list_alone_overflows_one_message_names_the_list(tmp_path):
    config = load_config(data_dir=tmp_path / "data", server={"max_message_bytes": 65536})
    small = Staging(config)
    (tmp_path / "model").mkdir()
    lease = _leased(tmp_path / "model", {f"{'d' * 200}/{i:04d}": b"x" for i in range(300)})
    with pytest.raises(FailedPreconditionError) as err:
        next(streams.model_messages(ModelVersion("m", 1), lease, small))
    assert "list of 300 files" in err.value.message
    assert "server.max_message_bytes" in err.value.message


def test_a_full_disk_while_writing_is_disk_full_with_a_retry_hint_naming_no_directory(tmp_path):
    class _Full:
        def write(self, _data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    target = tmp_path / "staged" / "w.bin"
    with (
        pytest.raises(ResourceExhaustedError) as full,
        HashingWriter(target, 3, None, what="w.bin") as writer,
    ):
        writer._handle = _Full()  # type: ignore[assignment]
        writer.write(b"abc")
    assert full.value.reason == ErrorReason.DISK_FULL
    assert full.value.retry_after_s == DISK_FULL_RETRY_AFTER_S
    assert "w.bin" in full.value.message and str(tmp_path) not in full.value.message
