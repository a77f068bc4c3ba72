"""MLflow exceptions -> domain errors, and which of them are worth a retry."""

from __future__ import annotations

import errno
import re
import shutil
from collections.abc import Sequence

import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos import databricks_pb2

from mlflow_sidecar.core.errors import (
    HTTP_STATUS_KEY,
    MLFLOW_ERROR_CODE_KEY,
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SidecarError,
    UnauthenticatedError,
    UnavailableError,
)
from mlflow_sidecar.server.disk_full import disk_full_error, is_disk_full
from mlflow_sidecar.server.mlflow_gateway.store_errors import (
    causes,
    is_transient_store_failure,
    store_error,
)
from mlflow_sidecar.server.redaction import redact

# SQLAlchemy's OperationalError ("database is locked") from the embedded store. The `remote`
# install (mlflow-skinny) has no SQLAlchemy, and no SQL store to raise it either.
_SQL_OPERATIONAL_ERRORS: tuple[type[BaseException], ...]
try:
    from sqlalchemy.exc import OperationalError

    _SQL_OPERATIONAL_ERRORS = (OperationalError,)
except ModuleNotFoundError:
    _SQL_OPERATIONAL_ERRORS = ()

_BY_ERROR_CODE: dict[int, type[SidecarError]] = {
    databricks_pb2.RESOURCE_DOES_NOT_EXIST: NotFoundError,
    databricks_pb2.NOT_FOUND: NotFoundError,
    databricks_pb2.RESOURCE_ALREADY_EXISTS: AlreadyExistsError,
    databricks_pb2.ALREADY_EXISTS: AlreadyExistsError,
    databricks_pb2.INVALID_STATE: FailedPreconditionError,
    databricks_pb2.TEMPORARILY_UNAVAILABLE: UnavailableError,
    databricks_pb2.REQUEST_LIMIT_EXCEEDED: UnavailableError,
    databricks_pb2.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    databricks_pb2.DEADLINE_EXCEEDED: DeadlineExceededError,
    databricks_pb2.PERMISSION_DENIED: PermissionDeniedError,
    databricks_pb2.UNAUTHENTICATED: UnauthenticatedError,
    databricks_pb2.CUSTOMER_UNAUTHORIZED: UnauthenticatedError,
}
_INVALID_CODES = frozenset(
    {
        databricks_pb2.INVALID_PARAMETER_VALUE,
        databricks_pb2.BAD_REQUEST,
        databricks_pb2.MALFORMED_REQUEST,
    }
)
_TRANSIENT_CODES = frozenset(
    {databricks_pb2.TEMPORARILY_UNAVAILABLE, databricks_pb2.REQUEST_LIMIT_EXCEEDED}
)
# Raw HTTP answers (the artifact proxy's): worth a retry only for these and for 5xx.
_TRANSIENT_HTTP = frozenset({408, 425, 429})
_BY_HTTP_STATUS: dict[int, type[SidecarError]] = {
    401: UnauthenticatedError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: AlreadyExistsError,
    413: ResourceExhaustedError,
}
# ENOSPC as MLflow's download of several files reports it: it folds each file's failure
# into the text of one MlflowException, where the errno survives only as words.
_NO_SPACE_TEXT = f"[Errno {errno.ENOSPC}]"
# What shutil and the OS say of a "file" that cannot be copied as one, as MLflow folds it
# into the message of a download of several files.
_FOLDED_SPECIAL = re.compile(
    r"` is a (named pipe|socket|character device|block device)\b"
    rf"|\[Errno {errno.ELOOP}\] ()"
)
# MLflow's own words for writes to a deleted run or experiment; it reports them as
# INVALID_PARAMETER_VALUE ("The experiment 7 must be in the 'active' state. ...").
_INACTIVE_MARKER = "must be in the 'active' state"
_INACTIVE_EXPERIMENT = "The experiment "
# MLflow's words for an artifact that resolves out of its artifact directory (a link
# planted among a run's files): the store's doing, not the caller's request.
_OUTSIDE_ARTIFACTS = "resolved path is outside the artifact directory"


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        return int(exc.response.status_code)
    return None


