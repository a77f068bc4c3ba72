"""MLflow-backed implementations of the ports: validation, idempotency, locking."""
