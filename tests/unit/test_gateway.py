"""MlflowGateway: MLflow errors -> domain errors, and retries bounded by the call deadline."""

from __future__ import annotations

import errno
import os
import time
from types import SimpleNamespace

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos import databricks_pb2
from mlflow.utils.rest_utils import verify_rest_response

from mlflow_sidecar.client import errors
from mlflow_sidecar.core.domain import LifecycleStage, Metric
from mlflow_sidecar.core.errors import ErrorReason
from mlflow_sidecar.server.call_deadline import deadline_scope
from mlflow_sidecar.server.config import load_config
from mlflow_sidecar.server.mlflow_gateway import MlflowGateway, mlflow_internals
from mlflow_sidecar.server.mlflow_gateway.errors import is_transient, search_field, to_domain_error
from mlflow_sidecar.server.mlflow_gateway.sources import quoted


def _wrapped_connection_error() -> MlflowException:
    try:
        try:
            raise requests.exceptions.ConnectionError("connection refused")
        except requests.exceptions.ConnectionError as exc:
            raise MlflowException(f"API request failed with exception {exc}") from None
    except MlflowException as wrapped:
        return wrapped


def _http_error(status: int) -> requests.exceptions.HTTPError:
    """What MLflow's artifact proxy client raises for an HTTP error answer."""
    response = requests.Response()
    response.status_code = status
    return requests.exceptions.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MlflowException("x", databricks_pb2.RESOURCE_DOES_NOT_EXIST), errors.NotFoundError),
        (MlflowException("x", databricks_pb2.RESOURCE_ALREADY_EXISTS), errors.AlreadyExistsError),
        (MlflowException("x", databricks_pb2.INVALID_PARAMETER_VALUE), errors.InvalidArgumentError),
        (MlflowException("x", databricks_pb2.INVALID_STATE), errors.FailedPreconditionError),
        (MlflowException("x", databricks_pb2.PERMISSION_DENIED), errors.PermissionDeniedError),
        (MlflowException("x", databricks_pb2.INTERNAL_ERROR), errors.InternalError),
        (
            MlflowException(
                "The run abc must be in the 'active' state. Current state is deleted.",
                databricks_pb2.INVALID_PARAMETER_VALUE,
            ),
            errors.FailedPreconditionError,
        ),
        (
            RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
            errors.UnavailableError,
        ),
        (
            RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}),
            errors.UnavailableError,
        ),
        (_wrapped_connection_error(), errors.UnavailableError),
        (_http_error(403), errors.PermissionDeniedError),
        (_http_error(401), errors.PermissionDeniedError),
        (_http_error(404), errors.NotFoundError),
        (_http_error(400), errors.InvalidArgumentError),
        (_http_error(418), errors.InternalError),
        (_http_error(429), errors.UnavailableError),
        (_http_error(503), errors.UnavailableError),
        (ValueError("odd"), errors.InternalError),
    ],
)
def test_mlflow_errors_map_to_domain_errors(exc, expected):
    assert type(to_domain_error(exc)) is expected


@pytest.mark.parametrize(
    ("exc", "reason", "metadata"),
    [
        (
            MlflowException("x", databricks_pb2.RESOURCE_DOES_NOT_EXIST),
            ErrorReason.NOT_FOUND,
            {"mlflow_error_code": "RESOURCE_DOES_NOT_EXIST"},
        ),
        (
            MlflowException(
                "The run abc must be in the 'active' state. Current state is deleted.",
                databricks_pb2.INVALID_PARAMETER_VALUE,
            ),
            ErrorReason.RUN_NOT_ACTIVE,
            {"mlflow_error_code": "INVALID_PARAMETER_VALUE"},
        ),
        (
            RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}),
            ErrorReason.MLFLOW_UNAVAILABLE,
            {"mlflow_error_code": "TEMPORARILY_UNAVAILABLE"},
        ),
        (_http_error(503), ErrorReason.MLFLOW_UNAVAILABLE, {"http_status": "503"}),
        (_http_error(413), ErrorReason.UPLOAD_TOO_LARGE, {"http_status": "413"}),
        (_http_error(404), ErrorReason.NOT_FOUND, {"http_status": "404"}),
        # MLflow never answered: its client's INTERNAL_ERROR is not what MLflow said.
        (_wrapped_connection_error(), ErrorReason.MLFLOW_UNAVAILABLE, {}),
        # The sidecar's disk, full while MLflow's client wrote a download: one file...
        (OSError(errno.ENOSPC, "No space left on device"), ErrorReason.DISK_FULL, {}),
        # ... or several, folded by MLflow into the words of one exception.
        (
            MlflowException(
                "The following failures occurred while downloading one or more artifacts from"
                " mlflow-artifacts:/1/abc/artifacts:\n##### File model/w.bin #####\n"
                "[Errno 28] No space left on device"
            ),
            ErrorReason.DISK_FULL,
            {},
        ),
    ],
)
def test_mlflow_errors_carry_a_reason_and_what_mlflow_said(exc, reason, metadata):
    error = to_domain_error(exc)
    assert error.reason == reason
    assert error.metadata == metadata


