"""The mlflow-sidecar server: config, services, servicers, the MLflow gateway and the CLI."""
