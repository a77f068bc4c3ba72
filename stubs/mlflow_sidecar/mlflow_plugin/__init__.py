"""MLflow plugins for `sidecar://` URIs: stock MLflow code talks to a sidecar unchanged.

    pip install "mlflow-sidecar[mlflow]"
    export MLFLOW_TRACKING_URI=sidecar://127.0.0.1:50051    # sidecar+tls:// for TLS

Registered through MLflow's entry points (`mlflow.tracking_store`,
`mlflow.model_registry_store`, `mlflow.artifact_repository`); each store is built on the
typed client (`mlflow_sidecar.client`), configured by the URI's target and scheme and by
the `MLFLOW_SIDECAR_CLIENT_*` variables (token, certificates, deadlines).
"""
