"""ClientSettings refuse, naming the setting, what grpc would otherwise fail on later."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mlflow_sidecar.client import ClientContainer, load_env
from mlflow_sidecar.client.settings import ClientSettings
from tests.support.certs import Pki, make_pki


@pytest.mark.parametrize(
    ("given", "missing"),
    [("client_cert_file", "client_key_file"), ("client_key_file", "client_cert_file")],
)
def test_a_client_certificate_without_its_key_is_refused(given, missing):
    # grpc's core would abort the whole process at the first call.
    with pytest.raises(ValidationError, match=f"{given} is set without {missing}"):
        ClientSettings(tls=True, **{given: "/etc/tls/client.pem"})


def test_the_container_refuses_a_half_pair_before_any_call():
    container = ClientContainer()
    container.config.from_dict({"tls": True, "client_cert_file": "/etc/tls/client.pem"})
    with pytest.raises(ValidationError, match="client_key_file"):
        container.experiment_tracking()


def test_a_whole_pair_is_accepted(pki: Pki):
    cert, key = str(pki.client_cert), str(pki.client_key)
    settings = ClientSettings(
        tls=True,
        root_certificates_file=str(pki.ca_cert),
        client_cert_file=cert,
        client_key_file=key,
    )
    assert (settings.client_cert_file, settings.client_key_file) == (cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def not_pem(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-certificate.pem"
    path.write_text("this is not a certificate\n")
    return path


def test_a_missing_ca_file_is_refused_naming_it(tmp_path: Path):
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValidationError, match="root_certificates_file: cannot read") as err:
        ClientSettings(tls=True, root_certificates_file=str(missing))
    assert str(missing) in str(err.value)


def test_a_ca_file_that_is_not_pem_is_refused_naming_it(not_pem: Path):
    # grpc would fail every handshake: each call waited its deadline, then UNAVAILABLE.
    with pytest.raises(ValidationError, match=r"root_certificates_file: .* holds no PEM") as err:
        ClientSettings(tls=True, root_certificates_file=str(not_pem))
    assert str(not_pem) in str(err.value)


def test_the_container_refuses_a_ca_file_that_is_not_pem_before_any_call(not_pem: Path):
    container = ClientContainer()
    container.config.from_dict({"tls": True, "root_certificates_file": str(not_pem)})
    with pytest.raises(ValidationError, match="root_certificates_file"):
        container.experiment_tracking()


def test_a_client_certificate_that_is_not_pem_is_refused_naming_it(pki: Pki, not_pem: Path):
    with pytest.raises(ValidationError, match=r"client_cert_file: .* holds no PEM") as err:
        ClientSettings(tls=True, client_cert_file=str(not_pem), client_key_file=str(pki.client_key))
    assert str(not_pem) in str(err.value)


def test_a_key_of_another_certificate_is_refused_naming_it(pki: Pki):
    with pytest.raises(ValidationError, match=r"client_key_file: .* is not the unencrypted") as err:
        ClientSettings(
            tls=True, client_cert_file=str(pki.client_cert), client_key_file=str(pki.server_key)
        )
    assert str(pki.server_key) in str(err.value)


def test_a_missing_client_key_is_refused_naming_it(pki: Pki, tmp_path: Path):
    missing = tmp_path / "missing-key.pem"
    with pytest.raises(ValidationError, match="client_key_file: cannot read"):
        ClientSettings(
            tls=True, client_cert_file=str(pki.client_cert), client_key_file=str(missing)
        )


@pytest.mark.parametrize(
    ("files", "named"),
    [
        ({"root_certificates_file": "/etc/tls/ca.pem"}, "root_certificates_file"),
        (
            {"client_cert_file": "/etc/tls/client.pem", "client_key_file": "/etc/tls/client.key"},
            "client_cert_file",
        ),
    ],
)
def test_tls_files_without_tls_are_refused(files, named):
    # The channel would be plaintext: the files unused, the calls and token in the clear.
    with pytest.raises(ValidationError, match=f"{named} is set but tls is not") as err:
        ClientSettings(**files)
    assert "set tls: true" in str(err.value)


def test_the_container_refuses_a_ca_file_without_tls_before_any_call():
    container = ClientContainer()
    container.config.from_dict({"root_certificates_file": "/etc/tls/ca.pem"})
    with pytest.raises(ValidationError, match="root_certificates_file is set but tls is not"):
        container.experiment_tracking()


def test_the_environment_refuses_a_ca_file_without_tls(monkeypatch):
    from mlflow_sidecar.client import load_env

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_ROOT_CERTIFICATES_FILE", "/etc/tls/ca.pem")
    container = ClientContainer()
    load_env(container)  # tls may still come from the container's config
    with pytest.raises(ValidationError, match="MLFLOW_SIDECAR_CLIENT_TLS=true"):
        container.settings()


@pytest.mark.parametrize("name", ["timeout_s", "transfer_timeout_s"])
@pytest.mark.parametrize("value", ["inf", "nan", 1e10, "-inf"])
def test_a_deadline_grpc_cannot_keep_is_refused(name, value):
    # Past about 9.2e9 s grpc's deadline overflows and every call ends at once.
    with pytest.raises(ValidationError, match=name):
        ClientSettings(**{name: value})


def test_a_deadline_of_a_year_is_kept():
    assert ClientSettings(timeout_s=365 * 86_400).timeout_s == 365 * 86_400


def test_a_stream_may_keep_trying_for_ever():
    assert ClientSettings(stream_reconnect_s="inf").stream_reconnect_s == float("inf")


def test_the_environment_is_checked_the_same_way(monkeypatch):
    from mlflow_sidecar.client.settings import ClientEnvSettings

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TIMEOUT_S", "inf")
    with pytest.raises(ValidationError, match="timeout_s"):
        ClientEnvSettings()


@pytest.mark.parametrize(
    "token",
    ["secret-token\n", " secret-token", "secret token", "secret-tökén", "secret\ttoken"],
)
def test_a_token_grpc_cannot_send_is_refused_without_showing_it(token):
    # grpc failed every call with a bare INTERNAL "Invalid metadata", naming no setting.
    with pytest.raises(ValidationError, match="token holds whitespace") as err:
        ClientSettings(token=token)
    assert "secret" not in str(err.value)


def test_a_token_from_the_environment_is_refused_without_showing_it(monkeypatch):
    from mlflow_sidecar.client import load_env

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TOKEN", "secret-token\n")
    with pytest.raises(ValidationError, match="token") as err:
        load_env(ClientContainer())
    assert "secret" not in str(err.value)


def test_a_refusal_of_another_setting_does_not_show_the_token():
    # Model-level refusals echoed every setting given, the token among them.
    with pytest.raises(ValidationError, match="client_key_file") as err:
        ClientSettings(tls=True, client_cert_file="/etc/tls/client.pem", token="secret-token")
    assert "secret" not in str(err.value)


def test_a_bearer_token_of_every_allowed_character_is_kept():
    token = "Abz09-._~+/=!#$%&'*^`|"
    assert ClientSettings(token=token).token == token


@pytest.mark.parametrize("target", ["", " ", "host :50051"])
def test_a_target_grpc_cannot_parse_is_refused_naming_it(target):
    with pytest.raises(ValidationError, match="target"):
        ClientSettings(target=target)


def test_the_usual_targets_are_kept():
    for target in ("127.0.0.1:50051", "[::1]:50051", "dns:///sidecar:50051", "unix:/run/s.sock"):
        assert ClientSettings(target=target).target == target


@pytest.mark.parametrize("value", [2**31, 2**32, 1024 * 1024 * 1024 + 1])
def test_a_message_limit_past_the_sidecars_bound_is_refused(value):
    # Past 2**31 - 1 grpc's channel argument overflows and every call raises OverflowError.
    with pytest.raises(ValidationError, match="max_message_bytes"):
        ClientSettings(max_message_bytes=value)


def test_the_largest_message_limit_is_the_sidecars():
    assert ClientSettings(max_message_bytes=1024 * 1024 * 1024).max_message_bytes == 2**30


def test_the_environment_refuses_an_overflowing_message_limit(monkeypatch):
    from mlflow_sidecar.client.settings import ClientEnvSettings

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_MAX_MESSAGE_BYTES", str(2**32))
    with pytest.raises(ValidationError, match="max_message_bytes"):
        ClientEnvSettings()


def test_tls_files_from_env_go_with_tls_from_the_config(tmp_path, monkeypatch):
    pki = make_pki(tmp_path)
    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_ROOT_CERTIFICATES_FILE", str(pki.ca_cert))
    container = ClientContainer()
    container.config.from_dict({"target": "sidecar.internal:50051", "tls": True})
    load_env(container)
    settings = container.settings()
    assert settings.tls and settings.root_certificates_file == str(pki.ca_cert)


@pytest.mark.parametrize(
    "target", ["127.0.0.1:65537", "localhost:99999", "[::1]:70000", "dns:///sidecar:0"]
)
def test_a_port_grpc_would_wrap_is_refused(target):
    # grpc takes a port modulo 65536: 127.0.0.1:65537 reached port 1, another service.
    with pytest.raises(ValidationError, match="not a number from 1 to 65535"):
        ClientSettings(target=target)


@pytest.mark.parametrize("target", ["localhost:abc", "localhost:"])
def test_a_port_that_is_no_number_is_refused(target):
    with pytest.raises(ValidationError, match="target"):
        ClientSettings(target=target)


@pytest.mark.parametrize(
    "target", ["sidecar://127.0.0.1:50051", "http://127.0.0.1:50051", "grpc://sidecar:50051"]
)
def test_a_uri_grpc_does_not_resolve_is_refused(target):
    # grpc looked the whole URI up as a host name, and every call waited out its deadline.
    with pytest.raises(ValidationError, match="grpc resolves no"):
        ClientSettings(target=target)


def test_the_environment_refuses_a_wrapping_port(monkeypatch):
    from mlflow_sidecar.client.settings import ClientEnvSettings

    monkeypatch.setenv("MLFLOW_SIDECAR_CLIENT_TARGET", "127.0.0.1:65537")
    with pytest.raises(ValidationError, match="target"):
        ClientEnvSettings()


def test_grpc_target_uris_are_kept():
    for target in (
        "localhost:50051",
        "dns://8.8.8.8/sidecar:50051",
        "ipv4:127.0.0.1:50051",
        "unix:///run/sidecar.sock",
        "unix-abstract:sidecar",
        "sidecar.internal",
    ):
        assert ClientSettings(target=target).target == target
