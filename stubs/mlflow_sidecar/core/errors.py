"""The one error hierarchy of mlflow-sidecar and its mapping to gRPC status codes.

Services raise these; the server's error interceptor turns them into status codes;
the typed gRPC clients turn status codes back into them. Trainer code therefore
catches the same exceptions whether it talks to the sidecar or to a fake port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mlflow_sidecar.core.str_enum import StrEnum

__all__ = [
    "ERROR_DOMAIN",
    "HTTP_STATUS_KEY",
    "MLFLOW_ERROR_CODE_KEY",
    "REQUEST_ID_KEY",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "ClientErrorReason",
    "DataLossError",
    "DeadlineExceededError",
    "ErrorReason",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SidecarError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_from_rpc",
    "error_from_rpc_status",
    "error_from_status",
    "to_rpc_status",
]


# The `google.rpc.ErrorInfo.domain` of every error the sidecar reports.
ERROR_DOMAIN = "mlflow-sidecar"


class ErrorReason(StrEnum):
    """Every `google.rpc.ErrorInfo.reason` the sidecar sends (domain `mlflow-sidecar`).

    The one list: the protos' header comments and the README's "Errors" table describe
    the same set. A reason is stable once released; a new one is only ever added. Each
    status code has a generic reason (its own name) for failures no program branches on.
    """

    # Generic, one per status code: the reason of an error that has no more precise one,
    # and what the client reports for a status without details (grpc's own, e.g. a
    # transport UNAVAILABLE or a DEADLINE_EXCEEDED the client's deadline produced).
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    DATA_LOSS = "DATA_LOSS"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    # INVALID_ARGUMENT
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"  # noqa: S105 - a reason, not a secret
    RESERVED_ALIAS = "RESERVED_ALIAS"
    INVALID_REQUEST_ID = "INVALID_REQUEST_ID"
    UNSAFE_URI = "UNSAFE_URI"
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"
    # NOT_FOUND
    EXPERIMENT_NOT_FOUND = "EXPERIMENT_NOT_FOUND"
    RUN_NOT_FOUND = "RUN_NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_VERSION_NOT_FOUND = "MODEL_VERSION_NOT_FOUND"
    ALIAS_NOT_FOUND = "ALIAS_NOT_FOUND"
    ARTIFACT_NOT_FOUND = "ARTIFACT_NOT_FOUND"
    LOGGED_MODEL_NOT_FOUND = "LOGGED_MODEL_NOT_FOUND"
    TAG_NOT_FOUND = "TAG_NOT_FOUND"
    # FAILED_PRECONDITION
    RUN_NOT_ACTIVE = "RUN_NOT_ACTIVE"
    EXPERIMENT_NOT_ACTIVE = "EXPERIMENT_NOT_ACTIVE"
    PARAM_VALUE_CHANGED = "PARAM_VALUE_CHANGED"
    RUN_ENDED = "RUN_ENDED"
    ARTIFACT_BUCKET_MISSING = "ARTIFACT_BUCKET_MISSING"
    RUN_END_HELD = "RUN_END_HELD"
    # PERMISSION_DENIED
    PATH_OUTSIDE_ROOTS = "PATH_OUTSIDE_ROOTS"
    ARTIFACT_STORE_DENIED = "ARTIFACT_STORE_DENIED"
    MLFLOW_DENIED = "MLFLOW_DENIED"
    # RESOURCE_EXHAUSTED
    SPOOL_FULL = "SPOOL_FULL"
    UPLOAD_TOO_LARGE = "UPLOAD_TOO_LARGE"
    DISK_FULL = "DISK_FULL"
    TOO_MANY_OPEN_FILES = "TOO_MANY_OPEN_FILES"
    TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
    TOO_MANY_POINTS = "TOO_MANY_POINTS"
    WATCH_FELL_BEHIND = "WATCH_FELL_BEHIND"
    ANSWER_TOO_LARGE = "ANSWER_TOO_LARGE"
    # DATA_LOSS
    DIGEST_MISMATCH = "DIGEST_MISMATCH"
    # DEADLINE_EXCEEDED
    RUN_END_PENDING = "RUN_END_PENDING"
    # UNAVAILABLE
    MLFLOW_UNAVAILABLE = "MLFLOW_UNAVAILABLE"
    ARTIFACT_STORE_UNAVAILABLE = "ARTIFACT_STORE_UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"


class ClientErrorReason(StrEnum):
    """Reasons the typed client raises itself, for failures that never reach the sidecar
    (its `ErrorReason` values are what the sidecar sends)."""

    CLIENT_CLOSED = "CLIENT_CLOSED"
    CHANNEL_USED_AFTER_FORK = "CHANNEL_USED_AFTER_FORK"
    STREAM_USED_AFTER_FORK = "STREAM_USED_AFTER_FORK"
    CLIENT_BUFFER_FULL = "CLIENT_BUFFER_FULL"
    SIDECAR_UNREACHABLE = "SIDECAR_UNREACHABLE"


# ErrorInfo metadata keys the sidecar fills.
MLFLOW_ERROR_CODE_KEY = "mlflow_error_code"
HTTP_STATUS_KEY = "http_status"
REQUEST_ID_KEY = "request_id"


class SidecarError(Exception):
    """Base of every error the sidecar reports; `code` is its gRPC status code.

    `reason` is a stable UPPER_SNAKE_CASE identifier (`google.rpc.ErrorInfo.reason`,
    domain `mlflow-sidecar`) that programs branch on; `metadata` adds facts about this
    occurrence (e.g. MLflow's own `mlflow_error_code`); `field` names the request field
    at fault as the request spells it, or is empty; `retry_after_s` is set where waiting
    and trying again helps (`google.rpc.RetryInfo`). The message is for people only.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[str] = ErrorReason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field = field
        self.retry_after_s = retry_after_s


class NotFoundError(SidecarError):
    """The experiment, run, model, version, alias or artifact does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = ErrorReason.NOT_FOUND


class AlreadyExistsError(SidecarError):
    """A resource of that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = ErrorReason.ALREADY_EXISTS


class InvalidArgumentError(SidecarError):
    """A request field is malformed: `field` names it as the request spells it (e.g.
    `series[2].timestamps_ms[1]`), `problem` says what is wrong with it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = ErrorReason.INVALID_ARGUMENT

    def __init__(
        self,
        field: str,
        problem: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            f"{field}: {problem}" if field else problem,
            reason=reason,
            metadata=metadata,
            field=field,
        )
        self.problem = problem


class FailedPreconditionError(SidecarError):
    """The request is well-formed but the resource's state forbids it.

    Examples: a write-once param logged again with another value, a write to a deleted run.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.FAILED_PRECONDITION


class UnavailableError(SidecarError):
    """MLflow, its artifact store, or the sidecar cannot be reached, even after retries."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.UNAVAILABLE


class DeadlineExceededError(SidecarError):
    """The call's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = ErrorReason.DEADLINE_EXCEEDED


# How long a caller refused for a full spool or disk is told to wait before it tries again.
DISK_FULL_RETRY_AFTER_S = 1.0


class ResourceExhaustedError(SidecarError):
    """A configured limit was reached (spool size, upload size, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.RESOURCE_EXHAUSTED


class UnauthenticatedError(SidecarError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = ErrorReason.UNAUTHENTICATED


class PermissionDeniedError(SidecarError):
    """The credentials are valid but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = ErrorReason.PERMISSION_DENIED


class DataLossError(SidecarError):
    """Bytes received do not match their announced size or sha256."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = ErrorReason.DATA_LOSS


class AbortedError(SidecarError):
    """The call was aborted, e.g. by a conflicting concurrent change."""

    code = grpc.StatusCode.ABORTED
    default_reason = ErrorReason.ABORTED


class CancelledError(SidecarError):
    """The call was cancelled by the caller."""

    code = grpc.StatusCode.CANCELLED
    default_reason = ErrorReason.CANCELLED


class UnimplementedError(SidecarError):
    """The sidecar does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = ErrorReason.UNIMPLEMENTED


class InternalError(SidecarError):
    """Something unexpected failed; details are in the sidecar's log, never in the message."""

    code = grpc.StatusCode.INTERNAL
    default_reason = ErrorReason.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[SidecarError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnavailableError,
        DeadlineExceededError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        DataLossError,
        AbortedError,
        CancelledError,
        UnimplementedError,
        InternalError,
    )
}


