"""`GrpcModelRegistry`: the `ModelRegistry` port over the sidecar's gRPC API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow_sidecar.client import conversions as conv
from mlflow_sidecar.client.domain import DEFAULT_PAGE_SIZE, ModelVersion, Page, RegisteredModel
from mlflow_sidecar.client.grpc_tracking import invoke
from mlflow_sidecar.client.ports import ModelRegistry
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc


class GrpcModelRegistry(ModelRegistry):
    """The model registry through a sidecar; every call carries `timeout_s` as its deadline."""

    def __init__(self, stub: pb_grpc.ModelRegistryServiceStub, timeout_s: float = 30.0) -> None:
        self._stub = stub
        self._timeout = timeout_s

    def create_registered_model(
        self,
        name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        get_if_exists: bool = False,
    ) -> RegisteredModel:
        request = pb.CreateRegisteredModelRequest(
            name=name, description=description, tags=dict(tags or {}), get_if_exists=get_if_exists
        )
        reply = invoke(self._stub.CreateRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def get_registered_model(self, name: str) -> RegisteredModel:
        request = pb.GetRegisteredModelRequest(name=name)
        reply = invoke(self._stub.GetRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def search_registered_models(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegisteredModel]:
        request = pb.SearchRegisteredModelsRequest(
            filter=filter_string,
            order_by=list(order_by),
            page_size=page_size,
            page_token=page_token,
        )
        reply = invoke(self._stub.SearchRegisteredModels, request, self._timeout)
        return Page(
            tuple(conv.registered_model_from_pb(m) for m in reply.registered_models),
            reply.next_page_token,
        )

    def update_registered_model(self, name: str, *, description: str) -> RegisteredModel:
        request = pb.UpdateRegisteredModelRequest(name=name, description=description)
        reply = invoke(self._stub.UpdateRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def rename_registered_model(self, name: str, new_name: str) -> RegisteredModel:
        request = pb.RenameRegisteredModelRequest(name=name, new_name=new_name)
        reply = invoke(self._stub.RenameRegisteredModel, request, self._timeout)
        return conv.registered_model_from_pb(reply.registered_model)

    def delete_registered_model(self, name: str) -> None:
        invoke(
            self._stub.DeleteRegisteredModel,
            pb.DeleteRegisteredModelRequest(name=name),
            self._timeout,
        )

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        request = pb.SetRegisteredModelTagRequest(name=name, key=key, value=value)
        invoke(self._stub.SetRegisteredModelTag, request, self._timeout)

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        request = pb.DeleteRegisteredModelTagRequest(name=name, key=key)
        invoke(self._stub.DeleteRegisteredModelTag, request, self._timeout)

    def create_model_version(
        self,
        name: str,
        *,
        source: str = "",
        run_id: str = "",
        artifact_path: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
    ) -> ModelVersion:
        request = pb.CreateModelVersionRequest(
            name=name,
            source=source,
            run_id=run_id,
            artifact_path=artifact_path,
            description=description,
            tags=dict(tags or {}),
        )
        reply = invoke(self._stub.CreateModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_model_version(self, name: str, version: int) -> ModelVersion:
        request = pb.GetModelVersionRequest(name=name, version=version)
        reply = invoke(self._stub.GetModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        request = pb.GetModelVersionByAliasRequest(name=name, alias=alias)
        reply = invoke(self._stub.GetModelVersionByAlias, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def get_latest_model_version(self, name: str) -> ModelVersion:
        request = pb.GetLatestModelVersionRequest(name=name)
        reply = invoke(self._stub.GetLatestModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def search_model_versions(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[ModelVersion]:
        request = pb.SearchModelVersionsRequest(
            filter=filter_string,
            order_by=list(order_by),
            page_size=page_size,
            page_token=page_token,
        )
        reply = invoke(self._stub.SearchModelVersions, request, self._timeout)
        return Page(
            tuple(conv.model_version_from_pb(v) for v in reply.model_versions),
            reply.next_page_token,
        )

    def update_model_version(self, name: str, version: int, *, description: str) -> ModelVersion:
        request = pb.UpdateModelVersionRequest(name=name, version=version, description=description)
        reply = invoke(self._stub.UpdateModelVersion, request, self._timeout)
        return conv.model_version_from_pb(reply.model_version)

    def delete_model_version(self, name: str, version: int) -> None:
        request = pb.DeleteModelVersionRequest(name=name, version=version)
        invoke(self._stub.DeleteModelVersion, request, self._timeout)

    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        request = pb.SetModelVersionTagRequest(name=name, version=version, key=key, value=value)
        invoke(self._stub.SetModelVersionTag, request, self._timeout)

    def delete_model_version_tag(self, name: str, version: int, key: str) -> None:
        request = pb.DeleteModelVersionTagRequest(name=name, version=version, key=key)
        invoke(self._stub.DeleteModelVersionTag, request, self._timeout)

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        request = pb.SetModelAliasRequest(name=name, alias=alias, version=version)
        invoke(self._stub.SetModelAlias, request, self._timeout)

    def delete_model_alias(self, name: str, alias: str) -> None:
        request = pb.DeleteModelAliasRequest(name=name, alias=alias)
        invoke(self._stub.DeleteModelAlias, request, self._timeout)
