"""What a proxy or ingress in front of a real `mlflow server` answers instead of MLflow (an
error page, a login page, a refusal of the sidecar's credentials) is told as such, and
costs no accepted point."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.core.domain import Metric, MetricPoint
from mlflow_sidecar.core.errors import PermissionDeniedError, UnavailableError
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.delay_proxy import DelayProxy
from tests.support.processes import MlflowServer

NGINX_400 = "<html><center><h1>400 Bad Request</h1></center><hr><center>nginx</center></html>"
LOGIN = "<html><body><form action='/oauth2/sign_in'>Sign in</form></body></html>"


class Pages:
    """Which requests the proxy answers itself, changed while it runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: dict[str, tuple[int, str, int]] = {}  # path suffix -> (status, page, times)

    def set(self, suffix: str, status: int, page: str, times: int = 1_000_000) -> None:
        with self.lock:
            self.rules[suffix] = (status, page, times)

    def __call__(self, _method: str, path: str) -> tuple[int, str] | None:
        with self.lock:
            for suffix, (status, page, times) in self.rules.items():
                if path.split("?", maxsplit=1)[0].endswith(suffix) and times > 0:
                    self.rules[suffix] = (status, page, times - 1)
                    return status, page
        return None


@pytest.fixture()
def proxied(mlflow_server: MlflowServer, tmp_path: Path) -> Iterator[tuple[Pages, ClientContainer]]:
    pages = Pages()
    with DelayProxy(
        mlflow_server.url, delay_s=0, delayed=lambda _m, _p: False, page=pages
    ) as proxy:
        running = RunningSidecar(
            sidecar_config(tmp_path / "sidecar", proxy.url, retry={"max_time_s": 3.0})
        )
        container = ClientContainer()
        container.config.from_dict({"target": running.target, "timeout_s": 30.0})
        try:
            yield pages, container
        finally:
            container.shutdown_resources()
            running.stop()


def test_a_proxys_error_page_costs_no_point_and_no_call_blames_the_request(
    proxied, mlflow_server: MlflowServer, unique: str
) -> None:
    pages, container = proxied
    tracking = container.experiment_tracking()
    run_id = tracking.start_run(tracking.create_experiment(f"pages-{unique}").experiment_id).run_id
    # One batch answered with nginx's page, as a misrouted request is: retried, not refused.
    pages.set("/runs/log-batch", 400, NGINX_400, times=1)
    points = [Metric("loss", float(step), 1_700_000_000_000 + step, step) for step in range(50)]
    assert tracking.log_metrics(run_id, points) == 50
    # The same page for a batch of the spool's: delivered later, never a dead letter.
    pages.set("/runs/log-batch", 400, NGINX_400, times=1)
    streamed = [
        MetricPoint(run_id, "reward", float(step), 1_700_000_000_000, step) for step in range(50)
    ]
    assert tracking.enqueue_metrics(streamed) == 50
    flushed = tracking.flush_metrics(run_id, timeout_s=30)
    assert (flushed.pending_points, flushed.dead_letter_points) == (0, 0)
    direct = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    for key in ("loss", "reward"):
        assert sorted(m.step for m in direct.get_metric_history(run_id, key)) == list(range(50))

    pages.set("/runs/get", 400, NGINX_400)
    with pytest.raises(UnavailableError) as page:
        tracking.get_run(run_id)
    assert page.value.reason == "MLFLOW_UNAVAILABLE" and page.value.field == ""
    assert "not MLflow's answer" in page.value.message
    assert page.value.metadata == {"http_status": "400"}

    pages.set("/runs/get", 200, LOGIN)
    with pytest.raises(UnavailableError) as login:
        tracking.get_run(run_id)
    assert "not MLflow's answer" in login.value.message and "Sign in" in login.value.message

    pages.set("/runs/get", 401, "Unauthorized")
    with pytest.raises(PermissionDeniedError) as denied:
        tracking.get_run(run_id)
    assert denied.value.reason == "MLFLOW_DENIED"
    assert "the caller's token is not at fault" in denied.value.message


def test_an_upload_a_proxy_answers_with_a_login_page_is_never_ok(
    proxied, mlflow_server: MlflowServer, unique: str, tmp_path: Path
) -> None:
    pages, container = proxied
    tracking = container.experiment_tracking()
    run_id = tracking.start_run(tracking.create_experiment(f"put-{unique}").experiment_id).run_id
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 4096)
    direct = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    # Every try answered by the proxy's login page: MLflow stores nothing, and says so.
    pages.set("/login.bin", 200, LOGIN)
    with pytest.raises(UnavailableError) as login:
        tracking.upload_artifact(run_id, weights, "login.bin")
    assert "not MLflow's artifact proxy" in login.value.message
    assert login.value.metadata["http_status"] == "200"
    assert direct.list_artifacts(run_id) == []
    # The first try only: the client sends it again and MLflow has it.
    pages.set("/again.bin", 200, LOGIN, times=1)
    stored = tracking.upload_artifact(run_id, weights, "again.bin")
    assert stored.size_bytes == weights.stat().st_size
    assert [f.path for f in direct.list_artifacts(run_id)] == ["again.bin"]
