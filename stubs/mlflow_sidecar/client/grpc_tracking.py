"""`GrpcExperimentTracking`: the `ExperimentTracking` port over the sidecar's gRPC API."""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import grpc

from mlflow_sidecar.client.arguments import double, int64, string_map, strings
from mlflow_sidecar.client.downloads import claimed, partial_path, sweep_stale
from mlflow_sidecar.client.ports import ExperimentTracking, StrPath
from mlflow_sidecar.client.streaming import invoke_client_stream, resent_on_unavailable
from mlflow_sidecar.client.unary_retry import Reconnect
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import (
    ArtifactInfo,
    Experiment,
    FileInfo,
    FlushResult,
    Metric,
    MetricPoint,
    Page,
    Progress,
    Run,
    RunStatus,
    ViewType,
)
from mlflow_sidecar.core.errors import (
    DataLossError,
    InvalidArgumentError,
    error_from_rpc,
)
from mlflow_sidecar.core.limits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_METRIC_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    MAX_CHUNK_BYTES,
)
from mlflow_sidecar.core.paths import check_relative_path, check_stored_path
from mlflow_sidecar.core.transfer import HashingWriter, read_chunks, report
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


def check_chunk_bytes(chunk_bytes: int) -> int:
    """The chunk size of uploads: positive, at most 1 MiB."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be between 1 and {MAX_CHUNK_BYTES}, got {chunk_bytes}")
    return chunk_bytes


def _checked_metric(name: str, metric: Metric) -> pb.Metric:
    """`metric` as its message; an out-of-range number is InvalidArgumentError naming it
    as the request does (`metrics[3].step`)."""
    return pb.Metric(
        key=metric.key,
        value=double(f"{name}.value", metric.value),
        timestamp_ms=int64(f"{name}.timestamp_ms", metric.timestamp_ms),
        step=int64(f"{name}.step", metric.step),
    )


def _checked_point(name: str, point: MetricPoint) -> pb.MetricPoint:
    """`point` as its message, its numbers checked as `_checked_metric` checks them."""
    return pb.MetricPoint(
        run_id=point.run_id,
        key=point.key,
        value=double(f"{name}.value", point.value),
        timestamp_ms=int64(f"{name}.timestamp_ms", point.timestamp_ms),
        step=int64(f"{name}.step", point.step),
    )


def _flush_result(reply: pb.FlushMetricsResponse) -> FlushResult:
    return FlushResult(
        reply.pending_points,
        reply.dead_letter_points,
        reply.pending_run_ends,
        reply.held_run_ends,
    )


class GrpcExperimentTracking(ExperimentTracking):
    """Experiment tracking through a sidecar. Every call carries `timeout_s` as its deadline,
    artifact transfers `transfer_timeout_s`; StartRun always carries a request_id, so a
    retried StartRun never makes two runs. Uploads go in chunks of `chunk_bytes`. Downloads
    ask for chunks of at most `download_chunk_bytes` (0: the sidecar's own). A
    transfer that found the sidecar unreachable is sent again, up to `upload_attempts`
    times in all, with `reconnect` (its channel's) once the sidecar is back, within
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

    def create_experiment(
        self,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        artifact_location: str = "",
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> Experiment:
        request = pb.CreateExperimentRequest(
            name=name,
            tags=string_map("tags", tags or {}),
            artifact_location=artifact_location,
            get_if_exists=get_if_exists,
            request_id=request_id or uuid.uuid4().hex,
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
            order_by=strings("order_by", order_by),
            page_size=page_size,
            page_token=page_token,
            view_type=conv.view_type_to_pb(view_type),
        )
        reply = invoke(self._stub.SearchExperiments, request, self._timeout)
        return Page(
            tuple(conv.experiment_from_pb(e) for e in reply.experiments), reply.next_page_token
        )

    def delete_experiment(self, experiment_id: str, *, request_id: str = "") -> None:
        request = pb.DeleteExperimentRequest(
            experiment_id=experiment_id, request_id=request_id or uuid.uuid4().hex
        )
        invoke(self._stub.DeleteExperiment, request, self._timeout)

    def restore_experiment(self, experiment_id: str) -> Experiment:
        request = pb.RestoreExperimentRequest(experiment_id=experiment_id)
        return conv.experiment_from_pb(
            invoke(self._stub.RestoreExperiment, request, self._timeout).experiment
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
        request_id: str = "",
    ) -> Run:
        request = pb.StartRunRequest(
            experiment_id=experiment_id,
            run_name=run_name,
            tags=string_map("tags", tags or {}),
            parent_run_id=parent_run_id,
            start_time_ms=int64("start_time_ms", start_time_ms),
            client_request_id=client_request_id,
            request_id=request_id or client_request_id or uuid.uuid4().hex,
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
            experiment_ids=strings("experiment_ids", experiment_ids),
            filter=filter_string,
            order_by=strings("order_by", order_by),
            page_size=page_size,
            page_token=page_token,
            view_type=conv.view_type_to_pb(view_type),
        )
        reply = invoke(self._stub.SearchRuns, request, self._timeout)
        return Page(tuple(conv.run_from_pb(r) for r in reply.runs), reply.next_page_token)

    def end_run(
        self,
        run_id: str,
        status: RunStatus = RunStatus.FINISHED,
        *,
        end_time_ms: int = 0,
        request_id: str = "",
        wait_for_delivery: bool = False,
    ) -> Run:
        if not isinstance(status, RunStatus):
            raise TypeError(
                f"status must be a RunStatus (e.g. RunStatus.FINISHED), not"
                f" {type(status).__name__} ({status!r})"
            )
        request = pb.EndRunRequest(
            run_id=run_id,
            status=conv.run_status_to_pb(status),
            end_time_ms=int64("end_time_ms", end_time_ms),
            request_id=request_id or uuid.uuid4().hex,
            wait_for_delivery=wait_for_delivery,
        )
        return conv.run_from_pb(invoke(self._stub.EndRun, request, self._timeout).run)

    def delete_run(self, run_id: str, *, request_id: str = "") -> None:
        request = pb.DeleteRunRequest(run_id=run_id, request_id=request_id or uuid.uuid4().hex)
        invoke(self._stub.DeleteRun, request, self._timeout)

    def restore_run(self, run_id: str) -> Run:
        request = pb.RestoreRunRequest(run_id=run_id)
        return conv.run_from_pb(invoke(self._stub.RestoreRun, request, self._timeout).run)

    def resume_run(self, run_id: str) -> Run:
        request = pb.ResumeRunRequest(run_id=run_id)
        return conv.run_from_pb(invoke(self._stub.ResumeRun, request, self._timeout).run)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        request = pb.LogParamsRequest(run_id=run_id, params=string_map("params", params))
        invoke(self._stub.LogParams, request, self._timeout)

    def log_metrics(self, run_id: str, metrics: Sequence[Metric], *, request_id: str = "") -> int:
        request = pb.LogMetricsRequest(
            run_id=run_id,
            metrics=[_checked_metric(f"metrics[{i}]", m) for i, m in enumerate(metrics)],
            request_id=request_id or uuid.uuid4().hex,
        )
        return invoke(self._stub.LogMetrics, request, self._timeout).accepted_points

    def enqueue_metrics(self, points: Sequence[MetricPoint]) -> int:
        """One StreamMetrics call with one message; for a training loop use `MetricStream`.
        Points with timestamp 0 are stamped with the current time before they are sent."""
        request = pb.StreamMetricsRequest(
            points=[_checked_point(f"points[{i}]", p) for i, p in enumerate(points)]
        )
        # The sidecar stamps a point of timestamp 0 on arrival, so gRPC's replay of this
        # stream after a lost answer made a second point; a stamped one is an exact
        # duplicate, which MLflow holds once.
        stamp = now_ms()
        for point in request.points:
            if point.timestamp_ms == 0:
                point.timestamp_ms = stamp
        try:
            reply = self._stub.StreamMetrics(iter([request]), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return reply.accepted_points

    def flush_metrics(self, run_id: str = "", *, timeout_s: float | None = None) -> FlushResult:
        """Waits up to `timeout_s` (None: the client's timeout; 0: not at all, one call
        that says what is pending now). The sidecar bounds one FlushMetrics call by its
        `spool.flush_timeout_s`, so longer waits take several calls."""
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise InvalidArgumentError(
                "timeout_s", f"must be a number of seconds, 0 or more, got {timeout_s}"
            )
        request = pb.FlushMetricsRequest(run_id=run_id)
        if timeout_s == 0:
            # The call's own deadline stays the client's: it is the answer's time to come.
            request.max_wait_s = 0
            reply = invoke(self._stub.FlushMetrics, request, self._timeout)
            return _flush_result(reply)
        deadline = time.monotonic() + (self._timeout if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            reply = invoke(self._stub.FlushMetrics, request, max(left, 0.001))
            result = _flush_result(reply)
            if result.complete or deadline - time.monotonic() <= 1.0:
                return result

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        request = pb.SetRunTagsRequest(run_id=run_id, tags=string_map("tags", tags))
        invoke(self._stub.SetRunTags, request, self._timeout)

    def delete_run_tag(self, run_id: str, key: str, *, request_id: str = "") -> None:
        request = pb.DeleteRunTagRequest(
            run_id=run_id, key=key, request_id=request_id or uuid.uuid4().hex
        )
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

    def upload_artifact(
        self,
        run_id: str,
        local_path: StrPath,
        artifact_path: str = "",
        *,
        progress: Progress | None = None,
        request_id: str = "",
    ) -> ArtifactInfo:
        source = Path(local_path)
        if not source.is_file():
            raise InvalidArgumentError("local_path", f"{source} is not a file")
        target = check_stored_path("artifact_path", artifact_path or source.name)
        # One id for every attempt: the sidecar answers a repeat with the first outcome.
        info: ArtifactInfo = self._upload(
            run_id, source, target, progress, request_id or uuid.uuid4().hex
        )
        return info

    def _upload_once(
        self, run_id: str, source: Path, target: str, progress: Progress | None, request_id: str
    ) -> ArtifactInfo:
        size = source.stat().st_size
        chunk_bytes = self._chunk_bytes
        digest = hashlib.sha256()

        def requests() -> Iterator[pb.UploadArtifactRequest]:
            # The file is read once: its sha256 follows the bytes in the trailer.
            header = pb.UploadArtifactHeader(
                run_id=run_id, artifact_path=target, size_bytes=size, request_id=request_id
            )
            yield pb.UploadArtifactRequest(header=header)
            report(progress, 0, size)
            sent = 0
            for chunk in read_chunks(source, chunk_bytes):
                if sent + len(chunk) > size:
                    raise DataLossError(f"{source} grew while it was being uploaded")
                digest.update(chunk)
                yield pb.UploadArtifactRequest(chunk=chunk)
                # gRPC asks for the next message once this one is on its way.
                sent += len(chunk)
                report(progress, sent, size)
            yield pb.UploadArtifactRequest(
                trailer=pb.UploadArtifactTrailer(sha256=digest.hexdigest())
            )

        reply = invoke_client_stream(self._stub.UploadArtifact, requests(), self._transfer_timeout)
        if reply.sha256 != digest.hexdigest():
            raise DataLossError(
                f"the sidecar stored sha256 {reply.sha256} for {target}, sent {digest.hexdigest()}"
            )
        return ArtifactInfo(
            path=reply.artifact_path, size_bytes=reply.size_bytes, sha256=reply.sha256
        )

    def list_artifacts(
        self,
        run_id: str,
        path: str = "",
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[FileInfo]:
        request = pb.ListArtifactsRequest(
            run_id=run_id, path=path, page_size=page_size, page_token=page_token
        )
        reply = invoke(self._stub.ListArtifacts, request, self._timeout)
        return Page(tuple(conv.file_info_from_pb(f) for f in reply.files), reply.next_page_token)

    def download_artifact(
        self,
        run_id: str,
        artifact_path: str,
        dst_dir: StrPath,
        *,
        progress: Progress | None = None,
    ) -> Path:
        check_relative_path("artifact_path", artifact_path)
        return self._download(run_id, artifact_path, Path(dst_dir), progress)

    def _download_once(
        self, run_id: str, artifact_path: str, dst_dir: Path, progress: Progress | None
    ) -> Path:
        final = dst_dir.joinpath(*artifact_path.split("/"))
        request = pb.DownloadArtifactRequest(
            run_id=run_id,
            artifact_path=artifact_path,
            max_chunk_bytes=self._download_chunk_bytes,
        )
        call = self._stub.DownloadArtifact(request, timeout=self._transfer_timeout)
        try:
            header = _artifact_header(call, artifact_path)
            size = header.size_bytes
            final.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(final.parent)
            partial = partial_path(final)
            with (
                HashingWriter(partial, size, header.sha256 or None, what=artifact_path) as writer,
                claimed(partial),
            ):
                report(progress, 0, size)
                trailer = _receive_artifact(call, writer, artifact_path, progress)
                # Only verified bytes reach `final`: the partial file is renamed after this.
                writer.finish(trailer or None)
                os.replace(partial, final)
        finally:
            # Stops the sidecar's stream when we leave early; a no-op after a full download.
            call.cancel()
        return final


def _artifact_header(
    responses: Iterator[pb.DownloadArtifactResponse], artifact_path: str
) -> pb.DownloadArtifactHeader:
    # The size and digest to check the bytes against come first, or nothing can be trusted.
    first = next(responses, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise DataLossError(f"{artifact_path}: the sidecar sent no header")
    return first.header


def _receive_artifact(
    responses: Iterator[pb.DownloadArtifactResponse],
    writer: HashingWriter,
    artifact_path: str,
    progress: Progress | None,
) -> str:
    """Write the chunks after the header; return the trailer's sha256 ("" without one).

    The trailer ends the stream: anything after it, or a second header, is refused."""
    trailer = ""
    for message in responses:
        kind = message.WhichOneof("payload")
        _check_after_header(kind, trailer, artifact_path)
        if kind == "trailer":
            trailer = _trailer_sha256(message.trailer, artifact_path)
            continue
        writer.write(message.chunk)
        report(progress, writer.written, writer.expected_size)
    return trailer


def _check_after_header(kind: str | None, trailer: str, artifact_path: str) -> None:
    if trailer or kind not in ("chunk", "trailer"):
        raise DataLossError(
            f"{artifact_path}: the sidecar sent a {kind} after the"
            f" {'trailer' if trailer else 'header'}"
        )


def _trailer_sha256(trailer: pb.DownloadArtifactTrailer, artifact_path: str) -> str:
    # A trailer exists to carry the digest of bytes whose digest was not known up front.
    if not trailer.sha256:
        raise DataLossError(f"{artifact_path}: the trailer carries no sha256")
    return trailer.sha256