# How MLflow's client words an answer whose body is not MLflow's JSON (a proxy's or an
# ingress's page): "API request to endpoint E failed with error code 400 != 200. Response
# body: '<html>...'", or "... was successful but the response body was not in a valid JSON
# format" for a 200 (a login page). MLflow's own refusals come as RestException, with JSON.
_FOREIGN_FAILURE = re.compile(r"^API request to endpoint \S+ failed with error code (\d+)")
_FOREIGN_SUCCESS = "API request to endpoint was successful but the response body was not"
# The sidecar's own credentials refused (by MLflow's auth, or a proxy in front of it).
_DENIED_CODES = frozenset(
    {
        databricks_pb2.UNAUTHENTICATED,
        databricks_pb2.PERMISSION_DENIED,
        databricks_pb2.CUSTOMER_UNAUTHORIZED,
    }
)
_DENIED_HTTP = frozenset({401, 403})


def foreign_status(exc: BaseException) -> int | None:
    """The HTTP status of an answer that is not MLflow's (its body is not MLflow's JSON:
    a proxy's or an ingress's page), or None for MLflow's own answers and other failures."""
    for cause in causes(exc):
        if isinstance(cause, MlflowException) and not isinstance(cause, RestException):
            if cause.message.startswith(_FOREIGN_SUCCESS):
                return 200
            match = _FOREIGN_FAILURE.match(cause.message)
            if match is not None:
                return int(match[1])
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later attempt may not see: connection errors, timeouts,
    HTTP 408/425/429/5xx (MLflow raises those as RetryError when its own retries are off),
    MLflow's TEMPORARILY_UNAVAILABLE, a locked embedded SQLite database, the like of these
    from the artifact store (botocore's, or a presigned part's), and a page that is not
    MLflow's answer (a proxy's), unless it refuses the sidecar's credentials or the
    request's size. Other HTTP 4xx answers are not: asking again gets the same refusal."""
    if is_transient_store_failure(exc):
        return True
    foreign = foreign_status(exc)
    if foreign is not None:
        return foreign not in _DENIED_HTTP and foreign != 413
    for cause in causes(exc):
        verdict = _transient_cause(cause)
        if verdict is not None:
            return verdict
    return False


def _transient_cause(cause: BaseException) -> bool | None:
    """Whether one exception of a chain is transient; None when it does not tell."""
    status = _http_status(cause)
    if status is not None:
        return status >= 500 or status in _TRANSIENT_HTTP
    if isinstance(cause, requests.exceptions.RequestException):
        return True
    if isinstance(cause, _SQL_OPERATIONAL_ERRORS) and "locked" in str(cause):
        return True
    if isinstance(cause, MlflowException) and cause.error_code in {
        databricks_pb2.ErrorCode.Name(code) for code in _TRANSIENT_CODES
    }:
        return True
    return None


def _facts(exc: BaseException) -> dict[str, str]:
    """What MLflow itself said, for `ErrorInfo.metadata`: its error code (`mlflow_error_code`)
    and, for a raw HTTP answer, the status (`http_status`). Nothing when it never answered
    (a refused connection, a timeout): the code MLflow's client then gives its exception
    (INTERNAL_ERROR) is not the server's."""
    facts: dict[str, str] = {}
    chain = causes(exc)
    if any(
        isinstance(cause, requests.exceptions.RequestException) and cause.response is None
        for cause in chain
    ):
        return facts
    for cause in chain:
        if isinstance(cause, MlflowException) and MLFLOW_ERROR_CODE_KEY not in facts:
            facts[MLFLOW_ERROR_CODE_KEY] = str(cause.error_code)
        status = _http_status(cause)
        if status is not None and HTTP_STATUS_KEY not in facts:
            facts[HTTP_STATUS_KEY] = str(status)
    return facts


def to_domain_error(exc: Exception) -> SidecarError:
    """The domain error for an exception raised by MLflow, with MLflow's own error code (or
    HTTP status) in its metadata. A transient failure is MLFLOW_UNAVAILABLE, or
    ARTIFACT_STORE_UNAVAILABLE when the artifact store itself failed (see `store_errors`);
    which resource a NOT_FOUND is about is for the caller to say (it knows what it asked
    for). MLflow's text is shown without the credentials its URLs carry."""
    if isinstance(exc, SidecarError):
        return exc
    error = _domain_error(exc)
    error.message = redact(error.message)
    return error


