"""moto's S3 server on a free loopback port, and the environment MLflow's S3 code reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3

from tests.support.processes import free_port, stop_process_group, wait_for_http

# moto accepts any credentials; these are what every S3 client in the tests signs with.
ACCESS_KEY_ID = "sidecar-test"
SECRET_ACCESS_KEY = "sidecar-test-secret"
REGION = "us-east-1"


class MotoS3:
    """`python -m moto.server` in its own process (so that it takes no GIL from the tests),
    serving S3 on 127.0.0.1 until `stop()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until it answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            wait_for_http(f"{self.endpoint_url}/moto-api/", timeout_s, self._proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"moto did not start; log:\n{self.log_tail()}") from None

    def stop(self) -> None:
        """Stop the server; every bucket goes with it."""
        proc, self._proc = self._proc, None
        stop_process_group(proc)

    @property
    def env(self) -> dict[str, str]:
        """The variables an MLflow user sets to reach this S3: credentials, region and
        `MLFLOW_S3_ENDPOINT_URL` (read by MLflow's S3 artifact repository)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client of this server, configured explicitly (not from the environment)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create an empty bucket."""
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Key -> {"size", "etag"} of every object under `prefix` (the ETag without quotes:
        `<md5>-<parts>` for a multipart upload, a plain md5 otherwise)."""
        found: dict[str, dict[str, Any]] = {}
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            for item in page.get("Contents", []):
                found[item["Key"]] = {"size": item["Size"], "etag": item["ETag"].strip('"')}
        return found

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def multipart_parts(etag: str) -> int:
    """How many parts an object was uploaded in, from its ETag (1 for a single PUT)."""
    _, dash, parts = etag.partition("-")
    return int(parts) if dash else 1
