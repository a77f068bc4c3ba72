"""What the trainer-side client and the sidecar share: domain types, errors,
proto<->domain conversions, path rules and transfer framing.

Depends on gRPC and protobuf only: never on MLflow or dependency-injector, so the
server, the client and a health probe can import it cheaply. Import the modules
(`mlflow_sidecar.core.errors`, ...) directly; this package re-exports nothing.
"""
