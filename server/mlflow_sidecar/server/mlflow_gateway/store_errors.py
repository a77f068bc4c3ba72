"""Failures of the artifact store itself (S3 and the like) -> domain errors.

A sidecar that writes to S3 itself gets boto3's and botocore's exceptions, often folded by
MLflow into an MlflowException whose error code is a guess (MLflow calls a wrong secret
UNAUTHENTICATED, which the sidecar keeps for its caller's token). A sidecar behind MLflow's
proxy sends multipart uploads to URLs the server presigns, and MLflow folds a failed part
into the words of one exception. Either way the failure is the store's, not MLflow's,
and its message says so.
"""

from __future__ import annotations

import ast
import re

from mlflow.exceptions import MlflowException

from mlflow_sidecar.core.errors import (
    ErrorReason,
    FailedPreconditionError,
    PermissionDeniedError,
    SidecarError,
    UnavailableError,
)

# botocore comes with the `s3` extra (boto3); the slim `remote` install may lack it, and
# then nothing can raise its exceptions either.
_TRANSIENT_BOTO: tuple[type[BaseException], ...]
_NO_CREDENTIALS: tuple[type[BaseException], ...]
_CLIENT_ERRORS: tuple[type[BaseException], ...]
_RETRIES_EXCEEDED: tuple[type[BaseException], ...]
try:
    from botocore import exceptions as botocore_exceptions

    _TRANSIENT_BOTO = (
        botocore_exceptions.EndpointConnectionError,
        botocore_exceptions.ConnectTimeoutError,
        botocore_exceptions.ConnectionClosedError,
        botocore_exceptions.ReadTimeoutError,
        botocore_exceptions.ResponseStreamingError,
    )
    _NO_CREDENTIALS = (
        botocore_exceptions.NoCredentialsError,
        botocore_exceptions.PartialCredentialsError,
    )
    _CLIENT_ERRORS = (botocore_exceptions.ClientError,)
except ModuleNotFoundError:
    _TRANSIENT_BOTO = _NO_CREDENTIALS = _CLIENT_ERRORS = ()
try:
    # boto3's download_file raises this after s3transfer's own retries of a broken body;
    # the failure that ended them is its `last_exception`.
    from boto3.exceptions import RetriesExceededError

    _RETRIES_EXCEEDED = (RetriesExceededError,)
except ModuleNotFoundError:
    _RETRIES_EXCEEDED = ()

# S3's error codes for credentials it does not accept (HEAD answers carry only "403").
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "403",
    }
)
_NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
# S3's own words for "try again": botocore has already retried these a few times.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}
)
# Where a bucket is named in the text of MLflow's and boto3's exceptions.
_BUCKET_IN_URI = re.compile(r"\bs3a?://([^/\s\"']+)")
_BUCKET_IN_UPLOAD = re.compile(r"\bto ([^/\s\"']+)/\S")

# MLflow's words for a proxied multipart upload of which some parts failed, followed by
# the `repr` of each part's exception, as a dict of part number -> text.
_FAILED_PARTS = "Failed to upload at least one part of "
_FAILED_PARTS_ERRORS = ". Errors: "
# The requests exceptions (by the name their `repr` starts with) a later try of a part
# may not see: the object store dropped the connection or did not answer in time.
_TRANSIENT_PART_FAILURE = re.compile(
    r"(?:ConnectionError|ConnectTimeout|ReadTimeout|Timeout|ChunkedEncodingError)\("
    r"|HTTPError\(['\"](?:5\d\d|408|429)\b"
)

