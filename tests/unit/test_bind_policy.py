"""One bind policy for every listener: gRPC and /metrics alike."""

from __future__ import annotations

import pytest

from mlflow_sidecar.server.config import ConfigError, insecure_listener_warnings, load_config
from tests.support.certs import make_pki


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("MLFLOW_SIDECAR"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    """A certificate and its key that pass the config's checks."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_metrics_on_a_remote_address_without_tls_is_refused_naming_the_setting(tmp_path, host):
    with pytest.raises(ConfigError) as err:
        load_config(data_dir=tmp_path, metrics={"host": host, "port": 9100})
    message = str(err.value)
    assert "metrics.host" in message and "allow_insecure_remote" in message
    assert "\n" not in message


def test_tokens_do_not_cover_metrics_because_it_checks_none(tmp_path):
    with pytest.raises(ConfigError, match=r"metrics\.host"):
        load_config(
            data_dir=tmp_path,
            metrics={"host": "0.0.0.0", "port": 9100},
            auth={"tokens": ["t"]},
        )


def test_metrics_on_a_remote_address_is_allowed_with_tls_or_the_switch(tmp_path, pem):
    remote = {"host": "0.0.0.0", "port": 9100}
    assert load_config(data_dir=tmp_path, metrics=remote, tls=pem)
    assert load_config(data_dir=tmp_path, metrics=remote, server={"allow_insecure_remote": True})


def test_metrics_turned_off_may_keep_any_host(tmp_path):
    assert load_config(data_dir=tmp_path, metrics={"host": "0.0.0.0", "port": 0})


def test_grpc_listener_error_names_its_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"server\.host"):
        load_config(data_dir=tmp_path, server={"host": "0.0.0.0"})


def test_plaintext_tokens_on_a_remote_address_are_warned_about(tmp_path, pem):
    warned = load_config(data_dir=tmp_path, server={"host": "0.0.0.0"}, auth={"tokens": ["t"]})
    assert [w for w in insecure_listener_warnings(warned) if "plaintext" in w]
    with_tls = load_config(
        data_dir=tmp_path, server={"host": "0.0.0.0"}, auth={"tokens": ["t"]}, tls=pem
    )
    assert insecure_listener_warnings(with_tls) == []
    loopback = load_config(data_dir=tmp_path, auth={"tokens": ["t"]})
    assert insecure_listener_warnings(loopback) == []


def test_the_warning_never_shows_the_token(tmp_path):
    config = load_config(
        data_dir=tmp_path, server={"host": "0.0.0.0"}, auth={"tokens": ["very-secret"]}
    )
    assert insecure_listener_warnings(config)
    assert not any("very-secret" in w for w in insecure_listener_warnings(config))