def _foreign(status: int, body: str) -> MlflowException:
    """What MLflow's client raises for an answer whose body is not MLflow's JSON."""
    response = requests.Response()
    response.status_code = status
    response._content = body.encode()
    try:
        verify_rest_response(response, "/api/2.0/mlflow/runs/get")
    except MlflowException as exc:
        return exc
    raise AssertionError("MLflow's client took the page as its answer")


LOGIN_PAGE = "<html><body><form action='/login'>Sign in</form></body></html>"


@pytest.mark.parametrize(
    ("exc", "expected", "reason", "transient"),
    [
        # A proxy's or an ingress's page: a passing fault, never the caller's request.
        (
            _foreign(400, "<html>400 Bad Request</html>"),
            errors.UnavailableError,
            "MLFLOW_UNAVAILABLE",
            True,
        ),
        (
            _foreign(404, "<html>no route</html>"),
            errors.UnavailableError,
            "MLFLOW_UNAVAILABLE",
            True,
        ),
        (_foreign(200, LOGIN_PAGE), errors.UnavailableError, "MLFLOW_UNAVAILABLE", True),
        # The sidecar's own credentials refused: not the caller's token, and no retry helps.
        (_foreign(401, "Unauthorized"), errors.PermissionDeniedError, "MLFLOW_DENIED", False),
        (_foreign(403, "Forbidden"), errors.PermissionDeniedError, "MLFLOW_DENIED", False),
        (
            MlflowException("x", databricks_pb2.UNAUTHENTICATED),
            errors.PermissionDeniedError,
            "MLFLOW_DENIED",
            False,
        ),
        (
            _foreign(413, "<html>413 Request Entity Too Large</html>"),
            errors.ResourceExhaustedError,
            "RESOURCE_EXHAUSTED",
            False,
        ),
        # MLflow's own JSON refusal stays the caller's.
        (
            RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad key"}),
            errors.InvalidArgumentError,
            "INVALID_ARGUMENT",
            False,
        ),
    ],
)
def test_an_answer_that_is_not_mlflows_says_so(exc, expected, reason, transient):
    error = to_domain_error(exc)
    assert type(error) is expected
    assert error.reason == reason
    assert is_transient(exc) is transient
    if exc.message.startswith("API request"):
        # The status the page came with, not the error code MLflow's client guessed from it.
        assert list(error.metadata) == ["http_status"]
        assert error.metadata["http_status"] in exc.message or "successful" in exc.message


def test_a_proxys_page_is_named_as_such_without_its_whole_text():
    error = to_domain_error(_foreign(400, "<html>" + "x" * 5000 + "</html>"))
    assert "not MLflow's answer" in error.message and "HTTP 400" in error.message
    assert len(error.message) < 500


def test_only_transient_failures_are_retried():
    assert is_transient(_wrapped_connection_error())
    assert not is_transient(MlflowException("x", databricks_pb2.RESOURCE_DOES_NOT_EXIST))
    assert is_transient(_http_error(502))
    assert not is_transient(_http_error(403))


@pytest.fixture()
def gateway(tmp_path) -> MlflowGateway:
    config = load_config(
        data_dir=tmp_path,
        retry={"max_tries": 5, "max_time_s": 30, "factor_s": 0.01, "max_backoff_s": 0.05},
    )
    return MlflowGateway(config)


