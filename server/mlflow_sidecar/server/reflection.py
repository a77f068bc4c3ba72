"""Server reflection as `grpc.reflection.v1` and as the older `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha. v1 is the same protocol under another package name
(its messages are v1alpha's, field for field), so one servicer answers both: the v1
service is registered with v1alpha's wire-identical message classes, and a v1 file
descriptor, derived from v1alpha's, joins the default pool so that reflection can
describe itself under both names. grpcurl asks v1 first and falls back to v1alpha.

The sidecar's own files are described with their comments (what a field means, what
leaving it out means, which status a case gives): protobuf's runtime keeps no comments,
so they come from the descriptor set generated beside the stubs, and a file in it is
served only where it describes the very contract the stubs were generated from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

_log = logging.getLogger(__name__)

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_METHOD = f"/{V1_SERVICE_NAME}/ServerReflectionInfo"
# Written by scripts/generate.sh (protoc --include_source_info) beside the stubs.
DESCRIPTOR_SET = "descriptors.binpb"


def _renamed(type_name: str) -> str:
    old = f".{reflection_pb2.DESCRIPTOR.package}."
    return (
        f".{V1_PACKAGE}." + type_name.removeprefix(old) if type_name.startswith(old) else type_name
    )


def register_v1_descriptor() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool (once per process)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = _renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def _served(name: str) -> descriptor_pb2.FileDescriptorProto | None:
    """The file as reflection serves it from the default pool (None: not loaded)."""
    try:
        found = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        return None
    proto = descriptor_pb2.FileDescriptorProto()
    found.CopyToProto(proto)
    return proto


def _contract_of(proto: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """`proto` without what the runtime does not keep (comments, JSON names)."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(proto)
    bare.ClearField("source_code_info")
    pending = list(bare.message_type)
    while pending:
        message = pending.pop()
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
        pending.extend(message.nested_type)
    for field in bare.extension:
        field.ClearField("json_name")
    return bare


def descriptor_set(package: str = "mlflow_sidecar.v1") -> descriptor_pb2.FileDescriptorSet:
    """The descriptor set generated beside `package`'s stubs (empty when unreadable)."""
    try:
        data = resources.files(package).joinpath(DESCRIPTOR_SET).read_bytes()
        return descriptor_pb2.FileDescriptorSet.FromString(data)
    except (OSError, ModuleNotFoundError, DecodeError) as exc:
        _log.warning("reflection describes the contract without comments: %s", exc)
        return descriptor_pb2.FileDescriptorSet()


def commented_files(described: descriptor_pb2.FileDescriptorSet) -> dict[bytes, bytes]:
    """For each file of `described` that describes the loaded stubs: the bytes reflection
    would serve for it -> the same file with its comments. A file that differs (a
    descriptor set older than the stubs) keeps its bare form, with a warning."""
    commented: dict[bytes, bytes] = {}
    for file in described.file:
        served = _served(file.name)
        if served is None:
            continue
        if _contract_of(file) != served:
            _log.warning(
                "reflection describes %s without comments: %s does not match the stubs",
                file.name,
                DESCRIPTOR_SET,
            )
            continue
        with_comments = descriptor_pb2.FileDescriptorProto()
        with_comments.CopyFrom(served)
        with_comments.source_code_info.CopyFrom(file.source_code_info)
        commented[served.SerializeToString()] = with_comments.SerializeToString()
    return commented


def _is_method(service: str, method: str) -> bool:
    try:
        found = descriptor_pool.Default().FindServiceByName(service)
    except KeyError:
        return False
    return method in found.methods_by_name


class _CommentedReflection(reflection.ReflectionServicer):  # type: ignore[misc]
    """grpcio-reflection's servicer, its answers' files swapped for their commented form,
    and a method found by its name too."""

    def __init__(self, service_names: Iterable[str], commented: Mapping[bytes, bytes]) -> None:
        super().__init__(tuple(service_names))
        self._commented = commented

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        # protobuf's runtime pool finds no method by name, so `grpcurl describe
        # Service.Method` would be "not found": a method is in its service's file.
        response = super()._file_containing_symbol(request, fully_qualified_name)
        service, _, method = fully_qualified_name.rpartition(".")
        if response.HasField("error_response") and _is_method(service, method):
            response = super()._file_containing_symbol(request, service)
        return response

    def ServerReflectionInfo(  # noqa: N802 - the RPC's name
        self, request_iterator: Iterator[reflection_pb2.ServerReflectionRequest], context: object
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response") and self._commented:
                files = response.file_descriptor_response.file_descriptor_proto
                files[:] = [self._commented.get(file, file) for file in files]
            yield response


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection (v1 and v1alpha) listing `service_names` and both reflection
    services, the sidecar's own files with their comments."""
    register_v1_descriptor()
    servicer = _CommentedReflection(
        (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME), commented_files(descriptor_set())
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))
