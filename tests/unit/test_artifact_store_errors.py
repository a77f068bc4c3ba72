"""Failures of the artifact store (S3) itself: their status, their reason, and retries.

The exceptions are botocore's and boto3's own, raised the way botocore, boto3 and MLflow's
S3 repository raise them (inside the handler of what they wrap, which is how the chain
reaches the sidecar).
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import requests
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from botocore import exceptions as boto
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.store.artifact.cloud_artifact_repo import _complete_futures
from mlflow.store.artifact.s3_artifact_repo import BOTO_TO_MLFLOW_ERROR
from urllib3.exceptions import NewConnectionError, ProtocolError

from mlflow_sidecar.client import errors
from mlflow_sidecar.core.errors import ErrorReason
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway
from mlflow_sidecar.server.mlflow_gateway.errors import is_transient, to_domain_error

ENDPOINT = "http://s3.example.internal/bkt/exp/run/artifacts/f.bin"


def _raised_in_handler(inner: BaseException, outer: BaseException) -> BaseException:
    """`outer` as raised while handling `inner` (its `__context__`), as botocore, boto3 and
    MLflow raise theirs."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit chain is the point
    except BaseException as raised:
        return raised


def _endpoint_connection_error() -> BaseException:
    # botocore's endpoint: `except URLLib3NewConnectionError as e: raise
    # EndpointConnectionError(endpoint_url=request.url, error=e)`.
    cause = NewConnectionError(None, "Failed to establish a new connection: [Errno 111]")
    return _raised_in_handler(
        cause, boto.EndpointConnectionError(endpoint_url=ENDPOINT, error=cause)
    )


def _connection_closed_error() -> BaseException:
    cause = ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer"))
    return _raised_in_handler(
        cause, boto.ConnectionClosedError(endpoint_url=ENDPOINT, error=cause, request=None)
    )


def _client_error(code: str, message: str, operation: str, **error: str) -> boto.ClientError:
    return boto.ClientError(
        {
            "Error": {"Code": code, "Message": message, **error},
            "ResponseMetadata": {"HTTPStatusCode": 403 if code != "NoSuchBucket" else 404},
        },
        operation,
    )


def _upload_failed(client_error: boto.ClientError) -> BaseException:
    # boto3's S3Transfer.upload_file, in `except ClientError as e`.
    return _raised_in_handler(
        client_error,
        S3UploadFailedError(
            f"Failed to upload /data/tmp/f.bin to missing-bucket/exp/f.bin: {client_error}"
        ),
    )


def _mlflow_list_failed(client_error: boto.ClientError) -> BaseException:
    # MLflow's S3ArtifactRepository._iterate_s3_paginated_results.
    code = client_error.response["Error"]["Code"]
    return _raised_in_handler(
        client_error,
        MlflowException(
            "Failed to list artifacts in s3://missing-bucket/exp/run/artifacts:"
            f" {client_error.response['Error']['Message']}",
            error_code=BOTO_TO_MLFLOW_ERROR.get(code, databricks_pb2.INTERNAL_ERROR),
        ),
    )


def _signature_mismatch() -> boto.ClientError:
    return _client_error(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided.",
        "ListObjectsV2",
    )


def _failed_parts(tmp_path: Path, *failures: BaseException) -> MlflowException:
    """MLflow's report of a proxied multipart upload whose parts failed with `failures`:
    its HttpArtifactRepository._try_multipart_upload folds them into its message."""
    local_file = tmp_path / "f.bin"
    local_file.write_bytes(b"x" * 10)
    futures: dict[Future[object], int] = {}
    for number, failure in enumerate(failures, start=1):
        future: Future[object] = Future()
        future.set_exception(failure)
        futures[future] = number
    _, failed = _complete_futures(futures, str(local_file))
    return MlflowException(f"Failed to upload at least one part of {local_file}. Errors: {failed}")


def _part_reset() -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(
        ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer"))
    )


