"""JSON logs cover every logger of the process, with ISO 8601 UTC times and own fields."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from mlflow_sidecar.core.clock import utc_timestamp
from mlflow_sidecar.server.logs import configure_logging
from mlflow_sidecar.server.request_context import request_id


@pytest.fixture()
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_utc_timestamp_is_iso_8601_with_zone():
    assert utc_timestamp(0.25) == "1970-01-01T00:00:00.250Z"


def test_json_mode_takes_over_library_loggers_and_warnings(restored_logging, capsys):
    library = logging.getLogger("some_library.module")
    own = logging.StreamHandler()
    library.handlers[:] = [own]
    library.propagate = False
    configure_logging("INFO", "json")
    token = request_id.set("rid-1")
    try:
        library.warning("plain text no more")
        logging.getLogger("mlflow_sidecar.access").info(
            "a call", extra={"grpc_code": "OK", "duration_ms": 1.5}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    finally:
        request_id.reset(token)
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON, none plain text
    by_logger = {r["logger"]: r for r in records}
    assert by_logger["some_library.module"]["message"] == "plain text no more"
    assert by_logger["some_library.module"]["request_id"] == "rid-1"
    assert "deprecated thing" in by_logger["py.warnings"]["message"]
    access = by_logger["mlflow_sidecar.access"]
    assert (access["grpc_code"], access["duration_ms"]) == ("OK", 1.5)
    assert all(r["time"].endswith("Z") for r in records)
    assert library.handlers == [] and library.propagate


def test_text_mode_uses_utc_times_too(restored_logging, capsys):
    configure_logging("INFO", "text")
    logging.getLogger("x").warning("hello")
    line = capsys.readouterr().err.strip()
    stamp = line.split(" ", 1)[0]
    assert stamp.endswith("Z") and stamp[10] == "T"
    assert line.endswith("[-] hello")


def test_records_inside_a_span_name_its_trace(restored_logging, capsys):
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    configure_logging("INFO", "json")
    span = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False)
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(span)))
    try:
        logging.getLogger("x").warning("inside")
    finally:
        context.detach(token)
    logging.getLogger("x").warning("outside")
    inside, outside = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert inside["trace_id"] == f"{0xABC:032x}" and inside["span_id"] == f"{0xDEF:016x}"
    assert "trace_id" not in outside


def test_records_go_to_the_stderr_of_the_moment_not_a_closed_one(restored_logging, monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("INFO", "text")
    logging.getLogger("mlflow_sidecar.test").info("before the swap")
    # Whoever swapped stderr in closes it and swaps another in (as pytest's capture does).
    monkeypatch.setattr(sys, "stderr", second)
    first.close()
    logging.getLogger("mlflow_sidecar.test").info("after the swap")
    (line,) = second.getvalue().splitlines()  # no "--- Logging error ---" report
    assert line.endswith("after the swap")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_level_holds_for_libraries_that_set_their_own(restored_logging, capsys, fmt):
    """log_level: ERROR keeps MLflow's INFO lines out, though MLflow sets its logger to INFO."""
    mlflow_logger, alembic_logger = logging.getLogger("mlflow"), logging.getLogger("alembic")
    levels = mlflow_logger.level, alembic_logger.level
    mlflow_logger.setLevel(logging.INFO)
    alembic_logger.setLevel(logging.INFO)
    try:
        configure_logging("ERROR", fmt)
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables")
        alembic_logger.info("Running upgrade")
        logging.getLogger("mlflow.store").error("a real problem")
    finally:
        mlflow_logger.setLevel(levels[0])
        alembic_logger.setLevel(levels[1])
    err = capsys.readouterr().err
    assert "Creating initial" not in err and "Running upgrade" not in err
    assert "a real problem" in err
    if fmt == "json":
        assert [json.loads(line)["level"] for line in err.splitlines()] == ["ERROR"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_times_are_utc_to_the_millisecond_with_a_z_in_both_formats(restored_logging, capsys, fmt):
    configure_logging("INFO", fmt)
    record = logging.makeLogRecord(
        {
            "name": "x",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "stamped",
            "created": 1769903999.123456,
        }
    )
    (handler,) = logging.getLogger().handlers
    handler.handle(record)
    line = capsys.readouterr().err.strip()
    stamp = json.loads(line)["time"] if fmt == "json" else line.split(" ", 1)[0]
    assert stamp == "2026-01-31T23:59:59.123Z"


def test_no_text_in_a_text_log_passes_for_a_line_of_its_own(restored_logging, capsys):
    # A name a caller chose, logged as it is, could otherwise forge an ERROR line.
    configure_logging("INFO", "text")
    forged = "x\n2026-01-01T00:00:00.000Z ERROR mlflow_sidecar.server.auth [-] FORGED"
    logger = logging.getLogger("mlflow_sidecar.test")
    logger.info("model %s is too large", forged)
    try:
        raise ValueError(forged)
    except ValueError:
        logger.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    own = [line for line in lines if not line.startswith(" ")]
    assert len(own) == 2, lines
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "x\\n2026-01-01T00:00:00.000Z ERROR" in own[0]
    assert "Traceback (most recent call last):" in lines[2]
