"""Errors of the sidecar as MLflow's own: `MlflowException` with MLflow's error codes.

Stock MLflow code branches on error codes (e.g. `_register_model` on
RESOURCE_ALREADY_EXISTS), so every SidecarError reaching MLflow is translated here, once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec, TypeVar

import grpc
from mlflow.exceptions import MlflowException, MlflowNotImplementedException
from mlflow.protos import databricks_pb2

from mlflow_sidecar.core.errors import MLFLOW_ERROR_CODE_KEY, ErrorReason, SidecarError

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)

# Marks a method `refuses_unoffered` put on a store, for tests that tell them apart.
UNOFFERED_MARK = "__sidecar_unoffered__"

_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.NOT_FOUND: databricks_pb2.RESOURCE_DOES_NOT_EXIST,
    grpc.StatusCode.ALREADY_EXISTS: databricks_pb2.RESOURCE_ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT: databricks_pb2.INVALID_PARAMETER_VALUE,
    grpc.StatusCode.FAILED_PRECONDITION: databricks_pb2.INVALID_STATE,
    grpc.StatusCode.UNAVAILABLE: databricks_pb2.TEMPORARILY_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: databricks_pb2.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: databricks_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED: databricks_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: databricks_pb2.PERMISSION_DENIED,
    grpc.StatusCode.DATA_LOSS: databricks_pb2.DATA_LOSS,
    grpc.StatusCode.ABORTED: databricks_pb2.ABORTED,
    grpc.StatusCode.CANCELLED: databricks_pb2.CANCELLED,
    grpc.StatusCode.UNIMPLEMENTED: databricks_pb2.NOT_IMPLEMENTED,
}


# Where MLflow gives another code than the status stands for: a changed param, a deleted
# run or experiment are INVALID_PARAMETER_VALUE to MLflow, not INVALID_STATE.
_REASON_CODES: dict[str, int] = {
    ErrorReason.PARAM_VALUE_CHANGED: databricks_pb2.INVALID_PARAMETER_VALUE,
    ErrorReason.RUN_NOT_ACTIVE: databricks_pb2.INVALID_PARAMETER_VALUE,
    ErrorReason.EXPERIMENT_NOT_ACTIVE: databricks_pb2.INVALID_PARAMETER_VALUE,
}


def mlflow_error_code(error: SidecarError) -> int:
    """MLflow's error code for `error`: the one MLflow itself gave, when the sidecar passed
    it on, else the one MLflow gives for its reason, else the one its gRPC status stands
    for."""
    named = error.metadata.get(MLFLOW_ERROR_CODE_KEY, "")
    if named in databricks_pb2.ErrorCode.keys():  # noqa: SIM118 - an enum wrapper, not a dict
        return int(databricks_pb2.ErrorCode.Value(named))
    if error.reason in _REASON_CODES:
        return _REASON_CODES[error.reason]
    return _CODES.get(error.code, databricks_pb2.INTERNAL_ERROR)


def to_mlflow(error: SidecarError) -> MlflowException:
    """`error` as an MlflowException; the reason and field stay readable in the message."""
    detail = f"{error.message} (sidecar: {error.code.name}, {error.reason}"
    detail += f", field {error.field})" if error.field else ")"
    translated = MlflowException(detail, error_code=mlflow_error_code(error))
    translated.__cause__ = error
    return translated


def unsupported(what: str) -> MlflowException:
    """The error of an operation the sidecar's contract does not offer."""
    return MlflowException(
        f"{what} is not supported through the sidecar (sidecar:// URI): its contract has no"
        " such operation; use MLflow's tracking server directly for it",
        error_code=databricks_pb2.NOT_IMPLEMENTED,
    )


def translated(method: Callable[P, R]) -> Callable[P, R]:
    """Wrap `method` so that a SidecarError leaves it as an MlflowException."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except SidecarError as error:
            raise to_mlflow(error) from error

    return wrapper


def _refusing(name: str) -> Callable[..., NoReturn]:
    def refuse(self: object, *args: Any, **kwargs: Any) -> NoReturn:
        raise unsupported(f"`{name}`")

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"Raises MlflowException NOT_IMPLEMENTED: the sidecar has no `{name}`."
    setattr(refuse, UNOFFERED_MARK, True)
    return refuse


def _translating(name: str, mlflows: Callable[..., Any]) -> Callable[..., Any]:
    """MLflow's own `mlflows`, its NotImplementedError (or its NOT_IMPLEMENTED without a
    word of what) raised as `unsupported`."""
    if inspect.iscoroutinefunction(mlflows):

        @functools.wraps(mlflows)
        async def translating_async(self: object, *args: Any, **kwargs: Any) -> Any:
            try:
                return await mlflows(self, *args, **kwargs)
            except (NotImplementedError, MlflowNotImplementedException):
                raise unsupported(f"`{name}`") from None

        setattr(translating_async, UNOFFERED_MARK, True)
        return translating_async

    @functools.wraps(mlflows)
    def translating(self: object, *args: Any, **kwargs: Any) -> Any:
        try:
            return mlflows(self, *args, **kwargs)
        except (NotImplementedError, MlflowNotImplementedException):
            raise unsupported(f"`{name}`") from None

    setattr(translating, UNOFFERED_MARK, True)
    return translating


def _defines(store: type, name: str, up_to: type) -> bool:
    """Whether `store`, or a class it inherits from below `up_to`, defines `name`."""
    below = store.__mro__[: store.__mro__.index(up_to)] if up_to in store.__mro__ else store.__mro__
    return any(name in klass.__dict__ for klass in below)


def refuses_unoffered(abstract_store: type, rest_store: type) -> Callable[[C], C]:
    """Class decorator for a store: what the sidecar does not offer raises `unsupported`,
    naming the operation, whichever MLflow version is installed.

    Each method of MLflow's `abstract_store` the store does not define runs MLflow's own
    implementation (some, like `search_runs`, are built on methods the store defines),
    with its NotImplementedError, or its NOT_IMPLEMENTED that names nothing, raised as
    `unsupported`; an abstract one (its body does nothing, so the call would be dropped
    silently) and each public method that only MLflow's `rest_store` has (MLflow's client
    calls those on its store too: `log_logged_model_params`) raise it outright."""

    def decorate(store: C) -> C:
        for name in dir(abstract_store):
            found = inspect.getattr_static(abstract_store, name)
            if name.startswith("__") or not inspect.isfunction(found):
                continue
            if _defines(store, name, abstract_store):
                continue
            if getattr(found, "__isabstractmethod__", False):
                setattr(store, name, _refusing(name))
            else:
                setattr(store, name, _translating(name, found))
        for name in dir(rest_store):
            found = inspect.getattr_static(rest_store, name)
            if name.startswith("_") or not inspect.isfunction(found) or hasattr(store, name):
                continue
            setattr(store, name, _refusing(name))
        return store

    return decorate
