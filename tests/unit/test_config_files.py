"""Files the configuration names are checked at load: one line naming the setting, not a
traceback at start or grpc's "failed to bind" that blames the port."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import ConfigError, load_config
from tests.support.certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def garbage(tmp_path):
    path = tmp_path / "garbage.pem"
    path.write_text("garbage\n")
    return path


def tls(cert, key, ca=None) -> dict[str, object]:
    return {"cert_file": cert, "key_file": key, "client_ca_file": ca}


def refusal(tmp_path, **sections) -> str:
    with pytest.raises(ConfigError) as refused:
        load_config(data_dir=tmp_path, **sections)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_good_files_load(pki, tmp_path):
    config = load_config(data_dir=tmp_path, tls=tls(pki.server_cert, pki.server_key, pki.ca_cert))
    assert config.tls.enabled


def test_a_certificate_that_is_not_pem_is_named(pki, garbage, tmp_path):
    message = refusal(tmp_path, tls=tls(garbage, pki.server_key))
    assert "tls.cert_file" in message and str(garbage) in message


def test_a_key_of_another_certificate_is_named(pki, tmp_path):
    message = refusal(tmp_path, tls=tls(pki.server_cert, pki.client_key))
    assert "tls.key_file" in message and str(pki.client_key) in message


def test_a_key_that_is_not_pem_is_named(pki, garbage, tmp_path):
    message = refusal(tmp_path, tls=tls(pki.server_cert, garbage))
    assert "tls.key_file" in message and str(garbage) in message


def test_a_client_ca_that_is_not_pem_is_named(pki, garbage, tmp_path):
    message = refusal(tmp_path, tls=tls(pki.server_cert, pki.server_key, garbage))
    assert "tls.client_ca_file" in message and str(garbage) in message


def test_a_tokens_file_that_is_not_utf8_is_named_without_its_bytes(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_bytes(b"\xff\xfesecret-ish\n")
    message = refusal(tmp_path, auth={"tokens_file": tokens})
    assert "auth.tokens_file" in message and "UTF-8" in message
    assert "secret-ish" not in message


@pytest.mark.parametrize("token", [" ", "s3cret-token\n", "s3cret tok", "s3crët"])
def test_a_token_no_client_could_present_is_refused_without_showing_it(tmp_path, token):
    # Accepted, it would leave every call UNAUTHENTICATED.
    message = refusal(tmp_path, auth={"tokens": ["fine-token", token]})
    assert "auth.tokens[1] holds whitespace" in message
    assert "s3cr" not in message


@pytest.mark.parametrize("line", ["s3cret tok", "s3crët"])
def test_a_tokens_file_line_no_client_could_present_is_refused_by_number(tmp_path, line):
    # Lines are stripped (the newline a file ends with is no part of a token); what is
    # left must be sendable.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# deploy tokens\n  fine-token  \n{line}\n", encoding="utf-8")
    message = refusal(tmp_path, auth={"tokens_file": tokens})
    assert "auth.tokens_file" in message and "line 3 holds whitespace" in message
    assert "s3cr" not in message


def test_files_grpc_serves_with_are_taken_whatever_this_systems_openssl_policy(tmp_path):
    # A 1024-bit RSA key: OpenSSL's default security level refuses it, grpc serves with it.
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = load_config(data_dir=tmp_path / "data", tls=tls(cert_file, key_file))
    assert config.tls.enabled


_FILE_SETTINGS = ("TLS__CERT_FILE", "TLS__KEY_FILE", "TLS__CLIENT_CA_FILE", "AUTH__TOKENS_FILE")


@pytest.mark.parametrize("name", _FILE_SETTINGS)
def test_a_file_setting_set_to_empty_is_unset(name, tmp_path, monkeypatch):
    """README: their default is empty, as a templated variable left blank gives them."""
    for other in _FILE_SETTINGS:
        monkeypatch.delenv(f"MLFLOW_SIDECAR__{other}", raising=False)
    monkeypatch.setenv(f"MLFLOW_SIDECAR__{name}", "")
    config = load_config(data_dir=tmp_path)
    assert not config.tls.enabled and config.tls.client_ca_file is None
    assert config.auth.tokens_file is None
