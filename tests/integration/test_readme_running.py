"""The README's "Running it" lines, run as written against a sidecar started the way
`make serve` starts it (the Makefile's own recipe, in a directory laid out like the repo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


def readme_lines() -> list[str]:
    """The shell lines of the first block under "## Running it"."""
    section = ROOT.joinpath("README.md").read_text().split("\n## Running it\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None
    # The first line, a comment, tells the README test to leave the block to this one.
    return [line for line in block.group(1).splitlines() if line.strip() and line[0] != "#"]


def make_serve_command() -> str:
    """The `serve` recipe of the Makefile, with make's variables as make sets them."""
    makefile = ROOT.joinpath("Makefile").read_text()
    recipe = re.search(r"^serve:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None
    return recipe.group(1).replace("$$", "$").replace("$(BIN)", ".venv/bin")


def test_readme_running_lines_work_as_written(tmp_path):
    lines = readme_lines()
    assert lines[0].startswith("make serve ")
    # The repo's layout, as far as the lines use it: .venv, and the dir make serve runs in.
    (tmp_path / ".venv").symlink_to(VENV)
    serve = make_serve_command().replace("$(CURDIR)", str(tmp_path))
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLFLOW_SIDECAR") and name not in MLFLOW_ENV_KEYS
    }
    # Another port than 50051, which other work on this machine may hold: given to the
    # sidecar and the README's lines alike, which read the same configuration.
    env["MLFLOW_SIDECAR__SERVER__PORT"] = str(free_port())
    target = f"127.0.0.1:{env['MLFLOW_SIDECAR__SERVER__PORT']}"
    log = (tmp_path / "serve.log").open("wb")
    # bash runs a lone command in its own process (exec), so terminate() reaches the sidecar.
    proc = subprocess.Popen(["bash", "-c", serve], cwd=tmp_path, env=env, stdout=log, stderr=log)

    def run(line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        # Ready: the whole server, and the first probe of MLflow done.
        deadline = time.monotonic() + 120
        while run(lines[2]).returncode != 0:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        results = [run(line) for line in lines[1:]]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()

    for line, result in zip(lines[1:], results, strict=True):
        assert result.returncode == 0, f"{line}: {result.stderr}"
    health, mlflow_health, spool = results
    assert health.stdout.strip() == f"{target}: SERVING"
    assert mlflow_health.stdout.strip() == f"{target}: SERVING"
    assert f"spool:              {tmp_path / '.sidecar-data' / 'spool.db'}" in spool.stdout
    assert "pending points:     0 of" in spool.stdout
