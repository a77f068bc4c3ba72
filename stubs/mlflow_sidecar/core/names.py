"""The rules for run ids and for param, metric and tag keys, on both sides of the wire:
MLflow's own, so that what the sidecar accepts MLflow takes, and a client refuses at
once what the sidecar would refuse (a bad key in a metric stream would otherwise fail the
message that carries it, good points and all)."""

from __future__ import annotations

import posixpath
import re

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_KEY_LENGTH, MAX_NAME_LENGTH, MAX_RUN_ID_LENGTH

_KEY_RE = re.compile(r"^[/\w.\- :]*\Z")
# Tag keys the sidecar sets itself ("One call, one effect": the request id tags by which a
# retried create finds what its first try made): a caller's tag under it could make a
# later create take another entity for its own, or miss its own.
RESERVED_TAG_PREFIX = "mlflow_sidecar."
# Characters MLflow refuses in a logged model's name.
LOGGED_MODEL_NAME_BAD_CHARS = ("/", ":", ".", "%", '"', "'")


def require(field: str, value: str, *, max_length: int = MAX_NAME_LENGTH) -> str:
    """A non-empty string of bounded length without control characters."""
    if not value:
        raise InvalidArgumentError(field, "must not be empty")
    if not value.strip():
        raise InvalidArgumentError(field, f"{value!r} is only whitespace; it names nothing")
    return bounded(field, value, max_length)


# MLflow's own rule for run ids (mlflow.utils.validation), checked here so that a malformed
# id is refused with its field named rather than in MLflow's words.
_RUN_ID_RE = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")


def run_id(field: str, value: str) -> str:
    """A run id as MLflow accepts one."""
    require(field, value, max_length=MAX_RUN_ID_LENGTH)
    if not _RUN_ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            field, f"{value!r} is not a run id (letters, digits, '_' and '-')"
        )
    return value


def bounded(field: str, value: str, max_length: int) -> str:
    """A string (possibly empty) of at most `max_length` characters, without NUL."""
    if len(value) > max_length:
        raise InvalidArgumentError(field, f"is {len(value)} characters long; at most {max_length}")
    if "\x00" in value:
        raise InvalidArgumentError(field, "must not contain NUL characters")
    return value


def key(field: str, value: str) -> str:
    """A param, metric or tag key as MLflow accepts it."""
    require(field, value, max_length=MAX_KEY_LENGTH)
    if not _KEY_RE.match(value):
        raise InvalidArgumentError(
            field,
            f"{value!r} may only contain letters, digits, underscores, dashes, periods,"
            " spaces, colons and slashes",
        )
    # MLflow's own rule (a key is a path in its file store): one spelling per path.
    normal = posixpath.normpath(value)
    if normal != value or normal == "." or normal.startswith(("..", "/")):
        raise InvalidArgumentError(
            field,
            f"{value!r} must be a relative path without '..', '.', empty segments or a"
            " trailing '/'",
        )
    return value


def not_reserved(field: str, value: str) -> str:
    """A tag key outside the sidecar's own (`RESERVED_TAG_PREFIX`)."""
    if value.startswith(RESERVED_TAG_PREFIX):
        raise InvalidArgumentError(
            field,
            f"{value!r}: tag keys starting with {RESERVED_TAG_PREFIX!r} are the sidecar's own",
        )
    return value


def tag_key(field: str, value: str) -> str:
    """A tag key as MLflow accepts it, outside the sidecar's own (`RESERVED_TAG_PREFIX`)."""
    key(field, value)
    return not_reserved(field, value)
