"""Process-wide MLflow settings: the sidecar's retry policy rules, not MLflow's."""

from __future__ import annotations

import logging
import os

from mlflow.tracking.request_header.databricks_request_header_provider import (
    DatabricksRequestHeaderProvider,
)

from mlflow_sidecar.server.config import AppConfig, export_mlflow_env
from mlflow_sidecar.server.mlflow_gateway import mlflow_internals

log = logging.getLogger(__name__)


class MlflowSettingError(ValueError):
    """An MLflow variable of the environment holds a value MLflow cannot read; the message
    is one line for people."""


class NotMlflowError(MlflowSettingError):
    """What answers at the tracking URI is no MLflow tracking server (it answered OK
    where MLflow's answer has content); the message is one line for people."""


def configure_mlflow_environment(config: AppConfig) -> None:
    """Set the environment MLflow's client reads: no HTTP retries of its own, our timeout,
    credentials passed through as MLflow expects them, no telemetry. MlflowSettingError
    when one of MLflow's variables holds a value MLflow cannot read."""
    check_mlflow_settings()
    env = os.environ
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    export_mlflow_env("MLFLOW_HTTP_REQUEST_TIMEOUT", str(config.mlflow.request_timeout_s))
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # Transfers are logged by the access log; tqdm bars would only clutter the sidecar's output.
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # MLflow's client prints a "View run" link when a run ends: not a log record, and a
    # line that is not JSON in the JSON log format.
    env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    env.setdefault("DO_NOT_TRACK", "true")
    # Empty ones too: the config already holds MLflow's variables where its keys are unset,
    # so an empty value is a key set to empty, and an inherited username must not reach
    # MLflow next to the token the sidecar was given.
    export_mlflow_env("MLFLOW_TRACKING_USERNAME", config.mlflow.username)
    export_mlflow_env("MLFLOW_TRACKING_PASSWORD", config.mlflow.password.get_secret_value())
    export_mlflow_env("MLFLOW_TRACKING_TOKEN", config.mlflow.token.get_secret_value())
    # Always, false included: MLflow's client reads its variable itself, so one inherited
    # from the environment would turn certificate checks off against the sidecar's setting.
    export_mlflow_env(
        "MLFLOW_TRACKING_INSECURE_TLS", "true" if config.mlflow.insecure_tls else "false"
    )
    settle_request_header_providers()
    if config.embedded:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.artifact_root.mkdir(parents=True, exist_ok=True)
        env[mlflow_internals.SERVER_ARTIFACT_ROOT_ENV] = str(config.artifact_root)


def check_mlflow_settings() -> None:
    """MlflowSettingError naming every MLflow variable whose value MLflow cannot read.

    MLflow reads most of its variables when a call needs them: an `MLFLOW_S3_IGNORE_TLS`
    of "sometimes" would otherwise fail each download with an internal error, long after
    the start looked fine."""
    bad = []
    for setting in mlflow_internals.mlflow_settings():
        if setting.is_set():
            try:
                setting.get()
            except ValueError as exc:
                bad.append(str(exc).strip().rstrip("."))
    if bad:
        raise MlflowSettingError(
            f"MLflow cannot read {len(bad)} of its variables: {'; '.join(sorted(bad))};"
            " fix or unset them"
        )


def settle_request_header_providers() -> None:
    """Drop MLflow's Databricks request header provider when this process is not on
    Databricks, which a sidecar cannot move onto later.

    MLflow asks every provider `in_context()` before each REST call, and Databricks' tries
    to import dbruntime, pyspark and IPython each time: an import that fails is not
    cached, so that was about a millisecond of every call the sidecar made to MLflow.
    Other providers (plugins') are left alone: their context may change."""
    registry = mlflow_internals.request_header_providers()
    if registry is None:
        log.warning("MLflow's request header providers are not where expected; left as is")
        return
    registry[:] = [provider for provider in registry if _stays(provider)]


def _stays(provider: object) -> bool:
    if isinstance(provider, DatabricksRequestHeaderProvider):
        return bool(provider.in_context())  # type: ignore[no-untyped-call]
    return True
