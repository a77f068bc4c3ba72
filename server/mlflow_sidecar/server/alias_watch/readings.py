"""What one poll read of a registered model, and how a watched alias changed between two
readings. Pure functions: the poller and every watcher of a model share them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mlflow_sidecar.core.domain import AliasChange, AliasChangeKind, ModelVersion


@dataclass(frozen=True)
class ModelReading:
    """One reading of a model: whether it exists, where its aliases point, and the versions
    the poll looked up (`found` with their details, `missing` deleted)."""

    exists: bool
    aliases: Mapping[str, int] = field(default_factory=dict)
    found: Mapping[int, ModelVersion] = field(default_factory=dict)
    missing: frozenset[int] = frozenset()
    # The model's creation time: a model deleted and made again between two readings
    # has another, and its versions are others, whatever their numbers.
    created_ms: int = 0

    def version_of(self, alias: str) -> int:
        """The version `alias` points at; 0 when it is not set."""
        return self.aliases.get(alias, 0)


def lookups(
    aliases: Sequence[str],
    before: Mapping[str, int],
    aliases_now: Mapping[str, int],
    *,
    exists: bool,
    fresh: bool,
) -> set[int]:
    """The versions a reading must look up to report `aliases` moving on from `before`
    (alias -> version, 0: not set; an alias missing from it is reported as CURRENT): the
    details of each version an alias points at anew (every one, when `fresh`), and whether
    a version an alias left still exists (VERSION_DELETED or DELETED)."""
    wanted: set[int] = set()
    for alias in aliases:
        now = aliases_now.get(alias, 0)
        then = before.get(alias)
        if now and (fresh or now != then):
            wanted.add(now)
        elif not now and then and exists:
            wanted.add(then)
    return wanted


def change_since(alias: str, before: int, reading: ModelReading) -> AliasChange | None:
    """The change of `alias` from version `before` (0: not set) to where `reading` finds it;
    None when it points where it did."""
    now = reading.version_of(alias)
    if now == before:
        return None
    if not now:
        # A deleted version takes its aliases with it; a deleted model takes everything.
        gone = reading.exists and before in reading.missing
        kind = AliasChangeKind.VERSION_DELETED if gone else AliasChangeKind.DELETED
        return AliasChange(alias, kind, None, before)
    kind = AliasChangeKind.SET if not before else AliasChangeKind.MOVED
    return AliasChange(alias, kind, reading.found[now], before)


def opening(
    aliases: Sequence[str], last_seen: Mapping[str, int], reading: ModelReading
) -> list[AliasChange]:
    """The first change of each alias of a new stream, in the order given: the change since
    the version the client saw last, or its state (CURRENT) when it saw none or nothing
    changed since."""
    changes = []
    for alias in aliases:
        change = change_since(alias, last_seen[alias], reading) if alias in last_seen else None
        if change is None:
            now = reading.version_of(alias)
            change = AliasChange(
                alias, AliasChangeKind.CURRENT, reading.found[now] if now else None, 0
            )
        changes.append(change)
    return changes


def covers(reading: ModelReading, wanted: set[int]) -> bool:
    """True when `reading` looked up every version in `wanted` and found every one an alias
    points at: else the model changed while it was read (a watcher added meanwhile, a
    version deleted between the reads), and the next reading will tell."""
    looked_up = reading.found.keys() | reading.missing
    pointed_at = set(reading.aliases.values())
    return wanted <= looked_up and not (wanted & pointed_at & reading.missing)
