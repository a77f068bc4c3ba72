"""The shapes of a model version's source URI that the sidecar checks before registering."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError

# MLflow resolves 'latest' and 'v<number>' (any case) to versions and refuses to set them.
_VERSION_ALIAS_RE = re.compile(r"^[vV]\d+\Z")
_RUNS_SOURCE_RE = re.compile(r"^runs:/(?P<run_id>[A-Za-z0-9_\-]+)(?:/|\Z)")
# models:/NAME/VERSION and models:/NAME@ALIAS; other forms (stages, logged model ids) go to MLflow.
_MODELS_SOURCE_RE = re.compile(
    r"^models:/(?P<name>[^/@:]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?$"
)
# The largest version number: the contract's and MLflow's stores' (int64).
_MAX_VERSION = 2**63 - 1
# models:/<logged model id> (MLflow 3): the id is "m-" and 32 hex digits.
_LOGGED_MODEL_SOURCE_RE = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})/?\Z")


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A models:/NAME/VERSION (alias empty) or models:/NAME@ALIAS (version 0) source."""

    name: str
    version: int
    alias: str


def runs_source_run_id(source: str) -> str:
    """The run id of a runs:/RUN_ID/PATH source; empty for every other kind of source."""
    if not source.startswith("runs:"):
        return ""
    match = _RUNS_SOURCE_RE.match(source)
    if match is None:
        raise InvalidArgumentError("source", f"{source!r} is not of the form runs:/RUN_ID/PATH")
    return match["run_id"]


def models_source(source: str) -> ModelSource | None:
    """The version or alias a models:/ source names; None for other sources. A version
    past what a version number holds (int64) is INVALID_ARGUMENT on `source`: MLflow's
    stores fail on it with a server error, which reads as an outage."""
    match = _MODELS_SOURCE_RE.match(source)
    if match is None:
        return None
    version = int(match["version"] or 0)
    if version > _MAX_VERSION:
        raise InvalidArgumentError(
            "source",
            f"{source!r} names version {version}; a version number is at most {_MAX_VERSION}",
        )
    return ModelSource(match["name"], version, match["alias"] or "")


def source_logged_model_id(source: str) -> str:
    """The logged model a models:/<model id> source names; empty for other sources."""
    match = _LOGGED_MODEL_SOURCE_RE.match(source)
    return match["model_id"] if match else ""


def quoted(value: str, field: str = "name") -> str:
    """A string literal of MLflow's filter syntax."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise InvalidArgumentError(field, "must not contain both ' and \" characters")


def quotable(value: str) -> bool:
    """True when MLflow's filter syntax can hold `value` as a literal: its literals have no
    escapes, so a value with both ' and " cannot be written."""
    return "'" not in value or '"' not in value


def name_filter(name: str) -> str:
    """A filter on model names that matches `name`: exactly when the name can be quoted;
    otherwise a LIKE pattern with _ (any one character) in place of each ' and of each
    backslash (an escape in some databases' LIKE), which may match other names too, so
    callers compare the names of what it finds."""
    if quotable(name):
        return f"name = {quoted(name)}"
    return "name LIKE '{}'".format(name.replace("'", "_").replace("\\", "_"))


def is_reserved_alias(alias: str) -> bool:
    """True for the names MLflow reserves for versions: 'latest' and 'v<number>', any case."""
    return alias.lower() == "latest" or bool(_VERSION_ALIAS_RE.match(alias))


def reserved_alias_error(field: str, alias: str) -> InvalidArgumentError:
    """The refusal of a reserved alias name in `field`."""
    return InvalidArgumentError(
        field,
        f"{alias!r} is reserved: 'latest' and 'v<number>' name versions already;"
        " ask for the version by number (or GetLatestModelVersion) instead",
        reason=ErrorReason.RESERVED_ALIAS,
    )


def check_source_alias(source: str) -> None:
    """Refuse a models:/NAME@ALIAS source whose alias is reserved (INVALID_ARGUMENT on
    `source`): such an alias can never be set, so it never names what its caller means."""
    origin = models_source(source)
    if origin is not None and origin.alias and is_reserved_alias(origin.alias):
        raise reserved_alias_error("source", origin.alias)
