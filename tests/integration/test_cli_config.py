"""The CLI fails loudly on bad configuration (exit 2, one line naming the setting, no
traceback), and `health` and `spool status` read the same configuration as `serve`."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from mlflow_sidecar.server.config import MLFLOW_ENV_KEYS
from tests.support.processes import free_port
from tests.support.sidecar_process import CLI, SidecarProcess


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any sidecar or MLflow setting, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLFLOW_SIDECAR") and name not in MLFLOW_ENV_KEYS
    }
    return {**env, **extra}


def run_cli(args: list[str], env: dict[str, str], command: list[str] | None = None):
    return subprocess.run(
        [*(command or [CLI]), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]


def test_a_misspelt_variable_stops_serve(tmp_path):
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), MLFLOW_SIDECAR__SERVR__PORT="50052")
    result = run_cli(["serve"], env)
    assert_one_line_failure(
        result, "MLFLOW_SIDECAR__SERVR__PORT", "did you mean MLFLOW_SIDECAR__SERVER__PORT?"
    )


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("MLFLOW_SIDECAR_CONFG", "did you mean MLFLOW_SIDECAR_CONFIG?"),
        ("MLFLOW_SIDECAR_SPOOL__MAX_POINTS", "did you mean MLFLOW_SIDECAR__SPOOL__MAX_POINTS?"),
    ],
)
def test_a_variable_of_the_sidecars_prefix_that_names_nothing_stops_serve(tmp_path, variable, hint):
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), **{variable: "5"})
    assert_one_line_failure(run_cli(["serve"], env), f"unknown variable {variable}", hint)


def test_an_mlflow_variable_mlflow_cannot_read_stops_serve(tmp_path):
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), MLFLOW_S3_IGNORE_TLS="sometimes")
    result = run_cli(["serve"], env)
    assert_one_line_failure(
        result, "MLFLOW_S3_IGNORE_TLS value must be one of", "got sometimes", "fix or unset them"
    )
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "mlflow.tracking_uri"),
        ("MLFLOW_SIDECAR__MLFLOW__REGISTRY_URI", "mlflow.registry_uri"),
    ],
)
def test_a_uri_mlflow_has_no_store_for_stops_serve(tmp_path, variable, key):
    uris = {"MLFLOW_SIDECAR__MLFLOW__TRACKING_URI": "http://127.0.0.1:9"}
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), **{**uris, variable: "htp:/nowhere"})
    result = run_cli(["serve"], env)
    assert_one_line_failure(result, f"invalid config key {key} ({variable})", "'htp:/nowhere'")


def test_malformed_yaml_stops_serve(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("server:\n  port: 50052\n    workers: 4\n")
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path / "data"))
    result = run_cli(["serve", "--config", str(config)], env)
    assert_one_line_failure(result, f"config file {config} is not valid YAML", "line 3")


def test_an_unwritable_data_dir_stops_serve(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(blocker / "data"))
    result = run_cli(["serve"], env)
    assert_one_line_failure(result, "data_dir", "MLFLOW_SIDECAR__DATA_DIR", str(blocker / "data"))


def test_a_lock_file_that_cannot_be_opened_stops_serve_in_one_line(tmp_path):
    # The data dir is writable, but its lock file is something no lock can be taken on.
    data = tmp_path / "data"
    (data / "sidecar.lock").mkdir(parents=True)
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(data), MLFLOW_SIDECAR__SERVER__PORT="0")
    result = run_cli(["serve"], env)
    assert_one_line_failure(result, "cannot take the data dir lock", str(data / "sidecar.lock"))


def test_a_busy_metrics_port_stops_serve(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            MLFLOW_SIDECAR__DATA_DIR=str(tmp_path),
            MLFLOW_SIDECAR__SERVER__PORT=str(free_port()),
            MLFLOW_SIDECAR__METRICS__PORT=str(port),
        )
        result = run_cli(["serve"], env)
    assert_one_line_failure(result, "metrics.port", "MLFLOW_SIDECAR__METRICS__PORT", str(port))


def test_serve_without_mlflow_says_how_to_install_the_server_extra(tmp_path):
    # A client-only install: MLflow cannot be imported.
    without_mlflow = (
        "import sys; sys.modules['mlflow'] = None; "
        "from mlflow_sidecar.server.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = clean_env(
        MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), MLFLOW_SIDECAR__SERVER__PORT=str(free_port())
    )
    result = run_cli(["serve"], env, command=[sys.executable, "-c", without_mlflow])
    assert_one_line_failure(result, "pip install 'mlflow-sidecar[server]'", "mlflow")


@pytest.fixture()
def served(tmp_path) -> Iterator[SidecarProcess]:
    sidecar = SidecarProcess(tmp_path / "data")
    sidecar.env = clean_env(**{k: v for k, v in sidecar.env.items() if "SIDECAR" in k})
    sidecar.start()
    yield sidecar
    sidecar.stop()


def test_health_and_spool_status_find_the_sidecar_from_the_environment(served):
    env = clean_env(**{k: v for k, v in served.env.items() if "SIDECAR" in k})
    health = run_cli(["health"], env)
    assert health.returncode == 0, health.stderr
    assert health.stdout.strip() == f"{served.target}: SERVING"
    status = run_cli(["spool", "status"], env)
    assert status.returncode == 0, status.stderr
    assert f"spool:              {served.data_dir / 'spool.db'}" in status.stdout


def test_health_and_spool_status_read_the_config_file(served, tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"data_dir: {served.data_dir}\nserver:\n  port: {served.port}\n")
    env = clean_env()
    health = run_cli(["health", "--config", str(config)], env)
    assert health.stdout.strip() == f"{served.target}: SERVING"
    status = run_cli(["spool", "status", "--json"], clean_env(MLFLOW_SIDECAR_CONFIG=str(config)))
    assert status.returncode == 0, status.stderr
    assert f'"spool": "{served.data_dir / "spool.db"}"' in status.stdout


def test_health_without_config_probes_the_default_address_not_the_served_one(served):
    # The counterpart of the two tests above: without the config, the probe looks elsewhere.
    health = run_cli(["health", "--timeout", "1"], clean_env(MLFLOW_SIDECAR__SERVER__PORT="1"))
    assert health.returncode == 1
    assert health.stderr.startswith("127.0.0.1:1: ")


def test_health_speaks_tls_when_the_config_does(tmp_path):
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nserver:\n  port: {port}\n"
        f"tls:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
    )
    sidecar = SidecarProcess(tmp_path / "data")
    sidecar.env = clean_env(MLFLOW_SIDECAR_CONFIG=str(config))
    sidecar.launch()
    try:
        target = f"127.0.0.1:{port}"
        args = ["health", "--config", str(config), "--ca-file", str(pki.ca_cert)]
        for _ in range(300):
            health = run_cli(args, clean_env())
            if health.returncode == 0 or sidecar.proc is None or sidecar.proc.poll() is not None:
                break
        assert health.stdout.strip() == f"{target}: SERVING", sidecar.log_tail()
        # A plaintext probe of the same address gets no answer.
        assert run_cli(["health", "--target", target, "--timeout", "1"], clean_env()).returncode
        # A probe that trusts another CA says the handshake is what failed.
        args = ["health", "--config", str(config), "--ca-file", str(pki.other_ca_cert)]
        untrusted = run_cli([*args, "--timeout", "2"], clean_env())
        assert untrusted.returncode == 1
        assert untrusted.stderr.startswith(f"{target}: UNAVAILABLE ("), untrusted.stderr
        assert "handshake" in untrusted.stderr.lower(), untrusted.stderr
    finally:
        sidecar.stop()


class _AnswersOkToAll(http.server.BaseHTTPRequestHandler):
    """A server at a wrong address that answers every request 200 with `body`."""

    body = b""

    def _ok(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_PATCH = do_DELETE = _ok  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("body", [b"", b"{}"])
def test_a_tracking_uri_that_answers_ok_to_everything_stops_serve(tmp_path, body):
    # MLflow's client reads an empty 200 as success: such an address would take every
    # write (runs, points) and keep none.
    handler = type("Handler", (_AnswersOkToAll,), {"body": body})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as fake:
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        uri = f"http://127.0.0.1:{fake.server_address[1]}"
        env = clean_env(
            MLFLOW_SIDECAR__DATA_DIR=str(tmp_path),
            MLFLOW_SIDECAR__SERVER__PORT=str(free_port()),
            MLFLOW_SIDECAR__MLFLOW__TRACKING_URI=uri,
        )
        try:
            result = run_cli(["serve"], env)
        finally:
            fake.shutdown()
    assert_one_line_failure(result, f"mlflow.tracking_uri {uri} answers as no MLflow tracking")


def test_under_json_logs_a_refusal_at_start_is_one_json_line(tmp_path):
    # A log pipeline that parses every line as JSON keeps the one that says why the
    # sidecar did not start.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            MLFLOW_SIDECAR__DATA_DIR=str(tmp_path),
            MLFLOW_SIDECAR__SERVER__PORT=str(port),
            MLFLOW_SIDECAR__LOG_FORMAT="json",
        )
        result = run_cli(["serve"], env)
    line = json.loads(assert_one_line_failure(result, "server.port"))
    assert line["level"] == "CRITICAL" and line["logger"] == "mlflow_sidecar.server.cli"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert f"cannot listen on 127.0.0.1:{port}" in line["message"]


def test_a_busy_grpc_port_stops_serve(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), MLFLOW_SIDECAR__SERVER__PORT=str(port)
        )
        result = run_cli(["serve"], env)
    assert_one_line_failure(result, "server.port", "MLFLOW_SIDECAR__SERVER__PORT", str(port))


def test_a_grpc_port_taken_on_another_address_of_the_host_name_stops_serve(tmp_path):
    # To gRPC `localhost` is 127.0.0.1 and ::1: a listener on ::1 alone is found, as a
    # client of the name may reach it instead of the sidecar.
    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            taken.bind(("::1", 0))
        except OSError:
            pytest.skip("this machine has no IPv6 loopback")
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(
            MLFLOW_SIDECAR__DATA_DIR=str(tmp_path),
            MLFLOW_SIDECAR__SERVER__HOST="localhost",
            MLFLOW_SIDECAR__SERVER__PORT=str(port),
        )
        result = run_cli(["serve"], env)
    assert_one_line_failure(result, "server.port", f"localhost:{port}", "in use")


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        # A trainer's environment, where the sidecar is started too: it would call itself.
        ("MLFLOW_TRACKING_URI", "sidecar://127.0.0.1:50051", "mlflow.tracking_uri"),
        ("MLFLOW_REGISTRY_URI", "sidecar+tls://sidecar:50051", "mlflow.registry_uri"),
        ("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "SIDECAR://other:50051", "mlflow.tracking_uri"),
    ],
)
def test_serve_refuses_a_sidecar_as_its_own_mlflow(tmp_path, variable, value, key):
    env = clean_env(MLFLOW_SIDECAR__DATA_DIR=str(tmp_path), **{variable: value})
    line = assert_one_line_failure(run_cli(["serve"], env), key, "names a sidecar")
    assert "=sidecar://...` is for trainers" in line
