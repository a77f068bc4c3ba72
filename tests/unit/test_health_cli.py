"""`mlflow-sidecar health`: flags it cannot use are one line and exit 2, before any call."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.cli import EXIT_CONFIG, EXIT_UNHEALTHY, main


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_SIDECAR_CONFIG", raising=False)


@pytest.fixture()
def pem(tmp_path):
    path = tmp_path / "some.pem"
    path.write_text("not checked before the pair is\n")
    return str(path)


@pytest.mark.parametrize(
    ("flag", "missing"), [("--cert-file", "--key-file"), ("--key-file", "--cert-file")]
)
def test_a_client_certificate_without_its_key_is_refused(flag, missing, pem, capsys):
    # grpc's core would abort the process (SIGABRT) instead.
    code = main(["health", "--target", "127.0.0.1:1", "--ca-file", pem, flag, pem])
    assert code == EXIT_CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{flag} needs {missing}" in line


def test_a_missing_ca_file_is_one_line_naming_the_flag(tmp_path, capsys):
    missing = tmp_path / "nowhere.pem"
    assert main(["health", "--target", "127.0.0.1:1", "--ca-file", str(missing)]) == EXIT_CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--ca-file" in line and str(missing) in line


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "1e10", "soon"])
def test_a_timeout_a_probe_cannot_wait_is_refused_naming_the_flag(timeout, capsys):
    # It answered DEADLINE_EXCEEDED (exit 1) before: a healthy sidecar read as unhealthy.
    with pytest.raises(SystemExit) as exited:
        main(["health", "--target", "127.0.0.1:1", "--timeout", timeout])
    assert exited.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--timeout" in err and repr(timeout) in err


def test_a_trainers_mlflow_variables_leave_the_probe_alone(monkeypatch, capsys):
    # The trainer's own environment points MLflow at the sidecar; the probe never uses it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sidecar://127.0.0.1:1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "soon")
    assert main(["health", "--target", "127.0.0.1:1"]) == EXIT_UNHEALTHY
    said = capsys.readouterr().err.strip()
    # The code, then why: here nothing listens on the port.
    assert said.startswith("127.0.0.1:1: UNAVAILABLE (") and said.endswith(")"), said
    assert "connect" in said.lower() and "\n" not in said


@pytest.mark.parametrize(
    "target", ["127.0.0.1:65537", "127.0.0.1:0", "http://127.0.0.1:50051", "", " "]
)
def test_a_target_grpc_would_not_reach_as_written_is_refused_naming_the_flag(target, capsys):
    # 127.0.0.1:65537 probed port 1: whatever answered there stood for the sidecar.
    with pytest.raises(SystemExit) as exited:
        main(["health", "--target", target])
    assert exited.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "--target" in err and repr(target) in err


def test_a_client_certificate_alone_makes_the_probe_speak_tls(tmp_path, capsys):
    # A client certificate only TLS presents: the probe spoke plaintext and ignored it.
    import socket
    import threading

    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    first_bytes: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def read_hello() -> None:
            connection, _ = listener.accept()
            with connection:
                first_bytes.append(connection.recv(3))

        reader = threading.Thread(target=read_hello, daemon=True)
        reader.start()
        code = main(
            [
                "health",
                "--target",
                f"127.0.0.1:{port}",
                "--cert-file",
                str(pki.client_cert),
                "--key-file",
                str(pki.client_key),
                "--timeout",
                "1",
            ]
        )
        reader.join(5)
    assert code == EXIT_UNHEALTHY
    # A TLS handshake record (0x16, version 3.x), not HTTP/2's plaintext preface "PRI".
    assert first_bytes and first_bytes[0][:2] == b"\x16\x03", first_bytes


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["health", "--target", "127.0.0.1:1"],
        ["spool", "status"],
        ["spool", "requeue"],
        ["spool", "export", "--json"],
    ],
)
def test_an_empty_config_flag_is_refused_naming_it(command, monkeypatch, capsys):
    # `--config "$UNSET"` read as no --config: serve ran on the defaults' embedded store.
    # A bad port keeps a serve that wrongly went on from listening.
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "-1")
    with pytest.raises(SystemExit) as exited:
        main([*command, "--config", ""])
    assert exited.value.code == EXIT_CONFIG
    assert "--config" in capsys.readouterr().err


def test_a_config_of_port_0_without_target_is_refused_naming_the_flag(monkeypatch, capsys):
    # It probed 127.0.0.1:0 and reported the sidecar down (exit 1), whatever it was.
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "0")
    assert main(["health"]) == EXIT_CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "server.port is 0" in line and "--target" in line


@pytest.mark.parametrize("flag", ["--ca-file", "--cert-file", "--key-file"])
def test_an_empty_file_flag_is_refused_naming_it(flag, capsys):
    # `--ca-file "$UNSET"` read as the flag left out: the probe went plaintext.
    with pytest.raises(SystemExit) as exited:
        main(["health", "--target", "127.0.0.1:1", flag, ""])
    assert exited.value.code == EXIT_CONFIG
    assert f"argument {flag}" in capsys.readouterr().err