_UNAVAILABLE = "the artifact store is unavailable"


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, first to last (a botocore retry's last failure included)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        if isinstance(current, _RETRIES_EXCEEDED):
            last = getattr(current, "last_exception", None)
            if isinstance(last, BaseException):
                chain.append(last)
        current = current.__cause__ or current.__context__
    return chain


def _client_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    return str(error.get("Code", "")) if isinstance(error, dict) else ""


def _bucket(chain: list[BaseException]) -> str:
    """The bucket the failure is about: as S3 names it in its answer, else as MLflow's or
    boto3's message does."""
    for cause in chain:
        response = getattr(cause, "response", None)
        error = response.get("Error", {}) if isinstance(response, dict) else {}
        if isinstance(error, dict) and error.get("BucketName"):
            return str(error["BucketName"])
    for cause in chain:
        text = cause.message if isinstance(cause, MlflowException) else str(cause)
        found = _BUCKET_IN_URI.search(text) or _BUCKET_IN_UPLOAD.search(text)
        if found is not None:
            return found.group(1)
    return ""


def _failed_parts_are_transient(exc: BaseException) -> bool:
    """Whether `exc` is MLflow's report of a multipart upload whose failed parts all
    failed in a way a later try may not see (the chain of each is lost in MLflow's text)."""
    if not isinstance(exc, MlflowException) or not exc.message.startswith(_FAILED_PARTS):
        return False
    _, found, listed = exc.message.partition(_FAILED_PARTS_ERRORS)
    if not found:
        return False
    try:
        failures = ast.literal_eval(listed)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return False
    return (
        isinstance(failures, dict)
        and bool(failures)
        and all(
            isinstance(text, str) and _TRANSIENT_PART_FAILURE.match(text)
            for text in failures.values()
        )
    )


def is_transient_store_failure(exc: BaseException) -> bool:
    """True for a failure of the artifact store that a later try may not see: it could not
    be reached, dropped the connection, timed out, asked to slow down or failed itself."""
    for cause in causes(exc):
        if isinstance(cause, _TRANSIENT_BOTO) or _failed_parts_are_transient(cause):
            return True
        if isinstance(cause, _CLIENT_ERRORS) and _client_error_code(cause) in _TRANSIENT_CODES:
            return True
    return False


def store_unavailable(detail: str) -> UnavailableError:
    """UNAVAILABLE for an artifact store that failed in a way worth a retry."""
    return UnavailableError(
        f"{_UNAVAILABLE}: {detail}", reason=ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    )


def store_error(exc: BaseException) -> SidecarError | None:
    """The domain error for a failure of the artifact store itself, else None (the failure
    is MLflow's, or the sidecar's). The message names the bucket where S3 refused it for
    a missing bucket, and never a credential."""
    chain = causes(exc)
    if is_transient_store_failure(exc):
        return store_unavailable(_detail(chain))
    for cause in chain:
        if isinstance(cause, _NO_CREDENTIALS):
            return PermissionDeniedError(
                "the sidecar has no credentials for the artifact store"
                f" ({type(cause).__name__}: {cause}); set AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY (or another of boto3's sources) in its environment",
                reason=ErrorReason.ARTIFACT_STORE_DENIED,
            )
        code = _client_error_code(cause) if isinstance(cause, _CLIENT_ERRORS) else ""
        if code in _DENIED_CODES:
            bucket = _bucket(chain)
            where = f" for bucket {bucket!r}" if bucket else ""
            return PermissionDeniedError(
                f"the artifact store refused the sidecar's credentials{where} ({code});"
                " check the AWS credentials in the sidecar's environment and what they may"
                " do in the bucket",
                reason=ErrorReason.ARTIFACT_STORE_DENIED,
            )
        if code in _NO_BUCKET_CODES:
            bucket = _bucket(chain)
            named = f"the bucket {bucket!r}" if bucket else "the bucket"
            return FailedPreconditionError(
                f"{named} of the run's artifact location does not exist in the artifact"
                " store; create it, or give the experiment an artifact location in a bucket"
                " that exists",
                reason=ErrorReason.ARTIFACT_BUCKET_MISSING,
                metadata={"bucket": bucket} if bucket else {},
            )
    return None


def _detail(chain: list[BaseException]) -> str:
    """The failure as the store's client put it: the innermost boto error, else the text
    of the outermost exception."""
    for cause in chain:
        if isinstance(cause, (*_TRANSIENT_BOTO, *_CLIENT_ERRORS)):
            return f"{type(cause).__name__}: {cause}"
    first = chain[0]
    text = first.message if isinstance(first, MlflowException) else str(first)
    return text[:1000]
