"""Group `model_cache`: DownloadModel of a 200 MB model through the sidecar, the first time
(fetched from MLflow) and again (from the model cache: streamed, and copied by a client
that shares the sidecar's data dir), against MLflow's own download of the same version,
and against the bare gRPC transport's ceiling."""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import mlflow

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import registry_pb2_grpc as reg_pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
# A few files of random bytes, 200 MiB in all: weights, an optimizer state, small extras.
MODEL_FILES_MB = {"weights/model.bin": 120, "weights/optimizer.bin": 64, "data/embed.bin": 16}


def make_model(root: Path) -> dict[str, str]:
    """Write the model directory; relative path -> sha256."""
    digests: dict[str, str] = {}
    for relpath, size_mb in MODEL_FILES_MB.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for _ in range(size_mb):
                chunk = os.urandom(MIB)
                out.write(chunk)
                digest.update(chunk)
        digests[relpath] = digest.hexdigest()
    (root / "MLmodel").write_text("flavors: {}\n")
    digests["MLmodel"] = hashlib.sha256(b"flavors: {}\n").hexdigest()
    return digests


def tree_sha256(root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in root.rglob("*"):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while block := handle.read(MIB):
                    digest.update(block)
            found[path.relative_to(root).as_posix()] = digest.hexdigest()
    return found


def raw_grpc_download(size_mb: int) -> float:
    """MB/s of a bare grpcio DownloadModel of `size_mb` 1 MiB chunks sent from memory, the
    client hashing and writing each chunk as the typed client does: the transport's ceiling."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "raw_grpc_server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        options = [("grpc.max_receive_message_length", 2 * DEFAULT_CHUNK_BYTES)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = reg_pb_grpc.ModelRegistryServiceStub(channel)
            request = reg_pb.DownloadModelRequest(name="raw", version=size_mb)
            out = ROOT / "bench" / ".raw-download.bin"
            started = time.perf_counter()
            digest = hashlib.sha256()
            with out.open("wb") as handle:
                for message in stub.DownloadModel(request):
                    if message.WhichOneof("payload") == "chunk":
                        digest.update(message.chunk.data)
                        handle.write(message.chunk.data)
            elapsed = time.perf_counter() - started
            out.unlink()
            return size_mb / elapsed
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


@contextlib.contextmanager
def shared_registry(target: str, cache_dir: Path) -> Iterator[ModelRegistry]:
    """The typed client of a process that sees the sidecar's model cache at `cache_dir`
    (as through a volume shared with the sidecar)."""
    container = ClientContainer()
    container.config.from_dict(
        {"target": target, "timeout_s": 600, "model_cache_dir": str(cache_dir)}
    )
    try:
        yield container.model_registry()
    finally:
        container.shutdown_resources()


def model_cache(
    results: dict[str, float],
    registry: ModelRegistry,
    shared: ModelRegistry,
    server_url: str,
    experiment_id: str,
    work: Path,
    repeats: int,
    prefix: str = "",
) -> None:
    """`repeats` rounds of `round_of_downloads`; the medians go in `results` (keys with
    `prefix` after `model_download_`), with the bare transport's ceiling (not a target)
    beside them. `shared`: the same sidecar's client with `model_cache_dir` set."""
    work.mkdir(parents=True, exist_ok=True)
    source = work / "model"
    expected = make_model(source)
    size_mb = sum(MODEL_FILES_MB.values())
    name = "bench-model-cache"
    times: dict[str, list[float]] = {
        "model_download_cold_mb_s": [],
        "model_download_cached_mb_s": [],
        "model_download_cached_shared_mb_s": [],
        "model_download_direct_mb_s": [],
    }
    # MLflow's client finds models:/ URIs through its registry URI (a process-wide setting).
    mlflow.set_registry_uri(server_url)
    try:
        for attempt in range(repeats):
            round_of_downloads(
                (registry, shared),
                name,
                source,
                experiment_id,
                server_url,
                work,
                attempt,
                expected,
                times,
            )
    finally:
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    for key, seconds in times.items():
        named = key.replace("model_download_", f"model_download_{prefix}")
        results[named] = size_mb / statistics.median(seconds)
        print(f"  {named:36s} {results[named]:14.1f}", flush=True)
    if prefix:
        return
    results["grpc_raw_model_download_mb_s"] = statistics.median(
        raw_grpc_download(size_mb) for _ in range(repeats)
    )
    print(
        f"  {'grpc_raw_model_download_mb_s':36s} {results['grpc_raw_model_download_mb_s']:14.1f}",
        flush=True,
    )


def round_of_downloads(
    registries: tuple[ModelRegistry, ModelRegistry],
    name: str,
    source: Path,
    experiment_id: str,
    server_url: str,
    work: Path,
    attempt: int,
    expected: dict[str, str],
    times: dict[str, list[float]],
) -> None:
    """Register the model as a new version (so that the sidecar must fetch it once), then
    download it through the sidecar twice by stream (`registries[0]`), once by a client
    that copies it from the shared cache (`registries[1]`), and with MLflow's client once,
    each into a fresh directory, checking every file."""
    registry, shared = registries
    version = registry.upload_model(name, source, experiment_id=experiment_id).version
    downloads: list[tuple[str, Callable[[Path], object]]] = [
        (
            "model_download_cold_mb_s",
            lambda dst: registry.download_model(name, dst, version=version),
        ),
        (
            "model_download_cached_mb_s",
            lambda dst: registry.download_model(name, dst, version=version),
        ),
        (
            "model_download_cached_shared_mb_s",
            lambda dst: shared.download_model(name, dst, version=version),
        ),
        (
            "model_download_direct_mb_s",
            lambda dst: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}",
                dst_path=str(dst),
                tracking_uri=server_url,
            ),
        ),
    ]
    for key, download in downloads:
        dst = work / f"{key}-{attempt}"
        started = time.perf_counter()
        download(dst)
        times[key].append(time.perf_counter() - started)
        got = tree_sha256(dst)
        got.pop("registered_model_meta", None)  # what MLflow's own download adds
        assert got == expected, (key, sorted(got))
