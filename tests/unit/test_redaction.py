"""Credentials in URLs never show: not in answers to callers, not in log lines."""

from __future__ import annotations

import logging

import pytest
import requests
from mlflow import MlflowClient

from mlflow_sidecar.server.logs import configure_logging
from mlflow_sidecar.server.mlflow_gateway.errors import to_domain_error
from mlflow_sidecar.server.redaction import redact
from tests.support.processes import free_port
from tests.unit.test_logs import restored_logging  # noqa: F401 - a fixture


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://mlflow:5000/api", "http://mlflow:5000/api"),
        (
            "API request to http://alice:s3cret@mlflow:5000/api/2.0 failed",
            "API request to http://***@mlflow:5000/api/2.0 failed",
        ),
        (
            "postgresql://u:p@db/mlflow and https://t@h/x",
            "postgresql://***@db/mlflow and https://***@h/x",
        ),
        (
            "403 for url: https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc&x=1",
            "403 for url: https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        (
            "https://acct.blob.core.windows.net/c/b?sv=2020&sig=XYZ%3D",
            "https://acct.blob.core.windows.net/c/b?sv=2020&sig=***",
        ),
        ("an email a@b.c and a:b@c without a scheme", "an email a@b.c and a:b@c without a scheme"),
        ("'http://u:p@h'", "'http://***@h'"),
    ],
)
def test_credentials_in_urls_are_redacted(text, shown):
    assert redact(text) == shown


@pytest.fixture()
def unreachable_mlflow(monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(f"http://alice:s3cret@127.0.0.1:{free_port()}")


def test_mlflows_error_text_reaches_callers_without_the_uris_password(unreachable_mlflow):
    with pytest.raises(Exception) as raised:
        unreachable_mlflow.get_run("a" * 32)
    assert "s3cret" in str(raised.value), "MLflow no longer names the URL: nothing to redact"
    error = to_domain_error(raised.value)
    assert "http://***@127.0.0.1:" in error.message
    assert "s3cret" not in error.message


@pytest.mark.usefixtures("restored_logging")
@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_lines_and_tracebacks_hide_url_credentials(capsys, fmt):
    configure_logging("DEBUG", fmt)
    logger = logging.getLogger("some_library")
    logger.warning("unreachable: %s", "http://alice:s3cret@mlflow:5000/api")
    try:
        raise requests.exceptions.ConnectionError("to http://alice:s3cret@mlflow:5000/api")
    except requests.exceptions.ConnectionError:
        logger.exception("failed")
    written = capsys.readouterr().err
    assert written.count("http://***@mlflow:5000/api") >= 2, written
    assert "s3cret" not in written
