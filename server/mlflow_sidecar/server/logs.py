"""Log formatting for the whole process: the sidecar's records and every library's.

In JSON mode each record is one JSON object per line, whoever logged it (MLflow, urllib3,
alembic, grpc, Python warnings), with an ISO 8601 UTC timestamp and the call's request id;
credentials in URLs are shown as `***` (`server.redaction`);
structured fields a record carries (the access log's `grpc_code`, `duration_ms`, ...) are
fields of their own, not text inside the message.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from mlflow_sidecar.core.clock import utc_timestamp
from mlflow_sidecar.server.redaction import redact
from mlflow_sidecar.server.request_context import request_id


class _UtcTime:
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return utc_timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        # Whoever logged it, message and traceback alike: MLflow's exceptions carry the
        # tracking URI's `user:password@` in the URLs they name.
        return redact(cast(logging.Formatter, super()).format(record))


class UtcTextFormatter(_UtcTime, logging.Formatter):
    """Plain text lines with ISO 8601 UTC times. A line break in a message (a name a
    caller chose, say) is written as `\n`, and a traceback's lines are indented, so that
    no text can pass for a log line of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return super().formatMessage(record).translate(_LINE_BREAKS)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return "\n".join(f"  {line}" for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join(f"  {line}" for line in stack_info.splitlines())


_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r"})


class UtcJsonFormatter(_UtcTime, JsonFormatter):
    """JSON lines with ISO 8601 UTC times."""


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            # With tracing on, a record names its trace: logs and spans join on it.
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object per record: time, level, logger, message, request id, and every
    `extra` field the record carries."""
    return UtcJsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
        rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
    )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on the `sys.stderr` of the moment each record is written, not the one
    of the moment it was made: code that swaps `sys.stderr` (an embedding application, a
    test harness capturing output) and closes the old one would otherwise leave every
    later record, from every thread, failing on a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        # StreamHandler assigns its stream once; the current sys.stderr is always used.
        pass


def configure_logging(level: str, fmt: str) -> None:
    """Text or JSON logs on stderr for every logger of the process.

    Libraries that attach their own handlers (MLflow gives `mlflow`, `alembic` and
    `sqlalchemy.engine` one each, printing plain text) lose them and propagate to the root
    handler instead. `level` holds for them too: a library that set its logger lower (MLflow
    sets INFO) writes nothing below it, one that set it higher stays that quiet. Python
    warnings become log records. Call it again after importing a library that configures
    its loggers at import."""
    handler = _StderrHandler()
    # On the handler, not only the root: a library's own logger level decides whether its
    # records are made, and they reach the root's handler whatever the root's level is.
    handler.setLevel(level)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(
            UtcTextFormatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers[:] = []
            logger.propagate = True
    logging.captureWarnings(True)
