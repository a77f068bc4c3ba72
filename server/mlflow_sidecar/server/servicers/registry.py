"""ModelRegistryService servicer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeAlias

import grpc

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import ModelVersion, WatchStatus
from mlflow_sidecar.server.idempotency import check_request_id, fingerprint
from mlflow_sidecar.server.servicers import streams
from mlflow_sidecar.server.servicers.tracking import ensure_active
from mlflow_sidecar.server.services.alias_watch import AliasWatchService
from mlflow_sidecar.server.services.model_downloads import ModelDownloads
from mlflow_sidecar.server.services.registry import RegistryService, check_model_upload
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc

Ctx: TypeAlias = grpc.ServicerContext


def _check_header(header: pb.UploadModelHeader) -> None:
    check_request_id("header.request_id", header.request_id)
    check_model_upload(
        header.name,
        run_id=header.run_id,
        experiment_id=header.experiment_id,
        description=header.description,
        tags=dict(header.tags),
        aliases=list(header.aliases),
        fields="header.",
    )


class RegistryServicer(pb_grpc.ModelRegistryServiceServicer):
    """Converts requests to port calls and results to responses; streamed files pass
    through `staging` on disk, downloaded models through the model cache."""

    def __init__(
        self,
        service: RegistryService,
        staging: Staging,
        downloads: ModelDownloads,
        watches: AliasWatchService,
    ) -> None:
        self._service = service
        self._staging = staging
        self._downloads = downloads
        self._watches = watches

    def CreateRegisteredModel(
        self, request: pb.CreateRegisteredModelRequest, context: Ctx
    ) -> pb.CreateRegisteredModelResponse:
        model = self._service.create_registered_model(
            request.name,
            description=request.description,
            tags=dict(request.tags),
            get_if_exists=request.get_if_exists,
            request_id=request.request_id,
        )
        return pb.CreateRegisteredModelResponse(registered_model=conv.registered_model_to_pb(model))

    def GetRegisteredModel(
        self, request: pb.GetRegisteredModelRequest, context: Ctx
    ) -> pb.GetRegisteredModelResponse:
        model = self._service.get_registered_model(request.name)
        return pb.GetRegisteredModelResponse(registered_model=conv.registered_model_to_pb(model))

    def SearchRegisteredModels(
        self, request: pb.SearchRegisteredModelsRequest, context: Ctx
    ) -> pb.SearchRegisteredModelsResponse:
        page = self._service.search_registered_models(
            filter_string=request.filter,
            order_by=list(request.order_by),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.SearchRegisteredModelsResponse(
            registered_models=[conv.registered_model_to_pb(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    def UpdateRegisteredModel(
        self, request: pb.UpdateRegisteredModelRequest, context: Ctx
    ) -> pb.UpdateRegisteredModelResponse:
        model = self._service.update_registered_model(request.name, description=request.description)
        return pb.UpdateRegisteredModelResponse(registered_model=conv.registered_model_to_pb(model))

    def RenameRegisteredModel(
        self, request: pb.RenameRegisteredModelRequest, context: Ctx
    ) -> pb.RenameRegisteredModelResponse:
        model = self._service.rename_registered_model(
            request.name, request.new_name, request_id=request.request_id
        )
        return pb.RenameRegisteredModelResponse(registered_model=conv.registered_model_to_pb(model))

    def DeleteRegisteredModel(
        self, request: pb.DeleteRegisteredModelRequest, context: Ctx
    ) -> pb.DeleteRegisteredModelResponse:
        self._service.delete_registered_model(request.name, request_id=request.request_id)
        return pb.DeleteRegisteredModelResponse()

    def SetRegisteredModelTag(
        self, request: pb.SetRegisteredModelTagRequest, context: Ctx
    ) -> pb.SetRegisteredModelTagResponse:
        self._service.set_registered_model_tag(request.name, request.key, request.value)
        return pb.SetRegisteredModelTagResponse()

    def DeleteRegisteredModelTag(
        self, request: pb.DeleteRegisteredModelTagRequest, context: Ctx
    ) -> pb.DeleteRegisteredModelTagResponse:
        self._service.delete_registered_model_tag(
            request.name, request.key, request_id=request.request_id
        )
        return pb.DeleteRegisteredModelTagResponse()

    def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: Ctx
    ) -> pb.CreateModelVersionResponse:
        version = self._service.create_model_version(
            request.name,
            source=request.source,
            run_id=request.run_id,
            artifact_path=request.artifact_path,
            description=request.description,
            tags=dict(request.tags),
            request_id=request.request_id,
        )
        return pb.CreateModelVersionResponse(model_version=conv.model_version_to_pb(version))

    def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: Ctx
    ) -> pb.GetModelVersionResponse:
        version = self._service.get_model_version(request.name, request.version)
        return pb.GetModelVersionResponse(model_version=conv.model_version_to_pb(version))

    def GetModelVersionByAlias(
        self, request: pb.GetModelVersionByAliasRequest, context: Ctx
    ) -> pb.GetModelVersionByAliasResponse:
        version = self._service.get_model_version_by_alias(request.name, request.alias)
        return pb.GetModelVersionByAliasResponse(model_version=conv.model_version_to_pb(version))

    def GetLatestModelVersion(
        self, request: pb.GetLatestModelVersionRequest, context: Ctx
    ) -> pb.GetLatestModelVersionResponse:
        version = self._service.get_latest_model_version(request.name)
        return pb.GetLatestModelVersionResponse(model_version=conv.model_version_to_pb(version))

    def SearchModelVersions(
        self, request: pb.SearchModelVersionsRequest, context: Ctx
    ) -> pb.SearchModelVersionsResponse:
        page = self._service.search_model_versions(
            filter_string=request.filter,
            order_by=list(request.order_by),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.SearchModelVersionsResponse(
            model_versions=[conv.model_version_to_pb(v) for v in page.items],
            next_page_token=page.next_page_token,
        )

    def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: Ctx
    ) -> pb.UpdateModelVersionResponse:
        version = self._service.update_model_version(
            request.name, request.version, description=request.description
        )
        return pb.UpdateModelVersionResponse(model_version=conv.model_version_to_pb(version))

    def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: Ctx
    ) -> pb.DeleteModelVersionResponse:
        self._service.delete_model_version(
            request.name, request.version, request_id=request.request_id
        )
        return pb.DeleteModelVersionResponse()

    def SetModelVersionTag(
        self, request: pb.SetModelVersionTagRequest, context: Ctx
    ) -> pb.SetModelVersionTagResponse:
        self._service.set_model_version_tag(
            request.name, request.version, request.key, request.value
        )
        return pb.SetModelVersionTagResponse()

    def DeleteModelVersionTag(
        self, request: pb.DeleteModelVersionTagRequest, context: Ctx
    ) -> pb.DeleteModelVersionTagResponse:
        self._service.delete_model_version_tag(
            request.name, request.version, request.key, request_id=request.request_id
        )
        return pb.DeleteModelVersionTagResponse()

    def SetModelAlias(
        self, request: pb.SetModelAliasRequest, context: Ctx
    ) -> pb.SetModelAliasResponse:
        self._service.set_model_alias(request.name, request.alias, request.version)
        return pb.SetModelAliasResponse()

    def DeleteModelAlias(
        self, request: pb.DeleteModelAliasRequest, context: Ctx
    ) -> pb.DeleteModelAliasResponse:
        self._service.delete_model_alias(request.name, request.alias, request_id=request.request_id)
        return pb.DeleteModelAliasResponse()

    def UploadModel(
        self, request_iterator: Iterator[pb.UploadModelRequest], context: Ctx
    ) -> pb.UploadModelResponse:
        header, messages = streams.model_header(request_iterator, self._staging)
        _check_header(header)

        def upload() -> ModelVersion:
            with self._staging.directory("upload-model") as scratch:
                staged = streams.receive_model(header, messages, scratch, self._staging)
                self._staging.count("upload", staged.size_bytes)
                ensure_active(context)
                return self._service.upload_model(
                    staged.name,
                    staged.root,
                    run_id=staged.run_id,
                    experiment_id=staged.experiment_id,
                    description=staged.description,
                    tags=staged.tags,
                    aliases=staged.aliases,
                    request_id=staged.request_id,
                )

        # A retry of an upload that already took effect is answered from its header: the
        # client's remaining messages are dropped.
        version = self._service.upload_once(
            header.name,
            header.request_id,
            fingerprint(header),
            upload,
            run_id=header.run_id,
            experiment_id=header.experiment_id,
            description=header.description,
            tags=dict(header.tags),
            aliases=list(header.aliases),
        )
        return pb.UploadModelResponse(model_version=conv.model_version_to_pb(version))

    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: Ctx
    ) -> Iterator[pb.DownloadModelResponse]:
        selector = request.WhichOneof("selector")
        chunk_bytes = streams.download_chunk_bytes(request.max_chunk_bytes, self._staging)
        download = self._downloads.open(
            request.name,
            version=request.version if selector == "version" else None,
            alias=request.alias if selector == "alias" else None,
            if_none_match=request.if_none_match,
            accept_cache_entry=request.accept_cache_entry,
        )
        lease = download.lease
        if lease is None:
            yield streams.unchanged_message(download.version, download.digest, self._staging)
            return
        # A cancelled call may never resume this generator: release when the call ends
        # (at once when it ended while the download waited for another's fetch).
        if not context.add_callback(lease.release):
            lease.release()
            return
        try:
            yield from self._staging.counted(
                "download",
                streams.model_messages(
                    download.version,
                    lease,
                    self._staging,
                    cache_entry=download.cache_entry,
                    chunk_bytes=chunk_bytes,
                ),
            )
        finally:
            lease.release()

    def WatchModelAlias(
        self, request: pb.WatchModelAliasRequest, context: Ctx
    ) -> Iterator[pb.WatchModelAliasResponse]:
        watch = self._watches.watch(
            request.name, list(request.aliases), dict(request.last_seen_versions)
        )
        # A cancelled call may never resume this generator, which waits for news: the
        # callback wakes it and frees the watcher (False: the call has ended already).
        if not context.add_callback(watch.close):
            watch.close()
        for event in watch.events():
            if isinstance(event, WatchStatus):
                yield pb.WatchModelAliasResponse(status=conv.watch_status_to_pb(event))
            else:
                yield pb.WatchModelAliasResponse(change=conv.alias_change_to_pb(event))
