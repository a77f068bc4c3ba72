# syntax=docker/dockerfile:1
# Build: docker build -t mlflow-sidecar .
#   EXTRA=server (default): full MLflow, for the embedded store (SQLite + local artifacts).
#   EXTRA=remote: mlflow-skinny, for sidecars that talk to a tracking server
#   (MLFLOW_SIDECAR__MLFLOW__TRACKING_URI); a third of the size. With it, the embedded
#   store is refused at start with one line saying so.
#   docker build --build-arg EXTRA=remote -t mlflow-sidecar:remote .
# Run next to a trainer, in the trainer's network namespace (a pod, or
# `docker run --network container:<trainer>`), spool and embedded store in /data:
#   docker run --network container:<trainer> -v sidecar-data:/data mlflow-sidecar
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRA=server
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY stubs ./stubs
COPY server ./server
# Bytecode compiled here, checked by hash never by time: the root file system is read-only
# at run time, so nothing could be compiled then, and every start and probe would pay for it.
RUN case "$EXTRA" in server|remote) ;; *) echo "EXTRA must be server or remote" >&2; exit 1;; esac \
    && python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --no-compile ".[$EXTRA]" \
    && /opt/sidecar/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/sidecar/lib

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --home-dir /data --shell /usr/sbin/nologin sidecar \
    && mkdir -p /data && chown sidecar:sidecar /data
COPY --from=build /opt/sidecar /opt/sidecar
# How the container binds: the gRPC port on 127.0.0.1:50051 (the default), because a
# sidecar shares its trainer's network namespace and nothing else should reach it. So the
# image exposes no port: a published port would lead nowhere. To serve other containers,
# set MLFLOW_SIDECAR__SERVER__HOST=0.0.0.0 with auth (MLFLOW_SIDECAR__AUTH__TOKENS_FILE)
# or TLS and publish 50051 (deploy/compose does). Metrics (/metrics, /healthz, /readyz)
# are off until MLFLOW_SIDECAR__METRICS__PORT is set (deploy/kubernetes uses 9464).
# With TLS, HEALTHCHECK verifies the certificate against the system's trust roots: for a
# private CA, override it (docker run --health-cmd 'mlflow-sidecar health --ca-file
# /tls/ca.pem', or Compose's healthcheck.test); the certificate must name 127.0.0.1.
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_SIDECAR__DATA_DIR=/data
USER 10001:10001
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mlflow-sidecar", "health"]
# Exec form: the server is PID 1 and receives SIGTERM for its drain-then-stop.
ENTRYPOINT ["mlflow-sidecar"]
CMD ["serve"]
