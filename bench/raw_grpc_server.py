"""A bare grpcio server for StreamMetrics that only counts points: the transport's ceiling."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures

import grpc

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


def main() -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    pb_grpc.add_ExperimentTrackingServiceServicer_to_server(CountingServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # runs until the benchmark closes our stdin
    server.stop(0)


if __name__ == "__main__":
    main()
