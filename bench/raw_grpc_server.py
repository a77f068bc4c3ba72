"""A bare grpcio server: StreamMetrics only counts points, DownloadModel sends one file of
random bytes from memory in the sidecar's chunks. The transport's ceiling, both ways."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc

from mlflow_sidecar.core.limits import DEFAULT_CHUNK_BYTES
from mlflow_sidecar.v1 import registry_pb2 as reg_pb
from mlflow_sidecar.v1 import registry_pb2_grpc as reg_pb_grpc
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc


class CountingServicer(pb_grpc.ExperimentTrackingServiceServicer):
    def StreamMetrics(
        self, request_iterator: Iterator[pb.StreamMetricsRequest], context: grpc.ServicerContext
    ) -> pb.StreamMetricsResponse:
        return pb.StreamMetricsResponse(
            accepted_points=sum(
                len(m.points) + sum(len(s.values) for s in m.series) for m in request_iterator
            )
        )


class ChunkServicer(reg_pb_grpc.ModelRegistryServiceServicer):
    """DownloadModel of `version` MiB: a manifest, then 1 MiB chunks of one buffer."""

    def __init__(self) -> None:
        self._chunk = os.urandom(DEFAULT_CHUNK_BYTES)

    def DownloadModel(
        self, request: reg_pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[reg_pb.DownloadModelResponse]:
        size = request.version * len(self._chunk)
        yield reg_pb.DownloadModelResponse(
            manifest=reg_pb.ModelManifest(files=[reg_pb.ModelFile(path="raw.bin", size_bytes=size)])
        )
        for _ in range(request.version):
            yield reg_pb.DownloadModelResponse(
                chunk=reg_pb.ModelChunk(file_index=0, data=self._chunk)
            )


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(CountingServicer(), server)
    reg_pb_grpc.add_ModelRegistryServiceServicer_to_server(ChunkServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # runs until the benchmark closes our stdin
    server.stop(0)


if __name__ == "__main__":
    main()