def error_from_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    field: str = "",
    problem: str = "",
    retry_after_s: float | None = None,
) -> SidecarError:
    """The domain error for a status code: the class that code maps to, with the given facts.

    Nothing is parsed out of `message`; it is kept for people. An INVALID_ARGUMENT
    without a `problem` takes the whole message as its problem."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(field, problem or message, reason=reason, metadata=metadata)
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, reason=reason, metadata=metadata, field=field, retry_after_s=retry_after_s)


def to_rpc_status(error: SidecarError) -> status_pb2.Status:
    """The `google.rpc.Status` that reports `error` (AIP-193): always an `ErrorInfo` (its
    reason, domain `mlflow-sidecar`, its metadata); a `BadRequest` with one field violation
    when the error names a field; a `RetryInfo` when waiting helps."""
    info = error_details_pb2.ErrorInfo(
        reason=str(error.reason), domain=ERROR_DOMAIN, metadata=error.metadata
    )
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(info)
    if error.field:
        # The message names the field first; the violation names it in its own slot.
        problem = error.message.removeprefix(f"{error.field}: ")
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=problem
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(error.retry_after_s * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def error_from_rpc_status(code: grpc.StatusCode, status: status_pb2.Status) -> SidecarError:
    """The domain error a `google.rpc.Status` describes; its details fill `reason`,
    `metadata`, `field` and `retry_after_s`. An `ErrorInfo` of another domain is not ours:
    its reason is not used, so the error keeps its generic one."""
    reason = ""
    metadata: dict[str, str] = {}
    field = problem = ""
    retry_after_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                reason = info.reason
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                field = bad.field_violations[0].field
                problem = bad.field_violations[0].description
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return error_from_status(
        code,
        status.message,
        reason=reason,
        metadata=metadata,
        field=field,
        problem=problem,
        retry_after_s=retry_after_s,
    )


def error_from_rpc(err: grpc.RpcError) -> SidecarError:
    """The domain error for a failed call (a `grpc.RpcError` that is also a `grpc.Call`).

    Reads the call's `google.rpc.Status` details; a status without them (produced by grpc
    itself, e.g. a transport UNAVAILABLE or the client's own DEADLINE_EXCEEDED) gives the
    status code's class with its generic reason."""
    if not isinstance(err, grpc.Call):
        return InternalError(str(err))
    code = err.code()
    message = err.details() or ""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        # Details that contradict the status line are not trusted.
        status = None
    if status is None:
        return error_from_status(code, message)
    return error_from_rpc_status(code, status)
