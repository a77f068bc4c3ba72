"""`AliasWatchService`: WatchModelAlias, the inference side's stream of where its aliases
("champion", ...) point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.core.limits import MAX_NAME_LENGTH, MAX_WATCH_ALIASES
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.alias_watch import AliasWatchHub, Watcher
from mlflow_sidecar.server.services.registry import check_alias


def check_watch(name: str, aliases: Sequence[str], last_seen_versions: Mapping[str, int]) -> None:
    """Validate a watch request: a model name, 1 to MAX_WATCH_ALIASES distinct aliases as
    every alias RPC takes them, and last seen versions (0 or more) of those aliases only."""
    check.require("name", name, max_length=MAX_NAME_LENGTH)
    if not aliases:
        raise InvalidArgumentError("aliases", f"give 1 to {MAX_WATCH_ALIASES} aliases to watch")
    first: dict[str, int] = {}
    # Each alias checked before the count, so that a list with a repeat says so: the limit
    # counts distinct aliases.
    for index, alias in enumerate(aliases):
        check_alias(alias, f"aliases[{index}]")
        if alias in first:
            raise InvalidArgumentError(
                "aliases", f"{alias!r} is listed twice (aliases[{first[alias]}] and [{index}])"
            )
        first[alias] = index
    if len(aliases) > MAX_WATCH_ALIASES:
        raise InvalidArgumentError(
            "aliases", f"{len(aliases)} aliases; one stream watches at most {MAX_WATCH_ALIASES}"
        )
    for alias, version in last_seen_versions.items():
        if alias not in first:
            raise InvalidArgumentError(
                "last_seen_versions", f"{alias!r} is not one of the aliases watched"
            )
        if version < 0:
            raise InvalidArgumentError(
                f"last_seen_versions[{alias}]", f"must be 0 (not set) or more, got {version}"
            )


class AliasWatchService:
    """Opens alias watches on the sidecar's hub, after checking the request."""

    def __init__(self, hub: AliasWatchHub) -> None:
        self._hub = hub

    def watch(
        self, name: str, aliases: Sequence[str], last_seen_versions: Mapping[str, int]
    ) -> Watcher:
        """An open watch of `aliases` of model `name`: iterate `events()` for its messages,
        `close()` it from any thread to end it. NotFoundError for a model that does not
        exist (once MLflow answers), unless `last_seen_versions` resumes a watch of it."""
        check_watch(name, aliases, last_seen_versions)
        return self._hub.open(name, aliases, last_seen_versions)