def _on_this_host(exc: Exception) -> SidecarError | None:
    """The failure of a file on the sidecar's own host, if that is what `exc` is: its disk
    full (a download being written, the embedded store's database), or a stored "file"
    that is not one (a named pipe or a loop of links in a local artifact store)."""
    if any(is_disk_full(cause) for cause in causes(exc)) or (
        isinstance(exc, MlflowException) and _NO_SPACE_TEXT in exc.message
    ):
        return disk_full_error("no room on the sidecar's disk for what MLflow sent or stores")
    special = _special_file(exc)
    if special:
        return FailedPreconditionError(
            f"a stored artifact is {special}, not a regular file: the sidecar reads regular"
            " files and directories only; remove it from the artifact store"
        )
    return None


def _domain_error(exc: Exception) -> SidecarError:
    local = _on_this_host(exc)
    if local is not None:
        return local
    # Before MLflow's error code: for the store's failures that code is MLflow's guess.
    from_store = store_error(exc)
    if from_store is not None:
        return from_store
    facts = _facts(exc)
    foreign = foreign_status(exc)
    if foreign is not None:
        return _from_foreign_answer(exc, foreign, facts)
    if is_transient(exc):
        return UnavailableError(
            f"MLflow is unavailable: {_short(exc)}",
            reason=ErrorReason.MLFLOW_UNAVAILABLE,
            metadata=facts,
        )
    if isinstance(exc, MlflowException):
        return _from_error_code(exc, facts)
    return _from_http_status(exc, facts)


def _special_file(exc: BaseException) -> str:
    """What a stored "file" really is when copying it failed for that (a named pipe, a
    socket or a device, or a loop of symbolic links); "" for other failures."""
    for cause in causes(exc):
        if isinstance(cause, shutil.SpecialFileError):
            kind = str(cause).rpartition(" is a ")[2]
            return f"a {kind}" if kind else "a special file"
        if isinstance(cause, OSError) and cause.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if isinstance(cause, MlflowException):
            # MLflow folds the failures of a download of several files into its words.
            folded = _FOLDED_SPECIAL.search(cause.message)
            if folded is not None:
                return f"a {folded[1]}" if folded[1] else "a loop of symbolic links"
    return ""


def _denied(status: str, facts: dict[str, str]) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"MLflow, or a proxy in front of it, refused the sidecar's own credentials ({status}):"
        " check mlflow.username and mlflow.password, or mlflow.token, and what MLflow lets"
        " that user do; the caller's token is not at fault",
        reason=ErrorReason.MLFLOW_DENIED,
        metadata=facts,
    )


def _from_foreign_answer(exc: Exception, status: int, facts: dict[str, str]) -> SidecarError:
    """The error for an answer whose body is not MLflow's (a proxy's or an ingress's)."""
    facts = {**facts, HTTP_STATUS_KEY: str(status)}
    facts.pop(MLFLOW_ERROR_CODE_KEY, None)  # the code MLflow's client guessed from the status
    if status in _DENIED_HTTP:
        return _denied(f"HTTP {status}", facts)
    page = _short(exc).partition("Response body: ")[2][:200] or "not JSON"
    if status == 413:
        return ResourceExhaustedError(
            "a proxy in front of MLflow refused the request as too large (HTTP 413): raise"
            f" its limit on request bodies, or send less in one call; its answer: {page}",
            metadata=facts,
        )
    return UnavailableError(
        f"MLflow's address answered HTTP {status} with a page that is not MLflow's answer (a"
        f" proxy, ingress or login page in front of MLflow?): {page}",
        reason=ErrorReason.MLFLOW_UNAVAILABLE,
        metadata=facts,
    )


def _from_error_code(exc: MlflowException, facts: dict[str, str]) -> SidecarError:
    """The error for an MlflowException, by MLflow's error code."""
    code = databricks_pb2.ErrorCode.Value(exc.error_code)
    message = _short(exc)
    if code in _INVALID_CODES:
        if _OUTSIDE_ARTIFACTS in message:
            return PermissionDeniedError(
                "the artifact resolves outside its artifact directory (a link among the"
                " stored files points out of it); the sidecar does not follow it",
                reason=ErrorReason.PATH_OUTSIDE_ROOTS,
                metadata=facts,
            )
        if _INACTIVE_MARKER in message:
            deleted_experiment = message.startswith(_INACTIVE_EXPERIMENT)
            return FailedPreconditionError(
                message,
                reason=ErrorReason.EXPERIMENT_NOT_ACTIVE
                if deleted_experiment
                else ErrorReason.RUN_NOT_ACTIVE,
                metadata=facts,
            )
        return InvalidArgumentError("", message, metadata=facts)
    if code in _DENIED_CODES:
        return _denied(f"{exc.error_code}: {message}", facts)
    return _BY_ERROR_CODE.get(code, InternalError)(message, metadata=facts)


