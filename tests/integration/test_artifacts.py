"""Run artifacts streamed through the sidecar: upload, list, download, against a real MLflow."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mlflow_sidecar.core.errors import (
    InvalidArgumentError,
    NotFoundError,
)
from tests.support.files import MIB, random_file, sha256_of


@pytest.fixture()
def tracking(client_container):
    return client_container.experiment_tracking()


@pytest.fixture()
def run_id(tracking, unique) -> str:
    experiment = tracking.create_experiment(f"artifacts-{unique}")
    return tracking.start_run(experiment.experiment_id).run_id


def test_64_mib_file_round_trip_is_byte_identical(tracking, run_id, tmp_path, sidecar):
    source = random_file(tmp_path / "up" / "weights.bin", 64 * MIB)
    expected = sha256_of(source)
    seen: list[tuple[int, int]] = []

    info = tracking.upload_artifact(
        run_id,
        source,
        "checkpoints/step_100/weights.bin",
        progress=lambda done, total: seen.append((done, total)),
    )

    assert info.path == "checkpoints/step_100/weights.bin"
    assert info.size_bytes == 64 * MIB
    assert info.sha256 == expected
    assert seen[0] == (0, 64 * MIB) and seen[-1] == (64 * MIB, 64 * MIB)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)

    received: list[tuple[int, int]] = []
    local = tracking.download_artifact(
        run_id,
        "checkpoints/step_100/weights.bin",
        tmp_path / "down",
        progress=lambda done, total: received.append((done, total)),
    )
    assert local == tmp_path / "down" / "checkpoints" / "step_100" / "weights.bin"
    assert sha256_of(local) == expected
    assert received[-1] == (64 * MIB, 64 * MIB)
    # Only the file itself is left behind: no partial files next to it.
    assert [p.name for p in local.parent.iterdir()] == ["weights.bin"]
    assert sidecar.container.staging().in_flight() == []


def test_uploaded_artifact_is_an_ordinary_mlflow_artifact(
    tracking, run_id, tmp_path, mlflow_server
):
    source = random_file(tmp_path / "metrics.parquet", 3 * MIB + 17)
    tracking.upload_artifact(run_id, source, "eval/metrics.parquet")

    plain = MlflowClient(tracking_uri=mlflow_server.url)
    listed = {f.path: f.file_size for f in plain.list_artifacts(run_id, "eval")}
    assert listed == {"eval/metrics.parquet": 3 * MIB + 17}
    fetched = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="eval/metrics.parquet",
        dst_path=str(tmp_path / "plain"),
        tracking_uri=mlflow_server.url,
    )
    assert sha256_of(Path(fetched)) == sha256_of(source)


def test_default_artifact_path_is_the_file_name(tracking, run_id, tmp_path):
    source = random_file(tmp_path / "notes.txt", 10)
    info = tracking.upload_artifact(run_id, source)
    assert info.path == "notes.txt"
    assert [f.path for f in tracking.list_artifacts(run_id).items] == ["notes.txt"]


def test_empty_file_round_trip(tracking, run_id, tmp_path):
    source = tmp_path / "empty.flag"
    source.write_bytes(b"")
    info = tracking.upload_artifact(run_id, source, "flags/empty.flag")
    assert info.size_bytes == 0
    local = tracking.download_artifact(run_id, "flags/empty.flag", tmp_path / "down")
    assert local.read_bytes() == b""


def test_list_artifacts_paginates_in_path_order(tracking, run_id, tmp_path):
    for index in range(5):
        tracking.upload_artifact(
            run_id, random_file(tmp_path / f"f{index}.bin", index + 1), f"many/f{index}.bin"
        )
    tracking.upload_artifact(run_id, random_file(tmp_path / "deep.bin", 3), "many/sub/deep.bin")

    seen = []
    token = ""
    pages = 0
    while True:
        page = tracking.list_artifacts(run_id, "many", page_size=2, page_token=token)
        seen += list(page.items)
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert pages == 3
    assert [(f.path, f.is_dir) for f in seen] == [
        ("many/f0.bin", False),
        ("many/f1.bin", False),
        ("many/f2.bin", False),
        ("many/f3.bin", False),
        ("many/f4.bin", False),
        ("many/sub", True),
    ]
    assert [f.size_bytes for f in seen[:5]] == [1, 2, 3, 4, 5]
    root = tracking.list_artifacts(run_id)
    assert [(f.path, f.is_dir) for f in root.items] == [("many", True)]
    assert root.next_page_token == ""


def test_list_artifacts_refuses_a_foreign_page_token(tracking, run_id):
    with pytest.raises(InvalidArgumentError) as err:
        tracking.list_artifacts(run_id, "x", page_token="not-a-token")
    assert err.value.field == "page_token"


def test_download_of_a_missing_artifact_is_not_found(tracking, run_id, tmp_path):
    with pytest.raises(NotFoundError):
        tracking.download_artifact(run_id, "nothing/here.bin", tmp_path)
    assert not (tmp_path / "nothing").exists()


def test_download_of_a_directory_is_invalid(tracking, run_id, tmp_path):
    tracking.upload_artifact(run_id, random_file(tmp_path / "a.bin", 5), "dir/a.bin")
    with pytest.raises(InvalidArgumentError) as err:
        tracking.download_artifact(run_id, "dir", tmp_path / "down")
    assert err.value.field == "artifact_path"


def test_upload_to_an_unknown_run_is_not_found(tracking, tmp_path):
    with pytest.raises(NotFoundError):
        tracking.upload_artifact("0" * 32, random_file(tmp_path / "a.bin", 5))


def _grpcurl(target: str, method: str, payload: str | None, *, data: bool = True) -> str:
    grpcurl = Path(sys.executable).with_name("grpcurl")
    command = [str(grpcurl), "-plaintext"]
    if data:
        command += ["-d", "@"]
    command += [target, method]
    done = subprocess.run(
        command, input=payload, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _json_stream(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    messages = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return messages
        message, index = decoder.raw_decode(text, index)
        messages.append(message)


def test_small_file_round_trip_through_real_grpcurl(sidecar, tracking, run_id):
    """The grpcurl binary, through reflection: a client stream of JSON messages with bytes
    as base64 in, a server stream of JSON messages out (grpcurl prints proto field names)."""
    content = b"grpcurl says hello\n" * 100
    digest = hashlib.sha256(content).hexdigest()
    half = len(content) // 2
    requests = [
        {
            "header": {
                "run_id": run_id,
                "artifact_path": "cli/hello.txt",
                "size_bytes": str(len(content)),
                "sha256": digest,
            }
        },
        {"chunk": base64.b64encode(content[:half]).decode()},
        {"chunk": base64.b64encode(content[half:]).decode()},
    ]
    out = _grpcurl(
        sidecar.target,
        "mlflow_sidecar.v1.ExperimentTrackingService/UploadArtifact",
        "\n".join(json.dumps(r) for r in requests),
    )
    reply = json.loads(out)
    assert reply == {
        "artifact_path": "cli/hello.txt",
        "size_bytes": str(len(content)),
        "sha256": digest,
    }

    out = _grpcurl(
        sidecar.target,
        "mlflow_sidecar.v1.ExperimentTrackingService/DownloadArtifact",
        json.dumps({"run_id": run_id, "artifact_path": "cli/hello.txt"}),
    )
    messages = _json_stream(out)
    assert messages[0]["header"] == {
        "artifact_path": "cli/hello.txt",
        "size_bytes": str(len(content)),
    }
    # The digest follows the bytes it covers.
    assert messages[-1] == {"trailer": {"sha256": digest}}
    downloaded = b"".join(base64.b64decode(m["chunk"]) for m in messages[1:-1])
    assert downloaded == content


@pytest.mark.parametrize("artifact_path", ["step:100/w.bin", "dir/config:v1.txt", "a b/c d.txt"])
def test_names_with_colons_and_spaces_mlflow_keeps_read_back(
    client_container, tmp_path, artifact_path
):
    # The edge of what the sidecar stores: these names list and read back as sent
    # (' x', 'Config:x' and 'C:/x' do not, and are refused; see test_artifact_paths).
    tracking = client_container.experiment_tracking()
    experiment = tracking.create_experiment(f"names-{uuid.uuid4().hex}").experiment_id
    run_id = tracking.start_run(experiment).run_id
    local = tmp_path / "local.bin"
    local.write_bytes(b"kept under its own name")
    tracking.upload_artifact(run_id, local, artifact_path)
    directory, _, name = artifact_path.rpartition("/")
    listed = [info.path for info in tracking.list_artifacts(run_id, directory).items]
    assert listed == [artifact_path]
    downloaded = tracking.download_artifact(run_id, artifact_path, tmp_path / "out")
    assert downloaded.read_bytes() == b"kept under its own name"
    assert downloaded.name == name


def test_a_client_receiving_smaller_messages_than_the_sidecars_chunks_downloads_whole(
    sidecar, run_id, tmp_path, unique
):
    # The sidecar's chunks are 1 MiB; this client receives at most 64 KiB a message, and
    # asks for chunks that fit.
    from mlflow_sidecar.client import ClientContainer

    small = ClientContainer()
    small.config.from_dict(
        {"target": sidecar.target, "timeout_s": 30.0, "max_message_bytes": 64 * 1024}
    )
    try:
        tracking, registry = small.experiment_tracking(), small.model_registry()
        data = random_file(tmp_path / "up" / "weights.bin", 3 * MIB + 7)
        tracking.upload_artifact(run_id, data, "ckpt/weights.bin")
        got = tracking.download_artifact(run_id, "ckpt/weights.bin", tmp_path / "down")
        assert sha256_of(got) == sha256_of(data)
        model = tmp_path / "model"
        model.mkdir()
        (model / "weights.bin").write_bytes(data.read_bytes())
        registry.upload_model(f"small-messages-{unique}", model, run_id=run_id)
        loaded = registry.download_model(f"small-messages-{unique}", tmp_path / "m", version=1)
        assert sha256_of(loaded / "weights.bin") == sha256_of(data)
    finally:
        small.shutdown_resources()
