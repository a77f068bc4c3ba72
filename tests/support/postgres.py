"""A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.processes import free_port


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise FileNotFoundError(f"{name} not found: install PostgreSQL's server binaries")


class PostgresCluster:
    """initdb into a temp dir, pg_ctl start with trust auth on 127.0.0.1, pg_ctl stop.

    PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
    """

    def __init__(self) -> None:
        # Outside pytest's tmp dirs: those are private to root and postgres must enter this one.
        self.root = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._databases = 0

    def _run(self, *command: str) -> None:
        subprocess.run(
            [*self._as_user, *command], check=True, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        """Create and start the cluster."""
        self._run(
            _tool("initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8"
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            _tool("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "postgres.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URI."""
        self._databases += 1
        name = f"mlflow{self._databases}"
        self._run(
            _tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name
        )
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def drop_database(self, uri: str) -> None:
        """Drop a database `create_database` made, closing connections still open to it."""
        name = uri.rsplit("/", 1)[1]
        address = ("-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres")
        self._run(_tool("dropdb"), *address, "--force", name)

    def stop(self) -> None:
        """Stop the cluster, if it got as far as running, and remove its files."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