def _from_http_status(exc: Exception, facts: dict[str, str]) -> SidecarError:
    """The error for a raw HTTP refusal (the artifact proxy's), else INTERNAL."""
    status = next((s for c in causes(exc) if (s := _http_status(c)) is not None), None)
    if status == 400:
        return InvalidArgumentError("", f"MLflow refused the request: {exc}", metadata=facts)
    if status == 413:
        return ResourceExhaustedError(
            f"MLflow answered 413: {exc}", reason=ErrorReason.UPLOAD_TOO_LARGE, metadata=facts
        )
    if status in _DENIED_HTTP:
        return _denied(f"HTTP {status}", facts)
    if status is not None:
        return _BY_HTTP_STATUS.get(status, InternalError)(
            f"MLflow answered {status}: {exc}", metadata=facts
        )
    return InternalError(f"{type(exc).__name__}: {exc}")


# Where a database's own words start inside an MLflow message: SQLAlchemy appends the
# driver's error, the statement and a link ("(sqlite3.IntegrityError) UNIQUE constraint
# failed ... [SQL: INSERT ...] (Background on this error at: https://sqlalche.me/...)").
_DATABASE_TEXT = re.compile(
    r"(?:\bError:\s*)?\((?:raised as a result of|sqlite3\.|psycopg|pymysql|MySQLdb|pyodbc"
    r"|sqlalchemy\.)"
    r"|\[SQL:|\[parameters:|\(Background on this error|sqlalche\.me"
    r"|\b(?:IntegrityError|OperationalError|ProgrammingError|DataError|UniqueViolation)\b",
    re.IGNORECASE,
)
_NO_SENTENCE = "MLflow's database refused the request"
# What PostgreSQL and MySQL say of a value wider than its column (SQLite ignores widths).
_TOO_LONG = re.compile(r"value too long for type|Data too long for column", re.IGNORECASE)
_TOO_LONG_SENTENCE = "MLflow's database refused a value longer than its column holds"
# RestException prefixes its code's name ("BAD_REQUEST: ..."); the status code says it.
_CODE_PREFIX = re.compile(rf"^(?:{'|'.join(databricks_pb2.ErrorCode.keys())}): ")


def _short(exc: Exception) -> str:
    """MLflow's message for people: without its error-code prefix, without any database
    text (driver errors, SQL statements, parameters), at most 1000 characters."""
    message = exc.message if isinstance(exc, MlflowException) else str(exc)
    message = _CODE_PREFIX.sub("", message, count=1)
    cut = _DATABASE_TEXT.search(message)
    if cut is not None:
        database_text = message[cut.start() :]
        message = message[: cut.start()].strip().rstrip(".:;,-").strip()
        if message:
            message = f"{message}."
        else:
            # Nothing but the database's words: say what they mean, not what they are.
            too_long = _TOO_LONG.search(database_text)
            message = _TOO_LONG_SENTENCE if too_long else _NO_SENTENCE
    return message.strip()[:1000]


def search_field(message: str, filter_string: str, order_by: Sequence[str], page_token: str) -> str:
    """The search request field an MLflow complaint is about; empty when that is unclear.

    MLflow names no field: the one field given, or words of its message, tell."""
    given = [
        field
        for field, value in (
            ("filter", filter_string),
            ("order_by", order_by),
            ("page_token", page_token),
        )
        if value
    ]
    lowered = message.lower()
    if given == ["order_by"] or (
        "page token" not in lowered and ("order_by" in lowered or "order by" in lowered)
    ):
        return _order_term(message, order_by)
    if len(given) == 1:
        return given[0]
    if "page token" in lowered:
        return "page_token"
    return ""


def _order_term(message: str, order_by: Sequence[str]) -> str:
    """`order_by[i]` for the term MLflow refused: the only one, or the one its message
    names (quoted, or last: "... field name: x"); `order_by` when that cannot be told."""
    if len(order_by) == 1:
        return "order_by[0]"
    ending = message.rstrip(". ")
    named = [
        index
        for index, term in enumerate(order_by)
        if term and (f"'{term}" in message or f'"{term}' in message or ending.endswith(term))
    ]
    return f"order_by[{named[0]}]" if len(named) == 1 else "order_by"
