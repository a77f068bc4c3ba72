"""`GrpcLoggedModels`: MLflow 3's logged models through the sidecar (the `sidecar://`
plugin's `log_model` path). Files move as a run's artifacts do: chunked, with size and
sha256 verified at the other end, and a download appears only once verified."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mlflow_sidecar.client.arguments import string_map, strings
from mlflow_sidecar.client.downloads import claimed, partial_path, sweep_stale
from mlflow_sidecar.client.grpc_tracking import check_chunk_bytes, invoke
from mlflow_sidecar.client.ports import StrPath
from mlflow_sidecar.client.streaming import invoke_client_stream, resent_on_unavailable
from mlflow_sidecar.client.unary_retry import Reconnect
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import ArtifactInfo, FileInfo, Page
from mlflow_sidecar.core.errors import DataLossError, InvalidArgumentError
from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES, DEFAULT_PAGE_SIZE
from mlflow_sidecar.core.logged_models import (
    DatasetUse,
    LoggedModel,
    LoggedModelStatus,
    dataset_to_pb,
    logged_model_from_pb,
    status_to_pb,
)
from mlflow_sidecar.core.paths import check_relative_path, check_stored_path
from mlflow_sidecar.core.transfer import HashingWriter, read_chunks
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc


class GrpcLoggedModels:
    """Logged models of a sidecar. Every call carries `timeout_s` as its deadline, file
    transfers `transfer_timeout_s`; creates and deletes carry a request_id. A transfer
    that found the sidecar unreachable is sent again, up to `upload_attempts` times in
    all, with `reconnect` (its channel's) once the sidecar is back, within
    `transfer_timeout_s`."""

    def __init__(
        self,
        stub: pb_grpc.ExperimentTrackingServiceStub,
        timeout_s: float = 30.0,
        *,
        transfer_timeout_s: float = 3600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        download_chunk_bytes: int = 0,
        upload_attempts: int = 3,
        reconnect: Reconnect | None = None,
    ) -> None:
        self._stub = stub
        self._timeout = timeout_s
        self._transfer_timeout = transfer_timeout_s
        self._chunk_bytes = check_chunk_bytes(chunk_bytes)
        # What the channel receives: the sidecar cuts a download's chunks to it (0: its own).
        self._download_chunk_bytes = download_chunk_bytes
        self._upload = resent_on_unavailable(
            self._upload_once, upload_attempts, reconnect, transfer_timeout_s, upload=True
        )
        # Downloads are sent again here, not by gRPC's retry policy (see channel.py).
        self._download = resent_on_unavailable(
            self._download_once, upload_attempts, reconnect, transfer_timeout_s
        )

    def create(
        self,
        experiment_id: str,
        *,
        name: str = "",
        model_type: str = "",
        source_run_id: str = "",
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> LoggedModel:
        """Create a logged model (PENDING); the same `request_id` yields the same model."""
        request = pb.CreateLoggedModelRequest(
            experiment_id=experiment_id,
            name=name,
            model_type=model_type,
            source_run_id=source_run_id,
            params=string_map("params", params or {}),
            tags=string_map("tags", tags or {}),
            request_id=request_id or uuid.uuid4().hex,
        )
        return logged_model_from_pb(
            invoke(self._stub.CreateLoggedModel, request, self._timeout).model
        )

    def get(self, model_id: str) -> LoggedModel:
        """One logged model."""
        request = pb.GetLoggedModelRequest(model_id=model_id)
        return logged_model_from_pb(invoke(self._stub.GetLoggedModel, request, self._timeout).model)

    def search(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str = "",
        order_by: Sequence[tuple[str, bool]] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[LoggedModel]:
        """One page of the experiments' logged models matching an MLflow filter."""
        request = pb.SearchLoggedModelsRequest(
            experiment_ids=strings("experiment_ids", experiment_ids),
            filter=filter_string,
            order_by=[pb.LoggedModelOrder(field_name=f, ascending=a) for f, a in order_by],
            page_size=page_size,
            page_token=page_token,
        )
        reply = invoke(self._stub.SearchLoggedModels, request, self._timeout)
        return Page(tuple(logged_model_from_pb(m) for m in reply.models), reply.next_page_token)

    def finalize(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        """Set the model's final status, READY or FAILED."""
        request = pb.FinalizeLoggedModelRequest(model_id=model_id, status=status_to_pb(status))
        return logged_model_from_pb(
            invoke(self._stub.FinalizeLoggedModel, request, self._timeout).model
        )

    def set_tags(self, model_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags."""
        request = pb.SetLoggedModelTagsRequest(model_id=model_id, tags=string_map("tags", tags))
        invoke(self._stub.SetLoggedModelTags, request, self._timeout)

    def delete_tag(self, model_id: str, key: str, *, request_id: str = "") -> None:
        """Delete one tag."""
        request = pb.DeleteLoggedModelTagRequest(
            model_id=model_id, key=key, request_id=request_id or uuid.uuid4().hex
        )
        invoke(self._stub.DeleteLoggedModelTag, request, self._timeout)

    def log_outputs(
        self, run_id: str, outputs: Sequence[tuple[str, int]], *, request_id: str = ""
    ) -> None:
        """Record logged models (id, step) as outputs of the run."""
        request = pb.LogModelOutputsRequest(
            run_id=run_id,
            models=[pb.ModelOutput(model_id=m, step=s) for m, s in outputs],
            request_id=request_id or uuid.uuid4().hex,
        )
        invoke(self._stub.LogModelOutputs, request, self._timeout)

    def log_inputs(
        self,
        run_id: str,
        datasets: Sequence[DatasetUse] = (),
        model_ids: Sequence[str] = (),
        *,
        request_id: str = "",
    ) -> None:
        """Record the datasets and logged models the run used."""
        request = pb.LogRunInputsRequest(
            run_id=run_id,
            datasets=[dataset_to_pb(d) for d in datasets],
            model_ids=strings("model_ids", model_ids),
            request_id=request_id or uuid.uuid4().hex,
        )
        invoke(self._stub.LogRunInputs, request, self._timeout)

    def upload_artifact(
        self, model_id: str, local_path: StrPath, artifact_path: str = "", *, request_id: str = ""
    ) -> ArtifactInfo:
        """Store the file `local_path` as the model's file `artifact_path`."""
        source = Path(local_path)
        if not source.is_file():
            raise InvalidArgumentError("local_path", f"{source} is not a file")
        target = check_stored_path("artifact_path", artifact_path or source.name)
        info: ArtifactInfo = self._upload(model_id, source, target, request_id or uuid.uuid4().hex)
        return info

    def _upload_once(
        self, model_id: str, source: Path, target: str, request_id: str
    ) -> ArtifactInfo:
        size = source.stat().st_size
        digest = hashlib.sha256()

        def requests() -> Iterator[pb.UploadLoggedModelArtifactRequest]:
            header = pb.UploadLoggedModelArtifactHeader(
                model_id=model_id, artifact_path=target, size_bytes=size, request_id=request_id
            )
            yield pb.UploadLoggedModelArtifactRequest(header=header)
            sent = 0
            for chunk in read_chunks(source, self._chunk_bytes):
                if sent + len(chunk) > size:
                    raise DataLossError(f"{source} grew while it was being uploaded")
                digest.update(chunk)
                sent += len(chunk)
                yield pb.UploadLoggedModelArtifactRequest(chunk=chunk)
            yield pb.UploadLoggedModelArtifactRequest(
                trailer=pb.UploadArtifactTrailer(sha256=digest.hexdigest())
            )

        reply = invoke_client_stream(
            self._stub.UploadLoggedModelArtifact, requests(), self._transfer_timeout
        )
        if reply.sha256 != digest.hexdigest():
            raise DataLossError(
                f"the sidecar stored sha256 {reply.sha256} for {target}, sent {digest.hexdigest()}"
            )
        return ArtifactInfo(
            path=reply.artifact_path, size_bytes=reply.size_bytes, sha256=reply.sha256
        )

    def list_artifacts(
        self,
        model_id: str,
        path: str = "",
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[FileInfo]:
        """One page of the model's files directly under `path`, sorted by path."""
        request = pb.ListLoggedModelArtifactsRequest(
            model_id=model_id, path=path, page_size=page_size, page_token=page_token
        )
        reply = invoke(self._stub.ListLoggedModelArtifacts, request, self._timeout)
        return Page(tuple(conv.file_info_from_pb(f) for f in reply.files), reply.next_page_token)

    def download_artifact(self, model_id: str, artifact_path: str, dst_dir: StrPath) -> Path:
        """Download one of the model's files to `dst_dir/artifact_path`, verified by size
        and sha256 before it appears there (DataLossError otherwise)."""
        check_relative_path("artifact_path", artifact_path)
        return self._download(model_id, artifact_path, Path(dst_dir))

    def _download_once(self, model_id: str, artifact_path: str, dst_dir: Path) -> Path:
        final = dst_dir.joinpath(*artifact_path.split("/"))
        request = pb.DownloadLoggedModelArtifactRequest(
            model_id=model_id,
            artifact_path=artifact_path,
            max_chunk_bytes=self._download_chunk_bytes,
        )
        call = self._stub.DownloadLoggedModelArtifact(request, timeout=self._transfer_timeout)
        try:
            first = next(call, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise DataLossError(f"{artifact_path}: the sidecar sent no header")
            size = first.header.size_bytes
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(final.parent)
            partial = partial_path(final)
            with HashingWriter(partial, size, None, what=artifact_path) as writer, claimed(partial):
                trailer = ""
                for message in call:
                    kind = message.WhichOneof("payload")
                    if trailer or kind not in ("chunk", "trailer"):
                        raise DataLossError(
                            f"{artifact_path}: the sidecar sent a {kind} out of order"
                        )
                    if kind == "trailer":
                        trailer = message.trailer.sha256
                        if not trailer:
                            raise DataLossError(f"{artifact_path}: the trailer carries no sha256")
                        continue
                    writer.write(message.chunk)
                if not trailer:
                    raise DataLossError(f"{artifact_path}: the download ended without a trailer")
                writer.finish(trailer)
                os.replace(partial, final)
        finally:
            call.cancel()
        return final
