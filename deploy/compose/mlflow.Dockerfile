# syntax=docker/dockerfile:1
# The official MLflow image with what a PostgreSQL backend and S3 artifacts need, pinned.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 boto3==1.40.0
