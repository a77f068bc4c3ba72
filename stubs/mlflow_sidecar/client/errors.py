"""The one error hierarchy of mlflow-sidecar and its mapping to gRPC status codes.

Services raise these; the server's error interceptor turns them into status codes;
the typed gRPC clients turn status codes back into them. Trainer code therefore
catches the same exceptions whether it talks to the sidecar or to a fake port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import grpc

# The `google.rpc.ErrorInfo.domain` of every error the sidecar reports.
ERROR_DOMAIN = "mlflow-sidecar"


class SidecarError(Exception):
    """Base of every error the sidecar reports; `code` is its gRPC status code.

    `reason` is a stable UPPER_SNAKE_CASE identifier (`google.rpc.ErrorInfo.reason`,
    domain `mlflow-sidecar`) that programs branch on; `metadata` adds facts about this
    occurrence (e.g. MLflow's own `mlflow_error_code`); `field` names the request field
    at fault as the request spells it, or is empty; `retry_after_s` is set where waiting
    and trying again helps (`google.rpc.RetryInfo`). The message is for people only.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[str] = "INTERNAL"

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
    default_reason = "NOT_FOUND"


class AlreadyExistsError(SidecarError):
    """A resource of that name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class InvalidArgumentError(SidecarError):
    """A request field is malformed; the message starts with the field's name."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

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
    default_reason = "FAILED_PRECONDITION"


class UnavailableError(SidecarError):
    """MLflow (or the sidecar) cannot be reached, even after retries."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceededError(SidecarError):
    """The call's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(SidecarError):
    """A configured limit was reached (spool size, upload size, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(SidecarError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(SidecarError):
    """The credentials are valid but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class DataLossError(SidecarError):
    """Bytes received do not match their announced size or sha256."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class AbortedError(SidecarError):
    """The call was aborted, e.g. by a conflicting concurrent change."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class CancelledError(SidecarError):
    """The call was cancelled by the caller."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class UnimplementedError(SidecarError):
    """The sidecar does not implement this call."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class InternalError(SidecarError):
    """Something unexpected failed; details are in the sidecar's log, never in the message."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


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


def error_from_status(code: grpc.StatusCode, details: str) -> SidecarError:
    """The domain error for a gRPC status code and its details string."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, problem = details.partition(": ")
        return InvalidArgumentError(field, problem) if sep else InvalidArgumentError("", details)
    return _BY_CODE.get(code, InternalError)(details)


def error_from_rpc(err: grpc.RpcError) -> SidecarError:
    """The domain error for a failed call (a `grpc.RpcError` that is also a `grpc.Call`)."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    return error_from_status(code, details)
