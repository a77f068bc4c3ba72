# syntax=docker/dockerfile:1
# Build: docker build -t mlflow-sidecar .
# Run next to a trainer (shared network namespace), spool and embedded store in /data:
#   docker run --network container:<trainer> -v sidecar-data:/data mlflow-sidecar
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY stubs ./stubs
COPY server ./server
RUN python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --no-compile ".[server]"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --home-dir /data --shell /usr/sbin/nologin sidecar \
    && mkdir -p /data && chown sidecar:sidecar /data
COPY --from=build /opt/sidecar /opt/sidecar
# A sidecar shares the pod's network namespace with its trainer, so it listens on
# 127.0.0.1 (the default). To listen on other addresses configure auth or TLS
# (server.allow_insecure_remote overrides the check).
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_SIDECAR__DATA_DIR=/data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["mlflow-sidecar", "health", "--target", "127.0.0.1:50051"]
# Exec form: the server is PID 1 and receives SIGTERM for its drain-then-stop.
ENTRYPOINT ["mlflow-sidecar"]
CMD ["serve"]