def _part_refused(status: int) -> requests.exceptions.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.exceptions.HTTPError(
        f"{status} Client Error: Forbidden for url: https://bkt.s3/f?X-Amz-Signature=abc",
        response=response,
    )


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(_endpoint_connection_error(), id="endpoint-unreachable"),
        pytest.param(_connection_closed_error(), id="connection-closed"),
        pytest.param(boto.ReadTimeoutError(endpoint_url=ENDPOINT), id="read-timeout"),
        pytest.param(boto.ConnectTimeoutError(endpoint_url=ENDPOINT), id="connect-timeout"),
        pytest.param(
            _upload_failed(_client_error("SlowDown", "Please reduce your rate", "PutObject")),
            id="upload-slow-down",
        ),
        pytest.param(
            _raised_in_handler(
                _connection_closed_error(), S3UploadFailedError("Failed to upload f.bin")
            ),
            id="upload-wrapping-connection-closed",
        ),
        pytest.param(
            RetriesExceededError(boto.ReadTimeoutError(endpoint_url=ENDPOINT)),
            id="download-retries-exceeded",
        ),
    ],
)
def test_a_transient_artifact_store_failure_is_unavailable_naming_the_store(exc):
    assert is_transient(exc)
    error = to_domain_error(exc)
    assert isinstance(error, errors.UnavailableError)
    assert error.reason == ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    assert error.message.startswith("the artifact store is unavailable")
    assert "MLflow" not in error.message


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(boto.NoCredentialsError(), id="no-credentials"),
        pytest.param(
            boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
            id="partial-credentials",
        ),
        pytest.param(
            _upload_failed(_client_error("AccessDenied", "Access Denied", "PutObject")),
            id="upload-access-denied",
        ),
        pytest.param(
            _upload_failed(
                _client_error(
                    "InvalidAccessKeyId", "The key you provided is not in our records.", "PutObject"
                )
            ),
            id="upload-unknown-key",
        ),
        # The same wrong secret, as upload, list and download meet it.
        pytest.param(_upload_failed(_signature_mismatch()), id="upload-wrong-secret"),
        pytest.param(_mlflow_list_failed(_signature_mismatch()), id="list-wrong-secret"),
        pytest.param(
            _raised_in_handler(
                _client_error("403", "Forbidden", "HeadObject"),
                MlflowException("Forbidden", error_code=databricks_pb2.PERMISSION_DENIED),
            ),
            id="head-forbidden",
        ),
    ],
)
def test_credentials_the_artifact_store_refuses_are_permission_denied(exc):
    error = to_domain_error(exc)
    assert not is_transient(exc)
    # Not UNAUTHENTICATED (MLflow's code for a wrong secret): that is the caller's token.
    assert isinstance(error, errors.PermissionDeniedError)
    assert error.reason == ErrorReason.ARTIFACT_STORE_DENIED
    assert "artifact store" in error.message and "credentials" in error.message


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(
            _upload_failed(
                _client_error(
                    "NoSuchBucket",
                    "The specified bucket does not exist",
                    "PutObject",
                    BucketName="missing-bucket",
                )
            ),
            id="upload-bucket-named-by-s3",
        ),
        pytest.param(
            _upload_failed(
                _client_error("NoSuchBucket", "The specified bucket does not exist", "PutObject")
            ),
            id="upload-bucket-named-by-boto3",
        ),
        pytest.param(
            _mlflow_list_failed(
                _client_error(
                    "NoSuchBucket", "The specified bucket does not exist", "ListObjectsV2"
                )
            ),
            id="list-bucket-named-by-mlflow",
        ),
    ],
)
def test_a_missing_bucket_is_failed_precondition_naming_the_bucket_not_the_run(exc):
    error = to_domain_error(exc)
    # Not NOT_FOUND: callers read that as the run, which exists.
    assert isinstance(error, errors.FailedPreconditionError)
    assert error.reason == ErrorReason.ARTIFACT_BUCKET_MISSING
    assert error.metadata == {"bucket": "missing-bucket"}
    assert "'missing-bucket'" in error.message


def test_a_missing_key_is_still_the_artifact_that_is_missing():
    missing = _raised_in_handler(
        _client_error("404", "Not Found", "HeadObject"),
        MlflowException("Not Found", error_code=databricks_pb2.RESOURCE_DOES_NOT_EXIST),
    )
    assert isinstance(to_domain_error(missing), errors.NotFoundError)


def test_a_presigned_part_whose_connection_broke_is_the_stores_transient_failure(tmp_path):
    failed = _failed_parts(tmp_path, _part_reset())
    assert is_transient(failed)
    error = to_domain_error(failed)
    assert isinstance(error, errors.UnavailableError)
    assert error.reason == ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    assert "ConnectionError" in error.message


def test_a_presigned_part_the_store_refused_is_not_retried(tmp_path):
    # One part refused (an expired URL, say) fails the next try as well.
    failed = _failed_parts(tmp_path, _part_reset(), _part_refused(403))
    assert not is_transient(failed)
    assert isinstance(to_domain_error(failed), errors.InternalError)


def test_the_store_failing_once_is_retried_and_the_call_succeeds(tmp_path):
    gateway = MlflowGateway(
        load_config(
            data_dir=tmp_path,
            retry={"max_tries": 5, "max_time_s": 30, "factor_s": 0.01, "max_backoff_s": 0.05},
        )
    )
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise _endpoint_connection_error()
        if len(calls) == 2:
            raise _failed_parts(tmp_path, _part_reset())
        return "stored"

    assert gateway.call(flaky) == "stored"
    assert len(calls) == 3


def test_the_store_staying_down_ends_unavailable_after_the_retries(tmp_path):
    gateway = MlflowGateway(
        load_config(
            data_dir=tmp_path,
            retry={"max_tries": 4, "max_time_s": 30, "factor_s": 0.01, "max_backoff_s": 0.05},
        )
    )
    calls = []

    def down() -> None:
        calls.append(1)
        raise _endpoint_connection_error()

    with pytest.raises(errors.UnavailableError) as raised:
        gateway.call(down)
    assert raised.value.reason == ErrorReason.ARTIFACT_STORE_UNAVAILABLE
    assert len(calls) == 4
