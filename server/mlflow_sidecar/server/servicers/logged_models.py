"""The logged model RPCs of ExperimentTrackingService: conversion only."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.errors import CancelledError
from mlflow_sidecar.core.logged_models import (
    dataset_from_pb,
    logged_model_to_pb,
    status_from_pb,
)
from mlflow_sidecar.server.idempotency import RequestLedger
from mlflow_sidecar.server.idempotency.uploads import UploadOnce
from mlflow_sidecar.server.servicers import streams
from mlflow_sidecar.server.services.logged_models import LoggedModelService, model_id
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import tracking_pb2 as pb

# The ledger's name for this RPC's outcomes: the interceptor names the unary ones so.
_UPLOAD_LOGGED_MODEL_ARTIFACT = (
    "/mlflow_sidecar.v1.ExperimentTrackingService/UploadLoggedModelArtifact"
)


def _as_artifact_upload(
    requests: Iterator[pb.UploadLoggedModelArtifactRequest],
) -> Iterator[pb.UploadArtifactRequest]:
    """An UploadLoggedModelArtifact stream in the framing of UploadArtifact, which the
    upload receiver reads and verifies (the model id takes the run id's place)."""
    for request in requests:
        kind = request.WhichOneof("payload")
        if kind == "header":
            header = request.header
            model_id("header.model_id", header.model_id)
            yield pb.UploadArtifactRequest(
                header=pb.UploadArtifactHeader(
                    run_id=header.model_id,
                    artifact_path=header.artifact_path,
                    size_bytes=header.size_bytes,
                    sha256=header.sha256,
                    request_id=header.request_id,
                )
            )
        elif kind == "chunk":
            yield pb.UploadArtifactRequest(chunk=request.chunk)
        elif kind == "trailer":
            yield pb.UploadArtifactRequest(trailer=request.trailer)
        else:
            yield pb.UploadArtifactRequest()


def _as_model_download(
    messages: Iterator[pb.DownloadArtifactResponse],
) -> Iterator[pb.DownloadLoggedModelArtifactResponse]:
    for message in messages:
        kind = message.WhichOneof("payload")
        if kind == "header":
            yield pb.DownloadLoggedModelArtifactResponse(header=message.header)
        elif kind == "chunk":
            yield pb.DownloadLoggedModelArtifactResponse(chunk=message.chunk)
        else:
            yield pb.DownloadLoggedModelArtifactResponse(trailer=message.trailer)


class LoggedModelRpcs:
    """The logged model half of the tracking servicer."""

    def __init__(
        self,
        logged_models: LoggedModelService,
        staging: Staging,
        ledger: RequestLedger | None = None,
    ) -> None:
        self._logged_models = logged_models
        self._model_staging = staging
        self._model_uploads = UploadOnce(ledger, _UPLOAD_LOGGED_MODEL_ARTIFACT)

    def CreateLoggedModel(
        self, request: pb.CreateLoggedModelRequest, context: grpc.ServicerContext
    ) -> pb.CreateLoggedModelResponse:
        model = self._logged_models.create(
            request.experiment_id,
            name=request.name,
            model_type=request.model_type,
            source_run_id=request.source_run_id,
            params=dict(request.params),
            tags=dict(request.tags),
        )
        return pb.CreateLoggedModelResponse(model=logged_model_to_pb(model))

    def GetLoggedModel(
        self, request: pb.GetLoggedModelRequest, context: grpc.ServicerContext
    ) -> pb.GetLoggedModelResponse:
        model = self._logged_models.get(request.model_id)
        return pb.GetLoggedModelResponse(model=logged_model_to_pb(model))

    def SearchLoggedModels(
        self, request: pb.SearchLoggedModelsRequest, context: grpc.ServicerContext
    ) -> pb.SearchLoggedModelsResponse:
        page = self._logged_models.search(
            list(request.experiment_ids),
            filter_string=request.filter,
            order_by=[(o.field_name, o.ascending) for o in request.order_by],
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.SearchLoggedModelsResponse(
            models=[logged_model_to_pb(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    def FinalizeLoggedModel(
        self, request: pb.FinalizeLoggedModelRequest, context: grpc.ServicerContext
    ) -> pb.FinalizeLoggedModelResponse:
        model = self._logged_models.finalize(request.model_id, status_from_pb(request.status))
        return pb.FinalizeLoggedModelResponse(model=logged_model_to_pb(model))

    def SetLoggedModelTags(
        self, request: pb.SetLoggedModelTagsRequest, context: grpc.ServicerContext
    ) -> pb.SetLoggedModelTagsResponse:
        self._logged_models.set_tags(request.model_id, dict(request.tags))
        return pb.SetLoggedModelTagsResponse()

    def DeleteLoggedModelTag(
        self, request: pb.DeleteLoggedModelTagRequest, context: grpc.ServicerContext
    ) -> pb.DeleteLoggedModelTagResponse:
        self._logged_models.delete_tag(request.model_id, request.key)
        return pb.DeleteLoggedModelTagResponse()

    def LogModelOutputs(
        self, request: pb.LogModelOutputsRequest, context: grpc.ServicerContext
    ) -> pb.LogModelOutputsResponse:
        self._logged_models.log_outputs(
            request.run_id, [(m.model_id, m.step) for m in request.models]
        )
        return pb.LogModelOutputsResponse()

    def LogRunInputs(
        self, request: pb.LogRunInputsRequest, context: grpc.ServicerContext
    ) -> pb.LogRunInputsResponse:
        self._logged_models.log_inputs(
            request.run_id,
            [dataset_from_pb(d) for d in request.datasets],
            list(request.model_ids),
        )
        return pb.LogRunInputsResponse()

    def UploadLoggedModelArtifact(
        self,
        request_iterator: Iterator[pb.UploadLoggedModelArtifactRequest],
        context: grpc.ServicerContext,
    ) -> pb.UploadLoggedModelArtifactResponse:
        staging = self._model_staging
        with staging.directory("upload") as scratch:
            staged = streams.receive_artifact(
                _as_artifact_upload(request_iterator),
                scratch,
                staging,
                self._logged_models.begin_upload,
                self._model_uploads,
            )
            try:
                staging.count("upload", staged.size_bytes)
                if not context.is_active():
                    raise CancelledError("the client cancelled the upload")
                staged.sink.store(staged.local_path)
            finally:
                staged.sink.abort()  # a no-op once stored
        return pb.UploadLoggedModelArtifactResponse(
            artifact_path=staged.artifact_path, size_bytes=staged.size_bytes, sha256=staged.sha256
        )

    def ListLoggedModelArtifacts(
        self, request: pb.ListLoggedModelArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListLoggedModelArtifactsResponse:
        page = self._logged_models.list_artifacts(
            request.model_id,
            request.path,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListLoggedModelArtifactsResponse(
            files=[conv.file_info_to_pb(f) for f in page.items],
            next_page_token=page.next_page_token,
        )

    def DownloadLoggedModelArtifact(
        self, request: pb.DownloadLoggedModelArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadLoggedModelArtifactResponse]:
        staging = self._model_staging
        chunk_bytes = streams.download_chunk_bytes(request.max_chunk_bytes, staging)
        with staging.directory("download") as scratch:
            context.add_callback(lambda: staging.remove(scratch))
            source = self._logged_models.open_download(
                request.model_id, request.artifact_path, scratch
            )
            yield from staging.counted(
                "download",
                _as_model_download(
                    streams.artifact_messages(
                        request.artifact_path, source.size_bytes, source.chunks, chunk_bytes
                    )
                ),
            )
