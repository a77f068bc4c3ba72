"""Process-wide MLflow settings: the sidecar's retry policy rules, not MLflow's."""

from __future__ import annotations

import os

from mlflow_sidecar.server.config import AppConfig

# MLflow reads the artifact root of a SQL store built in-process from this variable
# (the same one `mlflow server` sets), so the embedded store keeps artifacts in the data dir.
_SERVER_ARTIFACT_ROOT_ENV = "_MLFLOW_SERVER_ARTIFACT_ROOT"


def configure_mlflow_environment(config: AppConfig) -> None:
    """Set the environment MLflow's client reads: no HTTP retries of its own, our timeout,
    credentials passed through as MLflow expects them, no telemetry."""
    env = os.environ
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "0"
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(config.mlflow.request_timeout_s)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # Transfers are logged by the access log; tqdm bars would only clutter the sidecar's output.
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env.setdefault("DO_NOT_TRACK", "true")
    if config.mlflow.username:
        env["MLFLOW_TRACKING_USERNAME"] = config.mlflow.username
    if password := config.mlflow.password.get_secret_value():
        env["MLFLOW_TRACKING_PASSWORD"] = password
    if token := config.mlflow.token.get_secret_value():
        env["MLFLOW_TRACKING_TOKEN"] = token
    if config.mlflow.insecure_tls:
        env["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
    if config.embedded:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        config.artifact_root.mkdir(parents=True, exist_ok=True)
        env[_SERVER_ARTIFACT_ROOT_ENV] = str(config.artifact_root)