def test_transient_failures_are_retried_until_success(gateway):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _wrapped_connection_error()
        return "ok"

    assert gateway.call(flaky) == "ok"
    assert len(calls) == 3


def test_retries_stop_at_max_tries_with_unavailable(gateway):
    calls = []

    def down():
        calls.append(1)
        raise _wrapped_connection_error()

    with pytest.raises(errors.UnavailableError):
        gateway.call(down)
    assert len(calls) == 5


def test_retries_stop_at_the_call_deadline(tmp_path):
    config = load_config(
        data_dir=tmp_path,
        retry={"max_tries": 100, "max_time_s": 60, "factor_s": 0.05, "max_backoff_s": 0.1},
    )
    gateway = MlflowGateway(config)
    calls = []

    def down():
        calls.append(1)
        raise _wrapped_connection_error()

    started = time.monotonic()
    with deadline_scope(0.5), pytest.raises(errors.DeadlineExceededError):
        gateway.call(down)
    # Bounded by the 0.5 s deadline, not by 60 s or 100 tries.
    assert time.monotonic() - started < 5
    assert 1 < len(calls) < 100


def test_retries_stop_at_retry_max_time_s_before_a_farther_deadline(tmp_path):
    # retry.max_time_s is the longest a call retries MLflow, deadline or not: a caller
    # with a longer deadline gets UNAVAILABLE (MLflow's failure), not DEADLINE_EXCEEDED.
    config = load_config(
        data_dir=tmp_path,
        retry={"max_tries": 100, "max_time_s": 0.3, "factor_s": 0.01, "max_backoff_s": 0.05},
    )
    gateway = MlflowGateway(config)
    calls = []

    def down():
        calls.append(1)
        raise _wrapped_connection_error()

    with deadline_scope(600), pytest.raises(errors.UnavailableError):
        gateway.call(down)
    assert 1 < len(calls) < 100


def test_non_idempotent_calls_are_not_retried(gateway):
    calls = []

    def down():
        calls.append(1)
        raise _wrapped_connection_error()

    with pytest.raises(errors.UnavailableError):
        gateway.call(down, retry=False)
    assert len(calls) == 1


def test_permanent_errors_are_not_retried(gateway):
    calls = []

    def missing():
        calls.append(1)
        raise MlflowException("no run", databricks_pb2.RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(errors.NotFoundError):
        gateway.call(missing)
    assert len(calls) == 1


_SQLITE_DUPLICATE = (
    "Experiment(name=x) already exists. Error: (raised as a result of Query-invoked autoflush;"
    " consider using a session.no_autoflush block if this flush is occurring prematurely)\n"
    "(sqlite3.IntegrityError) UNIQUE constraint failed: experiments.name\n"
    "[SQL: INSERT INTO experiments (name, artifact_location) VALUES (?, ?)]\n"
    "[parameters: ('x', '')]\n(Background on this error at: https://sqlalche.me/e/20/gkpj)"
)
_POSTGRES_DUPLICATE = (
    "RESOURCE_ALREADY_EXISTS: Registered Model (name=m) already exists. Error:"
    " (psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint"
    ' "registered_model_pk"\nDETAIL:  Key (name)=(m) already exists.\n'
    "[SQL: INSERT INTO registered_models (name) VALUES (%(name)s)]"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (_SQLITE_DUPLICATE, "Experiment(name=x) already exists."),
        (_POSTGRES_DUPLICATE, "Registered Model (name=m) already exists."),
        ("(sqlite3.OperationalError) no such table: runs", "MLflow's database refused the request"),
        ("bad thing [SQL: SELECT 1]", "bad thing."),
        ("Run 'abc' not found", "Run 'abc' not found"),
    ],
)
def test_no_sql_reaches_a_caller(message, expected):
    error = to_domain_error(MlflowException(message, databricks_pb2.RESOURCE_ALREADY_EXISTS))
    assert error.message == expected


