"""ClientSettings refuse, naming the setting, what grpc would otherwise fail on later."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.settings import ClientSettings


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


def test_a_whole_pair_is_accepted():
    settings = ClientSettings(client_cert_file="c.pem", client_key_file="k.pem")
    assert (settings.client_cert_file, settings.client_key_file) == ("c.pem", "k.pem")
