"""ExperimentTrackingService servicer."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.conversions import (
    ACCEPTED_POINTS_METADATA,
    MAX_MESSAGE_POINTS_METADATA,
    SERIES_COLUMNS_METADATA,
    SERIES_COLUMNS_READ,
)
from mlflow_sidecar.core.domain import RunStatus
from mlflow_sidecar.core.errors import CancelledError, InvalidArgumentError
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.idempotency import RequestLedger
from mlflow_sidecar.server.idempotency.uploads import UploadOnce
from mlflow_sidecar.server.metric_batch import MetricBatch
from mlflow_sidecar.server.servicers import streams
from mlflow_sidecar.server.servicers.logged_models import LoggedModelRpcs
from mlflow_sidecar.server.services.artifact_transfers import ArtifactTransfers
from mlflow_sidecar.server.services.logged_models import LoggedModelService
from mlflow_sidecar.server.services.tracking import TrackingService
from mlflow_sidecar.server.staging import Staging
from mlflow_sidecar.server.stream_shutdown import StreamShutdown, stream_shut_down
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

# The ledger's name for this RPC's outcomes: the interceptor names the unary ones so.
_UPLOAD_ARTIFACT = "/mlflow_sidecar.v1.ExperimentTrackingService/UploadArtifact"
_LOG_METRICS = "/mlflow_sidecar.v1.ExperimentTrackingService/LogMetrics"


def ensure_active(context: grpc.ServicerContext) -> None:
    """Refuse to store an upload whose caller has gone away meanwhile."""
    if not context.is_active():
        raise CancelledError("the client cancelled the upload")


class TrackingServicer(LoggedModelRpcs, pb_grpc.ExperimentTrackingServiceServicer):
    """Converts requests to port calls and results to responses; artifact bytes go
    through `transfers` as they arrive (staged on disk only for stores that take files)."""

    def __init__(
        self,
        service: TrackingService,
        transfers: ArtifactTransfers,
        staging: Staging,
        logged_models: LoggedModelService,
        ledger: RequestLedger | None = None,
        *,
        shutdown: StreamShutdown | None = None,
    ) -> None:
        LoggedModelRpcs.__init__(self, logged_models, staging, ledger)
        self._service = service
        self._shutdown = shutdown or StreamShutdown()
        self._transfers = transfers
        self._staging = staging
        self._uploads = UploadOnce(ledger, _UPLOAD_ARTIFACT)
        self._ledger = ledger

    def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context: grpc.ServicerContext
    ) -> pb.CreateExperimentResponse:
        exp = self._service.create_experiment(
            request.name,
            tags=dict(request.tags),
            artifact_location=request.artifact_location,
            get_if_exists=request.get_if_exists,
            request_id=request.request_id,
        )
        return pb.CreateExperimentResponse(experiment=conv.experiment_to_pb(exp))

    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.ServicerContext
    ) -> pb.GetExperimentResponse:
        selector = request.WhichOneof("selector")
        if selector == "experiment_id":
            exp = self._service.get_experiment(request.experiment_id)
        elif selector == "name":
            exp = self._service.get_experiment_by_name(request.name)
        else:
            raise InvalidArgumentError("selector", "set experiment_id or name")
        return pb.GetExperimentResponse(experiment=conv.experiment_to_pb(exp))

    def SearchExperiments(
        self, request: pb.SearchExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.SearchExperimentsResponse:
        page = self._service.search_experiments(
            filter_string=request.filter,
            order_by=list(request.order_by),
            page_size=request.page_size,
            page_token=request.page_token,
            view_type=conv.view_type_from_pb(request.view_type),
        )
        return pb.SearchExperimentsResponse(
            experiments=[conv.experiment_to_pb(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    def DeleteExperiment(
        self, request: pb.DeleteExperimentRequest, context: grpc.ServicerContext
    ) -> pb.DeleteExperimentResponse:
        self._service.delete_experiment(request.experiment_id, request_id=request.request_id)
        return pb.DeleteExperimentResponse()

    def RestoreExperiment(
        self, request: pb.RestoreExperimentRequest, context: grpc.ServicerContext
    ) -> pb.RestoreExperimentResponse:
        exp = self._service.restore_experiment(request.experiment_id)
        return pb.RestoreExperimentResponse(experiment=conv.experiment_to_pb(exp))

    def StartRun(
        self, request: pb.StartRunRequest, context: grpc.ServicerContext
    ) -> pb.StartRunResponse:
        run = self._service.start_run(
            request.experiment_id,
            run_name=request.run_name,
            tags=dict(request.tags),
            parent_run_id=request.parent_run_id,
            start_time_ms=request.start_time_ms,
            client_request_id=request.client_request_id,
            request_id=request.request_id,
        )
        return pb.StartRunResponse(run=conv.run_to_pb(run))

    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=conv.run_to_pb(self._service.get_run(request.run_id)))

    def SearchRuns(
        self, request: pb.SearchRunsRequest, context: grpc.ServicerContext
    ) -> pb.SearchRunsResponse:
        page = self._service.search_runs(
            list(request.experiment_ids),
            filter_string=request.filter,
            order_by=list(request.order_by),
            page_size=request.page_size,
            page_token=request.page_token,
            view_type=conv.view_type_from_pb(request.view_type),
        )
        return pb.SearchRunsResponse(
            runs=[conv.run_to_pb(r) for r in page.items], next_page_token=page.next_page_token
        )

    def EndRun(self, request: pb.EndRunRequest, context: grpc.ServicerContext) -> pb.EndRunResponse:
        if request.status == pb.RUN_STATUS_UNSPECIFIED:
            status = RunStatus.FINISHED
        elif (known := conv.run_status_from_pb(request.status)) is not None:
            status = known
        else:
            raise InvalidArgumentError("status", f"unknown run status {request.status}")
        # Repeats of a request id are answered by the ledger before they get here.
        run, pending = self._service.end_run_with_pending(
            request.run_id,
            status,
            end_time_ms=request.end_time_ms,
            wait_for_delivery=request.wait_for_delivery,
        )
        return pb.EndRunResponse(run=conv.run_to_pb(run), pending_points=pending)

    def DeleteRun(
        self, request: pb.DeleteRunRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRunResponse:
        self._service.delete_run(request.run_id, request_id=request.request_id)
        return pb.DeleteRunResponse()

    def RestoreRun(
        self, request: pb.RestoreRunRequest, context: grpc.ServicerContext
    ) -> pb.RestoreRunResponse:
        return pb.RestoreRunResponse(run=conv.run_to_pb(self._service.restore_run(request.run_id)))

    def ResumeRun(
        self, request: pb.ResumeRunRequest, context: grpc.ServicerContext
    ) -> pb.ResumeRunResponse:
        return pb.ResumeRunResponse(run=conv.run_to_pb(self._service.resume_run(request.run_id)))

    def LogParams(
        self, request: pb.LogParamsRequest, context: grpc.ServicerContext
    ) -> pb.LogParamsResponse:
        self._service.log_params(request.run_id, dict(request.params))
        return pb.LogParamsResponse()

    def LogMetrics(
        self, request: pb.LogMetricsRequest, context: grpc.ServicerContext
    ) -> pb.LogMetricsResponse:
        # A retry's points without a timestamp take the first try's stamp: MLflow ignores
        # a point it holds already, so what the first try sent is not logged twice.
        arrived = (
            self._ledger.first_seen(_LOG_METRICS, request.request_id)
            if self._ledger is not None and request.request_id
            else None
        )
        accepted = self._service.log_metrics(
            request.run_id, [conv.metric_from_pb(m) for m in request.metrics], arrived_ms=arrived
        )
        return pb.LogMetricsResponse(accepted_points=accepted)

    def StreamMetrics(
        self, request_iterator: Iterator[pb.StreamMetricsRequest], context: grpc.ServicerContext
    ) -> pb.StreamMetricsResponse:
        accepted = 0
        # Before the first message, so that a client can send the compact form from it on.
        context.send_initial_metadata(
            (
                (SERIES_COLUMNS_METADATA, SERIES_COLUMNS_READ),
                (MAX_MESSAGE_POINTS_METADATA, str(self._service.max_message_points)),
            )
        )
        try:
            for message in request_iterator:
                if self._shutdown.ending:
                    raise stream_shut_down(accepted)
                batch = MetricBatch.from_request(message.points, message.series)
                accepted += self._service.accept_metrics(batch)
        finally:
            # Tells a client whose stream failed midway how much of it is safe in the spool.
            context.set_trailing_metadata(((ACCEPTED_POINTS_METADATA, str(accepted)),))
        return pb.StreamMetricsResponse(accepted_points=accepted)

    def FlushMetrics(
        self, request: pb.FlushMetricsRequest, context: grpc.ServicerContext
    ) -> pb.FlushMetricsResponse:
        wait = (
            check.wait_seconds("max_wait_s", request.max_wait_s)
            if request.HasField("max_wait_s")
            else None
        )
        result = self._service.flush_metrics(request.run_id, timeout_s=wait)
        return pb.FlushMetricsResponse(
            pending_points=result.pending_points,
            dead_letter_points=result.dead_letter_points,
            pending_run_ends=result.pending_run_ends,
            held_run_ends=result.held_run_ends,
        )

    def SetRunTags(
        self, request: pb.SetRunTagsRequest, context: grpc.ServicerContext
    ) -> pb.SetRunTagsResponse:
        self._service.set_run_tags(request.run_id, dict(request.tags))
        return pb.SetRunTagsResponse()

    def DeleteRunTag(
        self, request: pb.DeleteRunTagRequest, context: grpc.ServicerContext
    ) -> pb.DeleteRunTagResponse:
        self._service.delete_run_tag(request.run_id, request.key, request_id=request.request_id)
        return pb.DeleteRunTagResponse()

    def GetMetricHistory(
        self, request: pb.GetMetricHistoryRequest, context: grpc.ServicerContext
    ) -> pb.GetMetricHistoryResponse:
        page = self._service.get_metric_history(
            request.run_id,
            request.metric_key,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.GetMetricHistoryResponse(
            metrics=[conv.metric_to_pb(m) for m in page.items],
            next_page_token=page.next_page_token,
        )

    def UploadArtifact(
        self, request_iterator: Iterator[pb.UploadArtifactRequest], context: grpc.ServicerContext
    ) -> pb.UploadArtifactResponse:
        with self._staging.directory("upload") as scratch:
            staged = streams.receive_artifact(
                request_iterator,
                scratch,
                self._staging,
                self._transfers.begin_upload,
                self._uploads,
            )
            upload = staged.sink
            try:
                self._staging.count("upload", staged.size_bytes)
                ensure_active(context)
                upload.store(staged.local_path)
            finally:
                upload.abort()
        return pb.UploadArtifactResponse(
            artifact_path=staged.artifact_path, size_bytes=staged.size_bytes, sha256=staged.sha256
        )

    def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListArtifactsResponse:
        page = self._service.list_artifacts(
            request.run_id, request.path, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListArtifactsResponse(
            files=[conv.file_info_to_pb(f) for f in page.items],
            next_page_token=page.next_page_token,
        )

    def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadArtifactResponse]:
        chunk_bytes = streams.download_chunk_bytes(request.max_chunk_bytes, self._staging)
        with self._staging.directory("download") as scratch:
            # A cancelled call may never resume this generator: clean up when the call ends.
            context.add_callback(lambda: self._staging.remove(scratch))
            source = self._transfers.open_download(request.run_id, request.artifact_path, scratch)
            context.add_callback(source.close)
            try:
                yield from self._staging.counted(
                    "download",
                    streams.artifact_messages(
                        request.artifact_path, source.size_bytes, source.chunks, chunk_bytes
                    ),
                )
            finally:
                source.close()
