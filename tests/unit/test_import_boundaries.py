"""Which package may import which: the server and `core` never reach into the client,
`core` stays free of MLflow and dependency-injector, and the client's public import
paths keep working for trainer code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "server" / "mlflow_sidecar" / "server"
CORE = REPO / "stubs" / "mlflow_sidecar" / "core"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function bodies and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offenders(root: Path, *prefixes: str) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {name}"
        for path in root.rglob("*.py")
        for name in imported_modules(path)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    )


def test_the_walker_sees_every_form_of_import(tmp_path):
    # If the walker missed a form, the boundary checks below could not fail.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import mlflow_sidecar.client.channel\n"
        "from mlflow_sidecar import client\n"
        "def f():\n"
        "    from mlflow_sidecar.client.errors import NotFoundError\n"
        "from mlflow_sidecar.core.errors import SidecarError\n"
    )
    assert offenders(tmp_path, "mlflow_sidecar.client") == [
        f"{sample}: {name}"
        for name in (
            "mlflow_sidecar.client",
            "mlflow_sidecar.client.channel",
            "mlflow_sidecar.client.errors",
            "mlflow_sidecar.client.errors.NotFoundError",
        )
    ]


def test_the_server_never_imports_the_client():
    assert list(SERVER.rglob("*.py")), SERVER
    assert offenders(SERVER, "mlflow_sidecar.client") == []


def test_only_the_gateway_imports_mlflow():
    gateway = SERVER / "mlflow_gateway"
    outside = [
        o for o in offenders(SERVER, "mlflow") if not o.startswith(str(gateway.relative_to(REPO)))
    ]
    assert outside == []
    assert offenders(gateway, "mlflow"), "the check must see the gateway's own imports"


def test_services_servicers_and_the_spool_depend_on_the_port_not_on_mlflow():
    # They are handed an MlflowPort: importing them loads neither MLflow nor the gateway,
    # which only the composition root (container) builds.
    loaded = run_python(
        "import sys\n"
        "import mlflow_sidecar.server.services.registry, mlflow_sidecar.server.services.tracking\n"
        "import mlflow_sidecar.server.services.artifact_transfers\n"
        "import mlflow_sidecar.server.services.alias_watch, mlflow_sidecar.server.alias_watch\n"
        "import mlflow_sidecar.server.servicers.registry\n"
        "import mlflow_sidecar.server.servicers.tracking\n"
        "import mlflow_sidecar.server.spool.deliverer, mlflow_sidecar.server.mlflow_probe\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mlflow'"
        " or n == 'mlflow_sidecar.server.mlflow_gateway.gateway'))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize("forbidden", ["mlflow_sidecar.client", "mlflow", "dependency_injector"])
def test_core_imports_neither_client_nor_mlflow_nor_dependency_injector(forbidden):
    assert list(CORE.rglob("*.py")), CORE
    assert offenders(CORE, forbidden) == []


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_core_loads_neither_mlflow_nor_dependency_injector():
    loaded = run_python(
        "import sys, pkgutil, importlib, mlflow_sidecar.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n"
        "    importlib.import_module('mlflow_sidecar.core.' + m.name)\n"
        "print(sorted(n for n in sys.modules"
        " if n.split('.')[0] in ('mlflow', 'dependency_injector')"
        " or n.startswith('mlflow_sidecar.client')))"
    )
    assert loaded == "[]"


def test_importing_the_client_does_not_load_dependency_injector():
    code = "import sys, mlflow_sidecar.client\nprint('dependency_injector' in sys.modules)"
    assert run_python(code) == "False"


def test_the_container_loads_dependency_injector_on_first_use():
    code = (
        "import sys, mlflow_sidecar.client as client\n"
        "container = client.ClientContainer()\n"
        "client.load_env(container)\n"
        "print('dependency_injector' in sys.modules)"
    )
    assert run_python(code) == "True"


def test_the_client_keeps_its_public_names():
    import mlflow_sidecar.client as client
    from mlflow_sidecar.client import ports
    from mlflow_sidecar.client.container import ClientContainer, load_env
    from mlflow_sidecar.core import domain

    assert client.ClientContainer is ClientContainer
    assert client.load_env is load_env
    assert client.ExperimentTracking is ports.ExperimentTracking
    assert client.ModelRegistry is ports.ModelRegistry
    assert client.Metric is domain.Metric
    for name in client.__all__:
        assert getattr(client, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = client.no_such_name  # type: ignore[attr-defined]


def test_client_errors_is_core_errors():
    from mlflow_sidecar.client import errors as client_errors
    from mlflow_sidecar.core import errors as core_errors

    assert client_errors.__all__ == core_errors.__all__
    for name in core_errors.__all__:
        assert getattr(client_errors, name) is getattr(core_errors, name), name
    with pytest.raises(client_errors.NotFoundError):
        raise core_errors.NotFoundError("experiment 1 not found")


def test_the_spool_and_the_metric_batch_do_not_load_the_wire_schema():
    code = (
        "import sys, mlflow_sidecar.server.spool.deliverer, mlflow_sidecar.server.metric_batch\n"
        "print(sorted(n for n in sys.modules if n.startswith('mlflow_sidecar.v1')))"
    )
    assert run_python(code) == "[]"
    # The check can fail: the servicer's side does load it.
    assert run_python(code.replace("metric_batch", "servicers.tracking")) != "[]"