# How a tracking server on PostgreSQL answers a run whose artifact URI its column cannot
# hold: the code's name, then nothing but the database's words.
_POSTGRES_TOO_LONG = (
    "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush"
    " block if this flush is occurring prematurely)\n(psycopg2.errors.StringDataRightTruncation)"
    " value too long for type character varying(200)\n\n[SQL: INSERT INTO runs (run_uuid)"
    " VALUES (%(run_uuid)s)]"
)


def test_a_server_refusal_of_only_database_text_says_what_it_means_without_its_code():
    error = to_domain_error(
        RestException({"error_code": "BAD_REQUEST", "message": _POSTGRES_TOO_LONG})
    )
    assert isinstance(error, errors.InvalidArgumentError)
    assert error.message == "MLflow's database refused a value longer than its column holds"
    error = to_domain_error(
        RestException({"error_code": "BAD_REQUEST", "message": "(psycopg2.errors.Foo) no"})
    )
    assert error.message == "MLflow's database refused the request"
    error = to_domain_error(
        RestException({"error_code": "INVALID_STATE", "message": "The run is not active."})
    )
    assert error.message == "The run is not active."


# -- which search field an MLflow complaint is about -------------------------------------


@pytest.mark.parametrize(
    ("message", "given", "field"),
    [
        ("Invalid comparator for attribute: ~~", {"filter_string": "x"}, "filter"),
        ("Invalid attribute key 'bogus' specified.", {"order_by": ["bogus"]}, "order_by[0]"),
        (
            "Invalid attribute key 'bogus' specified.",
            {"order_by": ["name", "bogus"]},
            "order_by[1]",
        ),
        ("Invalid order_by clause.", {"order_by": ["name", "version"]}, "order_by"),
        (
            "Invalid order by field name: no_such_column",
            {"order_by": ["name", "no_such_column"]},
            "order_by[1]",
        ),
        ("anything", {"page_token": "t"}, "page_token"),
        (
            "Invalid page token, could not base64-decode",
            {"filter_string": "x", "page_token": "t"},
            "page_token",
        ),
        (
            "Invalid ordering key in order_by clause 'name SIDEWAYS'.",
            {"filter_string": "x", "order_by": ["name SIDEWAYS"]},
            "order_by[0]",
        ),
        ("Invalid comparator", {"filter_string": "x", "order_by": ["name"]}, ""),
    ],
)
def test_search_complaints_name_their_field(message, given, field):
    args = {"filter_string": "", "order_by": [], "page_token": "", **given}
    assert search_field(message, **args) == field


def test_filter_literals_are_quoted_with_the_quote_the_value_lacks():
    assert quoted("agent") == "'agent'"
    assert quoted("it's") == '"it\'s"'
    with pytest.raises(errors.InvalidArgumentError) as err:
        quoted('it\'s "x"')
    assert err.value.field == "name"


