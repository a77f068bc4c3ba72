"""Every Python, shell and grpcurl block of the README runs as written, so the docs cannot rot.

The blocks run in document order, as a reader would run them: the Python blocks in one
interpreter, the shell blocks in one shell (with `set -euo pipefail`), against a sidecar
started the way `make serve` starts it (embedded store in `./.sidecar-data`), in a directory
laid out like the repo. The one change to the text: the documented address `127.0.0.1:50051`
becomes the test sidecar's (other work on this machine may hold 50051). A block whose first
line is `# not run by the README test: <why>` is left out, and must say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from tests.support.processes import free_port, wait_for_http
from tests.support.sidecar_process import SidecarProcess

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
DOC_TARGET = "127.0.0.1:50051"
MARKER = "# not run by the README test:"
LANGUAGES = {"python": "python", "sh": "sh"}
BLOCK_TIMEOUT_S = 600

RUN_PYTHON = """
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
for number, (line, code) in enumerate(blocks):
    print(f"--- README block at line {line}", flush=True)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
"""


@dataclass(frozen=True)
class Block:
    language: str  # python, sh, or "" for text
    code: str
    line: int  # 1-based line of the fence in README.md
    skipped: str | None  # why it is not run, from its marker


def readme_blocks() -> list[Block]:
    """The fenced blocks of the README, nested ones (in lists) too."""
    tokens = MarkdownIt("commonmark").parse(ROOT.joinpath("README.md").read_text())
    blocks = []
    for token in tokens:
        if token.type != "fence":
            continue
        info = token.info.strip().split()
        language = info[0] if info else ""
        first = token.content.splitlines()[0] if token.content else ""
        skipped = first.removeprefix(MARKER).strip() if first.startswith(MARKER) else None
        line = token.map[0] + 1 if token.map else 0
        blocks.append(Block(language, token.content, line, skipped))
    return blocks


def runnable(language: str) -> list[Block]:
    return [b for b in readme_blocks() if b.language == language and b.skipped is None]


def as_run(block: Block, target: str) -> str:
    return block.code.replace(DOC_TARGET, target)


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert {b.language for b in blocks} <= {*LANGUAGES, ""}, "a block the test would not run"
    for block in blocks:
        if block.skipped is not None:
            assert block.language in LANGUAGES, block.line
            assert len(block.skipped) > 10, f"README.md:{block.line} says not why"
    # Plain text blocks are layouts and diagrams, not commands.
    for block in blocks:
        if block.language == "":
            assert DOC_TARGET not in block.code and "grpcurl" not in block.code, block.line
    run = [b for b in blocks if b.language in LANGUAGES and b.skipped is None]
    skipped = [b for b in blocks if b.skipped is not None]
    assert len(runnable("python")) >= 4
    assert len(runnable("sh")) >= 4
    # Most of the README runs; what cannot (a cluster, a second terminal, a server that runs
    # until stopped) is the exception, each checked by a test of its own.
    assert len(run) > len(skipped)


def _environment(workdir: Path, target: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLFLOW_SIDECAR") and name not in MLFLOW_ENV_KEYS
    }
    # As the README asks: .venv/bin (grpcurl, mlflow) on the PATH.
    env["PATH"] = f"{workdir / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SIDECAR_CLIENT_TARGET"] = target
    return env


def _trainer_files(workdir: Path) -> dict[str, bytes]:
    """The files the README's trainer has: a checkpoint and an exported model directory."""
    files = {
        "ckpt/step_100.pt": os.urandom(300_000),
        "exported_model/MLmodel": b"flavors: {}\n",
        "exported_model/weights/policy.bin": os.urandom(70_000),
    }
    for relative, data in files.items():
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _run(command: list[str], workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )


def test_readme_examples_run_as_written(tmp_path):
    workdir = tmp_path
    (workdir / ".venv").symlink_to(VENV)
    sidecar = SidecarProcess(workdir / ".sidecar-data")  # make serve's data dir, embedded
    sidecar.start()
    env = _environment(workdir, sidecar.target)
    files = _trainer_files(workdir)
    try:
        python_blocks = [(b.line, as_run(b, sidecar.target)) for b in runnable("python")]
        (tmp_path / "blocks.json").write_text(json.dumps(python_blocks))
        python = _run([sys.executable, "-c", RUN_PYTHON, "blocks.json"], workdir, env)
        assert python.returncode == 0, python.stdout[-3000:] + python.stderr[-5000:]
        assert python.stdout.count("--- README block at line") == len(python_blocks)

        shell_blocks = runnable("sh")
        script = "set -euo pipefail\n" + "".join(
            f"echo '--- README block at line {b.line}'\n{as_run(b, sidecar.target)}\n"
            for b in shell_blocks
        )
        shell = _run(["bash", "-c", script], workdir, env)
        assert shell.returncode == 0, shell.stdout[-3000:] + shell.stderr[-5000:]
        assert shell.stdout.count("--- README block at line") == len(shell_blocks)

        check_effects(sidecar.target, workdir, files, shell)
        check_viewing_runs(workdir, env)
    finally:
        sidecar.stop()


def check_effects(
    target: str, workdir: Path, files: dict[str, bytes], shell: subprocess.CompletedProcess
) -> None:
    """What the blocks claim to do is done: read back through the typed client."""
    # Python: the checkpoint and the champion came back byte for byte.
    checkpoint = workdir / "downloads/ckpt/checkpoints/step_100.pt"  # the artifact path kept
    assert checkpoint.read_bytes() == files["ckpt/step_100.pt"]
    for relative in ("MLmodel", "weights/policy.bin"):
        downloaded = workdir / "downloads/model" / relative
        assert downloaded.read_bytes() == files[f"exported_model/{relative}"]
    container = ClientContainer()
    container.config.from_dict({"target": target})
    try:
        registry = container.model_registry()
        # Crowned by the watch example: the second upload; the candidate stays the first.
        champion = registry.get_model_version_by_alias("ppo-eurusd", "champion")
        assert (champion.version, champion.aliases) == (2, ("champion",))
        candidate = registry.get_model_version_by_alias("ppo-eurusd", "candidate")
        assert candidate.version == 1
        for served in ("serving/now", "serving/next"):
            assert (workdir / served / "MLmodel").read_bytes() == files["exported_model/MLmodel"]
        tracking = container.experiment_tracking()
        streamed = tracking.get_run(champion.run_id)
        assert streamed.info.run_name == "ppo-2"
        points, token = 0, ""
        while True:
            page = tracking.get_metric_history(champion.run_id, "reward", page_token=token)
            points += len(page.items)
            token = page.next_page_token
            if not token:
                break
        assert points == 10_000
    finally:
        container.shutdown_resources()
    # Shell: the upload's trailer, the refused create of a deleted experiment, the champion.
    assert '"sha256"' in shell.stdout
    assert "refused, as it should be" in shell.stdout
    assert "Code: FailedPrecondition" in shell.stderr
    assert '"aliases": [\n      "champion"\n    ]' in shell.stdout
    assert '"status": "SERVING"' in shell.stdout
    # The digest computed from the shell matched: one `unchanged` answer, no files.
    assert '"unchanged": {' in shell.stdout
    # The watches: the champion as it is, then resumed from version 1, each until -max-time.
    assert '"kind": "ALIAS_CHANGE_KIND_CURRENT"' in shell.stdout
    assert '"kind": "ALIAS_CHANGE_KIND_MOVED"' in shell.stdout
    assert '"previous_version": "1"' in shell.stdout
    assert '"mlflow_reachable": true' in shell.stdout
    assert shell.stdout.count("watched for 3 s") == 2


def check_viewing_runs(workdir: Path, env: dict[str, str]) -> None:
    """The README's `mlflow ui` line (not run with the blocks: it serves until stopped) shows
    the sidecar's runs and their artifacts, on another port than its 5000."""
    (block,) = [b for b in readme_blocks() if "mlflow ui" in b.code]
    (command,) = [line for line in block.code.splitlines() if "mlflow ui" in line]
    port = free_port()
    assert "--port 5000" in command
    ui = subprocess.Popen(
        ["bash", "-c", command.replace("--port 5000", f"--port {port}")],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", 180, ui)
        experiment = _get(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ppo-eurusd"
        )
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        by_name = {run["info"]["run_name"]: run["info"]["run_id"] for run in runs["runs"]}
        assert "ppo-2" in by_name
        listed = _get(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={by_name['ppo-2']}")
        assert "checkpoints" in {entry["path"] for entry in listed["files"]}
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())
