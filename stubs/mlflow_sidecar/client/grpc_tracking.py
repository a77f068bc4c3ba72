"""`GrpcExperimentTracking`: the `ExperimentTracking` port over the sidecar's gRPC API."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from mlflow_sidecar.client import conversions as conv
from mlflow_sidecar.client.domain import (
    DEFAULT_METRIC_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    Experiment,
    FlushResult,
    Metric,
    MetricPoint,
    Page,
    Run,
    RunStatus,
    ViewType,
)
from mlflow_sidecar.client.errors import error_from_rpc
from mlflow_sidecar.client.ports import ExperimentTracking
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def invoke(method: Callable[..., Resp], request: object, timeout: float | None) -> Resp:
    """Call a unary stub method with a deadline; failures become domain errors."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


class GrpcExperimentTracking(ExperimentTracking):
    """Experiment tracking through a sidecar. Every call carries `timeout_s` as its deadline;
    StartRun always carries a client_request_id, so a retried StartRun never makes two runs."""

    def __init__(
        self, stub: pb_grpc.ExperimentTrackingServiceStub, timeout_s: float = 30.0
    ) -> None:
        self._stub = stub
        self._timeout = timeout_s

    def create_experiment(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str = "",
        get_if_exists: bool = False,
    ) -> Experiment:
        request = pb.CreateExperimentRequest(
            name=name,
            tags=dict(tags or {}),
            artifact_location=artifact_location,
            get_if_exists=get_if_exists,
        )
        reply = invoke(self._stub.CreateExperiment, request, self._timeout)
        return conv.experiment_from_pb(reply.experiment)

    def get_experiment(self, experiment_id: str) -> Experiment:
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        return conv.experiment_from_pb(
            invoke(self._stub.GetExperiment, request, self._timeout).experiment
        )

    def get_experiment_by_name(self, name: str) -> Experiment:
        request = pb.GetExperimentRequest(name=name)
        return conv.experiment_from_pb(
            invoke(self._stub.GetExperiment, request, self._timeout).experiment
        )

    def search_experiments(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        view_type: ViewType = ViewType.ACTIVE_ONLY,
    ) -> Page[Experiment]:
        request = pb.SearchExperimentsRequest(
            filter=filter_string,
            order_by=list(order_by),
            page_size=page_size,
            page_token=page_token,
            view_type=conv.view_type_to_pb(view_type),
        )
        reply = invoke(self._stub.SearchExperiments, request, self._timeout)
        return Page(
            tuple(conv.experiment_from_pb(e) for e in reply.experiments), reply.next_page_token
        )

    def start_run(
        self,
        experiment_id: str,
        *,
        run_name: str = "",
        tags: Mapping[str, str] | None = None,
        parent_run_id: str = "",
        start_time_ms: int = 0,
        client_request_id: str = "",
    ) -> Run:
        request = pb.StartRunRequest(
            experiment_id=experiment_id,
            run_name=run_name,
            tags=dict(tags or {}),
            parent_run_id=parent_run_id,
            start_time_ms=start_time_ms,
            client_request_id=client_request_id or uuid.uuid4().hex,
        )
        return conv.run_from_pb(invoke(self._stub.StartRun, request, self._timeout).run)

    def get_run(self, run_id: str) -> Run:
        request = pb.GetRunRequest(run_id=run_id)
        return conv.run_from_pb(invoke(self._stub.GetRun, request, self._timeout).run)

    def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        view_type: ViewType = ViewType.ACTIVE_ONLY,
    ) -> Page[Run]:
        request = pb.SearchRunsRequest(
            experiment_ids=list(experiment_ids),
            filter=filter_string,
            order_by=list(order_by),
            page_size=page_size,
            page_token=page_token,
            view_type=conv.view_type_to_pb(view_type),
        )
        reply = invoke(self._stub.SearchRuns, request, self._timeout)
        return Page(tuple(conv.run_from_pb(r) for r in reply.runs), reply.next_page_token)

    def end_run(
        self, run_id: str, status: RunStatus = RunStatus.FINISHED, *, end_time_ms: int = 0
    ) -> Run:
        request = pb.EndRunRequest(
            run_id=run_id, status=conv.run_status_to_pb(status), end_time_ms=end_time_ms
        )
        return conv.run_from_pb(invoke(self._stub.EndRun, request, self._timeout).run)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        request = pb.LogParamsRequest(run_id=run_id, params=dict(params))
        invoke(self._stub.LogParams, request, self._timeout)

    def log_metrics(self, run_id: str, metrics: Sequence[Metric]) -> int:
        request = pb.LogMetricsRequest(
            run_id=run_id, metrics=[conv.metric_to_pb(m) for m in metrics]
        )
        return invoke(self._stub.LogMetrics, request, self._timeout).accepted_points

    def enqueue_metrics(self, points: Sequence[MetricPoint]) -> int:
        """One StreamMetrics call with one message; for a training loop use `MetricStream`."""
        request = pb.StreamMetricsRequest(points=[conv.metric_point_to_pb(p) for p in points])
        try:
            reply = self._stub.StreamMetrics(iter([request]), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return reply.accepted_points

    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        request = pb.FlushMetricsRequest(run_id=run_id)
        reply = invoke(self._stub.FlushMetrics, request, timeout_s or self._timeout)
        return FlushResult(reply.pending_points, reply.dead_letter_points)

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        request = pb.SetRunTagsRequest(run_id=run_id, tags=dict(tags))
        invoke(self._stub.SetRunTags, request, self._timeout)

    def delete_run_tag(self, run_id: str, key: str) -> None:
        request = pb.DeleteRunTagRequest(run_id=run_id, key=key)
        invoke(self._stub.DeleteRunTag, request, self._timeout)

    def get_metric_history(
        self,
        run_id: str,
        key: str,
        *,
        page_size: int = DEFAULT_METRIC_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[Metric]:
        request = pb.GetMetricHistoryRequest(
            run_id=run_id, metric_key=key, page_size=page_size, page_token=page_token
        )
        reply = invoke(self._stub.GetMetricHistory, request, self._timeout)
        return Page(tuple(conv.metric_from_pb(m) for m in reply.metrics), reply.next_page_token)
