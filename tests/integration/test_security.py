"""Auth tokens, TLS and mTLS, the bind policy, and the server's limits."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.errors import (
    ErrorReason,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from mlflow_sidecar.server.config import ConfigError, load_config
from mlflow_sidecar.v1 import tracking_pb2 as pb
from mlflow_sidecar.v1 import tracking_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.certs import make_pki
from tests.support.processes import free_port
from tests.support.sidecar_process import SidecarProcess

TOKEN = "s3cr3t-token-for-tests"
OTHER_TOKEN = "second-token-from-file"
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
CLI = str(Path(sys.executable).with_name("mlflow-sidecar"))


def _code(call, request, **kwargs) -> grpc.StatusCode:
    """The status code of a call that must fail; a refusal must say why in its details."""
    with pytest.raises(grpc.RpcError) as err:
        call(request, **kwargs)
    if err.value.code() == grpc.StatusCode.UNAUTHENTICATED:
        assert error_from_rpc(err.value).reason == ErrorReason.UNAUTHENTICATED
    return err.value.code()


@pytest.fixture(scope="module")
def auth_sidecar(mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    tokens_file = tmp / "tokens"
    tokens_file.write_text(f"# trainers\n{OTHER_TOKEN}\n")
    running = RunningSidecar(
        sidecar_config(
            tmp / "data",
            mlflow_server.url,
            auth={"tokens": [TOKEN], "tokens_file": str(tokens_file)},
        )
    )
    yield running
    running.stop()


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(auth_sidecar, caplog):
    with caplog.at_level(logging.DEBUG), grpc.insecure_channel(auth_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        request = pb.GetExperimentRequest(experiment_id="0")
        assert _code(stub.GetExperiment, request) == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer not-the-token"),)
        assert _code(stub.GetExperiment, request, metadata=wrong) == grpc.StatusCode.UNAUTHENTICATED
        basic = (("authorization", f"Basic {TOKEN}"),)
        assert _code(stub.GetExperiment, request, metadata=basic) == grpc.StatusCode.UNAUTHENTICATED
        for token in (TOKEN, OTHER_TOKEN):
            reply = stub.GetExperiment(request, metadata=(("authorization", f"Bearer {token}"),))
            assert reply.experiment.experiment_id == "0"
        # Health needs no token: probes must work without secrets.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "refused" in caplog.text
    assert TOKEN not in caplog.text and "not-the-token" not in caplog.text


def test_streaming_calls_are_checked_too(auth_sidecar):
    with grpc.insecure_channel(auth_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        messages = iter([pb.StreamMetricsRequest(points=[pb.MetricPoint(run_id="r", key="k")])])
        assert _code(stub.StreamMetrics, messages) == grpc.StatusCode.UNAUTHENTICATED


def test_typed_client_takes_the_token_from_config(auth_sidecar):
    container = ClientContainer()
    container.config.from_dict({"target": auth_sidecar.target, "token": TOKEN})
    try:
        assert container.experiment_tracking().get_experiment("0").name == "Default"
    finally:
        container.shutdown_resources()
    anonymous = ClientContainer()
    anonymous.config.from_dict({"target": auth_sidecar.target})
    try:
        with pytest.raises(UnauthenticatedError):
            anonymous.experiment_tracking().get_experiment("0")
    finally:
        anonymous.shutdown_resources()


def test_grpcurl_with_a_bearer_header(auth_sidecar):
    header = ["-H", f"authorization: Bearer {TOKEN}"]
    listed = subprocess.run(
        [GRPCURL, "-plaintext", *header, auth_sidecar.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "mlflow_sidecar.v1.ExperimentTrackingService" in listed.stdout
    denied = subprocess.run(
        [GRPCURL, "-plaintext", auth_sidecar.target, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


def test_grpcurl_health_check_takes_the_header_for_reflection_only(auth_sidecar):
    # Health itself needs no token; grpcurl's reflection lookup of the method does.
    def check(*header: str) -> subprocess.CompletedProcess[str]:
        target, method = auth_sidecar.target, "grpc.health.v1.Health/Check"
        return subprocess.run(
            [GRPCURL, "-plaintext", *header, "-d", '{"service":""}', target, method],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    served = check("-H", f"authorization: Bearer {TOKEN}")
    assert served.returncode == 0 and '"SERVING"' in served.stdout, served.stderr
    denied = check()
    assert denied.returncode != 0, denied.stdout
    assert "Unauthenticated" in denied.stderr and "grpc.health.v1.Health" in denied.stderr
    with grpc.insecure_channel(auth_sidecar.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=60
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_sidecar(mlflow_server, tmp, pki, mutual: bool) -> RunningSidecar:
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mutual:
        tls["client_ca_file"] = str(pki.ca_cert)
    return RunningSidecar(sidecar_config(tmp, mlflow_server.url, tls=tls))


def _client(target: str, **settings) -> ClientContainer:
    container = ClientContainer()
    container.config.from_dict({"target": target, "timeout_s": 5, **settings})
    return container


def test_tls_server(mlflow_server, tmp_path, pki):
    running = _tls_sidecar(mlflow_server, tmp_path, pki, mutual=False)
    try:
        good = _client(running.target, tls=True, root_certificates_file=str(pki.ca_cert))
        assert good.experiment_tracking().get_experiment("0").experiment_id == "0"
        good.shutdown_resources()

        plaintext = _client(running.target, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            plaintext.experiment_tracking().get_experiment("0")
        assert time.monotonic() - started < 5  # fails cleanly, not by timing out
        plaintext.shutdown_resources()

        untrusted = _client(
            running.target, tls=True, root_certificates_file=str(pki.other_ca_cert), max_attempts=1
        )
        with pytest.raises(UnavailableError):
            untrusted.experiment_tracking().get_experiment("0")
        untrusted.shutdown_resources()

        probe = subprocess.run(
            [CLI, "health", "--target", running.target, "--ca-file", str(pki.ca_cert)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr
    finally:
        running.stop()


def test_mutual_tls(mlflow_server, tmp_path, pki):
    running = _tls_sidecar(mlflow_server, tmp_path, pki, mutual=True)
    try:
        with_cert = _client(
            running.target,
            tls=True,
            root_certificates_file=str(pki.ca_cert),
            client_cert_file=str(pki.client_cert),
            client_key_file=str(pki.client_key),
        )
        assert with_cert.experiment_tracking().get_experiment("0").experiment_id == "0"
        with_cert.shutdown_resources()

        without_cert = _client(
            running.target, tls=True, root_certificates_file=str(pki.ca_cert), max_attempts=1
        )
        with pytest.raises(UnavailableError):
            without_cert.experiment_tracking().get_experiment("0")
        without_cert.shutdown_resources()
    finally:
        running.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "sidecar.example"])
def test_remote_bind_without_auth_or_tls_is_refused(tmp_path, host):
    with pytest.raises(ConfigError) as err:
        load_config(data_dir=tmp_path, server={"host": host})
    message = str(err.value)
    assert "allow_insecure_remote" in message and "\n" not in message


def test_remote_bind_is_allowed_with_auth_tls_or_the_explicit_switch(tmp_path, pki):
    assert load_config(data_dir=tmp_path, server={"host": "0.0.0.0", "allow_insecure_remote": True})
    assert load_config(data_dir=tmp_path, server={"host": "0.0.0.0"}, auth={"tokens": ["t"]})
    assert load_config(
        data_dir=tmp_path,
        server={"host": "0.0.0.0"},
        tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)},
    )
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert load_config(data_dir=tmp_path, server={"host": loopback})


def test_serve_refuses_a_remote_bind_with_one_line(tmp_path):
    result = subprocess.run(
        [CLI, "serve"],
        env={"MLFLOW_SIDECAR__SERVER__HOST": "0.0.0.0", "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "refusing to listen on 0.0.0.0" in result.stderr


@pytest.fixture()
def limited_sidecar(tmp_path):
    """A sidecar whose MLflow is a closed port, with tight limits."""
    running = RunningSidecar(
        sidecar_config(
            tmp_path,
            f"http://127.0.0.1:{free_port()}",
            server={
                "max_metadata_bytes": 2048,
                "max_concurrent_rpcs": 2,
                "default_deadline_s": 1.5,
            },
            retry={"max_time_s": 60, "max_tries": 100},
        )
    )
    yield running
    running.stop()


def test_oversized_metadata_is_refused_and_the_server_survives(limited_sidecar):
    with grpc.insecure_channel(limited_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        big = (("x-padding", "p" * 8192),)
        code = _code(stub.GetRun, pb.GetRunRequest(run_id="r"), metadata=big, timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_calls_without_deadline_get_the_default_one(limited_sidecar):
    with grpc.insecure_channel(limited_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        started = time.monotonic()
        # No client deadline; MLflow is down and retries could take 60 s: the 1.5 s default rules.
        code = _code(stub.GetRun, pb.GetRunRequest(run_id="a" * 32))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 15


def test_concurrent_rpcs_over_the_limit_are_resource_exhausted(limited_sidecar):
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(limited_sidecar.target) as channel:
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)

        def slow_call() -> None:
            try:
                stub.GetRun(pb.GetRunRequest(run_id="a" * 32), timeout=10)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        threads = [threading.Thread(target=slow_call) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 2


def test_serve_refuses_remote_metrics_without_tls_with_one_line(tmp_path):
    result = subprocess.run(
        [CLI, "serve"],
        env={
            "MLFLOW_SIDECAR__METRICS__HOST": "0.0.0.0",
            "MLFLOW_SIDECAR__METRICS__PORT": "9100",
            "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "metrics.host" in result.stderr


def test_an_auth_refusal_is_logged_under_the_calls_request_id(auth_sidecar, caplog):
    from mlflow_sidecar.server.logs import _RequestIdFilter

    caplog.handler.addFilter(_RequestIdFilter())
    with (
        caplog.at_level(logging.WARNING, logger="mlflow_sidecar.server.auth"),
        grpc.insecure_channel(auth_sidecar.target) as channel,
    ):
        stub = pb_grpc.ExperimentTrackingServiceStub(channel)
        request = pb.GetExperimentRequest(experiment_id="0")
        metadata = (("x-request-id", "auth-refused-7"),)
        assert _code(stub.GetExperiment, request, metadata=metadata) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    refused = [r for r in caplog.records if r.name == "mlflow_sidecar.server.auth"]
    assert [(r.getMessage().split(":")[0], r.request_id) for r in refused] == [
        ("refused /mlflow_sidecar.v1.ExperimentTrackingService/GetExperiment", "auth-refused-7")
    ]


def test_mlflow_credentials_in_the_tracking_uri_reach_neither_callers_nor_the_log(tmp_path):
    # MLflow names the URL it failed to reach, `user:password@` included.
    password = "pw-that-must-not-show"
    closed = free_port()
    sidecar = SidecarProcess(
        tmp_path / "data",
        f"http://alice:{password}@127.0.0.1:{closed}",
        MLFLOW_SIDECAR__RETRY__MAX_TRIES="1",
        MLFLOW_SIDECAR__LOG_LEVEL="DEBUG",
    )
    sidecar.launch()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=90)
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.ExperimentTrackingServiceStub(channel).GetRun(
                    pb.GetRunRequest(run_id="a" * 32), timeout=30
                )
    finally:
        sidecar.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = str(err.value.details())
    assert f"http://***@127.0.0.1:{closed}/" in details, details
    assert password not in details
    logged = sidecar.log_path.read_text()
    assert f"***@127.0.0.1:{closed}" in logged, sidecar.log_tail()
    assert password not in logged


MLFLOW_TOKEN = "mlflow-s3cr3t-for-tests"
WRONG_TOKEN = "wr0ng-but-maybe-a-real-one"


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_tokens_never_reach_the_log_even_at_debug(mlflow_server, tmp_path, log_format):
    sidecar = SidecarProcess(
        tmp_path,
        mlflow_server.url,
        MLFLOW_SIDECAR__LOG_LEVEL="DEBUG",
        MLFLOW_SIDECAR__LOG_FORMAT=log_format,
        MLFLOW_SIDECAR__AUTH__TOKENS=f'["{TOKEN}"]',
        MLFLOW_SIDECAR__MLFLOW__TOKEN=MLFLOW_TOKEN,
    )
    sidecar.start()
    try:
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = pb_grpc.ExperimentTrackingServiceStub(channel)
            request = pb.GetExperimentRequest(experiment_id="0")
            for metadata in ((), (("authorization", f"Bearer {WRONG_TOKEN}"),)):
                code = _code(stub.GetExperiment, request, metadata=metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED
            # Through to MLflow, which the sidecar calls with mlflow.token.
            reply = stub.GetExperiment(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert reply.experiment.experiment_id == "0"
    finally:
        sidecar.stop()
    log = sidecar.log_path.read_text()
    assert "refused" in log and "GetExperiment" in log  # the calls were logged, at DEBUG
    for secret in (TOKEN, MLFLOW_TOKEN, WRONG_TOKEN):
        assert secret not in log