def test_building_a_gateway_changes_nothing_until_it_is_opened(tmp_path):
    environment = dict(os.environ)
    providers = list(mlflow_internals.request_header_providers() or [])
    config = load_config(data_dir=tmp_path / "data")
    gateway = MlflowGateway(config)
    assert dict(os.environ) == environment
    assert list(mlflow_internals.request_header_providers() or []) == providers
    assert not (tmp_path / "data" / "mlflow.db").exists()
    with pytest.raises(errors.InternalError) as err:
        gateway.get_run("0" * 32)
    assert "open()" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("message", "expected", "reason"),
    [
        # MLflow's quirk: an alias that is not set is an invalid parameter "... not found".
        ("Registered model alias champion not found.", errors.NotFoundError, "ALIAS_NOT_FOUND"),
        # Any other invalid-parameter answer stays what MLflow said it is.
        ("Parameter 'alias' is something else.", errors.InvalidArgumentError, "INVALID_ARGUMENT"),
    ],
)
def test_only_an_unset_alias_becomes_not_found(tmp_path, monkeypatch, message, expected, reason):
    config = load_config(data_dir=tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:9"})
    gateway = MlflowGateway(config)
    gateway.open()  # an HTTP store: nothing is contacted until a call

    def answer(name: str, alias: str) -> None:
        raise MlflowException(message, databricks_pb2.INVALID_PARAMETER_VALUE)

    monkeypatch.setattr(gateway.client, "get_model_version_by_alias", answer)
    with pytest.raises(expected) as err:
        gateway.get_model_version_by_alias("agent", "champion")
    assert err.value.reason == reason


def test_metric_points_sent_without_retry_are_tried_once(tmp_path, monkeypatch):
    # The spool's deliverer sends this way: its workers back off together instead.
    config = load_config(
        data_dir=tmp_path,
        mlflow={"tracking_uri": "http://127.0.0.1:9"},
        retry={"max_tries": 5, "max_time_s": 30, "factor_s": 0.01, "max_backoff_s": 0.05},
    )
    gateway = MlflowGateway(config)
    gateway.open()
    calls = []

    def down(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise _wrapped_connection_error()

    # To a tracking server, metric points go as a body of their own through MLflow's call.
    monkeypatch.setattr(mlflow_internals, "post_log_batch", down)
    points = [Metric("loss", 1.0, 1, 0)]
    with pytest.raises(errors.UnavailableError):
        gateway.log_metrics("r", points, retry=False)
    assert len(calls) == 1
    with pytest.raises(errors.UnavailableError):
        gateway.log_metrics("r", points)
    assert len(calls) == 1 + 5


@pytest.mark.parametrize(
    ("method", "read"),
    [
        ("get_registered_model", lambda gateway, **kw: gateway.get_registered_model("m", **kw)),
        ("get_model_version", lambda gateway, **kw: gateway.get_model_version("m", 1, **kw)),
    ],
)
def test_model_reads_without_retry_are_tried_once(tmp_path, monkeypatch, method, read):
    # An alias watch's poller reads this way: its next poll is the retry.
    config = load_config(
        data_dir=tmp_path,
        mlflow={"tracking_uri": "http://127.0.0.1:9"},
        retry={"max_tries": 5, "max_time_s": 30, "factor_s": 0.01, "max_backoff_s": 0.05},
    )
    gateway = MlflowGateway(config)
    gateway.open()
    calls = []

    def down(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise _wrapped_connection_error()

    monkeypatch.setattr(gateway.client, method, down)
    with pytest.raises(errors.UnavailableError):
        read(gateway, retry=False)
    assert len(calls) == 1
    with pytest.raises(errors.UnavailableError):
        read(gateway)
    assert len(calls) == 1 + 5


def _experiment(stage: str) -> SimpleNamespace:
    return SimpleNamespace(
        experiment_id="7",
        name="e",
        artifact_location="",
        lifecycle_stage=stage,
        tags={},
        creation_time=1,
        last_update_time=2,
    )


def test_a_delete_or_restore_of_an_experiment_racing_another_is_done_not_missing(
    tmp_path, monkeypatch
):
    # Two calls look at the experiment at once and both ask MLflow to change it: MLflow
    # looks for it in the stage it leaves, so the second reads as a missing experiment.
    config = load_config(data_dir=tmp_path, mlflow={"tracking_uri": "http://127.0.0.1:9"})
    gateway = MlflowGateway(config)
    gateway.open()  # an HTTP store: nothing is contacted until a call

    def changed_meanwhile(experiment_id: str) -> None:
        raise MlflowException(
            f"No Experiment with id={experiment_id} exists", databricks_pb2.RESOURCE_DOES_NOT_EXIST
        )

    stages = iter(["active", "deleted"])
    monkeypatch.setattr(gateway.client, "get_experiment", lambda _id: _experiment(next(stages)))
    monkeypatch.setattr(gateway.client, "delete_experiment", changed_meanwhile)
    gateway.delete_experiment("7")

    stages = iter(["deleted", "active", "active"])
    monkeypatch.setattr(gateway.client, "restore_experiment", changed_meanwhile)
    assert gateway.restore_experiment("7").lifecycle_stage is LifecycleStage.ACTIVE

    # An experiment that is gone, or still as it was, stays an error.
    stages = iter(["active", "active"])
    with pytest.raises(errors.NotFoundError):
        gateway.delete_experiment("7")
    stages = iter(["deleted", "deleted"])
    with pytest.raises(errors.NotFoundError):
        gateway.restore_experiment("7")
