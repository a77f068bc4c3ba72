"""Alias watches against FakeMlflow: one poller per model whatever the watchers, each change
reported once and in order, outages and deleted models ride through, and every stream ends
when its client leaves or the sidecar stops.

The pollers' own interval is an hour here, so nothing polls but the test (`poll()`): each
test decides exactly which readings the watchers get."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mlflow_sidecar.core.domain import AliasChange, AliasChangeKind, WatchStatus
from mlflow_sidecar.core.errors import (
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from mlflow_sidecar.core.limits import MAX_WATCH_ALIASES
from mlflow_sidecar.server.alias_watch import (
    WATCH_QUEUE_LIMIT,
    AliasWatchHub,
    ModelPoller,
    Watcher,
)
from mlflow_sidecar.server.config import WatchConfig
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.services.alias_watch import AliasWatchService
from tests.fakes.mlflow_port import FakeMlflow

HOUR = 3600.0
CURRENT, SET, MOVED = AliasChangeKind.CURRENT, AliasChangeKind.SET, AliasChangeKind.MOVED
DELETED, VERSION_DELETED = AliasChangeKind.DELETED, AliasChangeKind.VERSION_DELETED


def model(fake: FakeMlflow, name: str = "m", versions: int = 4) -> None:
    fake.create_registered_model(name, description="", tags={}, request_id=f"create-{name}")
    for number in range(versions):
        fake.create_model_version(
            name,
            source=f"s{number}",
            run_id="",
            description="",
            tags={},
            request_id=f"{name}-v{number}",
        )


@pytest.fixture()
def fake() -> FakeMlflow:
    fake = FakeMlflow()
    model(fake)
    return fake


@pytest.fixture()
def metrics() -> SidecarMetrics:
    return SidecarMetrics()


@pytest.fixture()
def hub(fake: FakeMlflow, metrics: SidecarMetrics) -> Iterator[AliasWatchHub]:
    hub = AliasWatchHub(fake, WatchConfig(poll_interval_s=HOUR, heartbeat_s=HOUR), metrics)
    yield hub
    hub.end_all()


class Stream:
    """A watcher read the way the servicer reads it, one message at a time."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self._events = watcher.events()

    def take(self, count: int) -> list[AliasChange | WatchStatus]:
        """The next `count` messages, which must be queued already."""
        assert self.watcher.queued >= count, self.watcher.queued
        return [next(self._events) for _ in range(count)]

    def changes(self, count: int) -> list[tuple[str, AliasChangeKind, int, int]]:
        """The next `count` messages, each a change: (alias, kind, previous, version)."""
        taken = self.take(count)
        assert all(isinstance(m, AliasChange) for m in taken), taken
        return [(c.alias, c.kind, c.previous_version, c.version) for c in taken]  # type: ignore[union-attr]

    def end(self) -> BaseException | None:
        """What the stream ends with, once nothing is queued any more."""
        try:
            message = next(self._events)
        except StopIteration:
            return None
        except Exception as exc:
            return exc
        raise AssertionError(f"one more message: {message}")


def opened(hub: AliasWatchHub, aliases: list[str], **last_seen: int) -> Stream:
    stream = Stream(hub.open("m", aliases, last_seen))
    return stream


def poll(hub: AliasWatchHub, name: str = "m") -> None:
    poller = hub.poller(name)
    assert poller is not None
    poller.poll()


def reachable(message: AliasChange | WatchStatus) -> bool:
    assert isinstance(message, WatchStatus), message
    return message.mlflow_reachable


# -- what a stream reports ---------------------------------------------------------------


def test_a_stream_opens_with_each_alias_in_the_order_asked_then_a_status(hub, fake):
    fake.set_model_alias("m", "champion", 2)
    stream = opened(hub, ["challenger", "champion"])
    first = stream.take(3)
    assert [(c.alias, c.kind, c.version) for c in first[:2]] == [  # type: ignore[union-attr]
        ("challenger", CURRENT, 0),
        ("champion", CURRENT, 2),
    ]
    assert first[1].model_version.source == "s1"  # type: ignore[union-attr]
    assert reachable(first[2]) is True
    assert first[2].last_poll_time_ms > 0  # type: ignore[union-attr]


def test_every_kind_of_change_is_reported_once_in_the_order_seen(hub, fake):
    stream = opened(hub, ["champion", "canary"])
    stream.take(3)
    fake.set_model_alias("m", "champion", 1)
    poll(hub)
    fake.set_model_alias("m", "champion", 2)
    fake.set_model_alias("m", "canary", 3)
    poll(hub)
    fake.delete_model_alias("m", "canary")
    poll(hub)
    fake.delete_model_version("m", 2)  # takes champion with it
    poll(hub)
    poll(hub)  # nothing new: nothing reported
    assert stream.changes(5) == [
        ("champion", SET, 0, 1),
        ("champion", MOVED, 1, 2),
        ("canary", SET, 0, 3),
        ("canary", DELETED, 3, 0),
        ("champion", VERSION_DELETED, 2, 0),
    ]
    assert stream.watcher.queued == 0


def test_changes_within_one_interval_show_as_one(hub, fake):
    fake.set_model_alias("m", "champion", 1)
    stream = opened(hub, ["champion"])
    stream.take(2)
    fake.set_model_alias("m", "champion", 2)
    fake.set_model_alias("m", "champion", 3)
    poll(hub)
    assert stream.changes(1) == [("champion", MOVED, 1, 3)]


def test_a_resumed_stream_starts_from_the_versions_last_seen(hub, fake):
    fake.set_model_alias("m", "same", 1)
    fake.set_model_alias("m", "moved", 2)
    fake.set_model_alias("m", "set", 3)
    fake.set_model_alias("m", "dropped", 4)
    fake.set_model_alias("m", "fresh", 4)
    fake.delete_model_alias("m", "dropped")
    fake.set_model_alias("m", "left", 3)
    fake.delete_model_version("m", 1)  # "same" and "gone" pointed here: both go
    fake.set_model_alias("m", "same", 2)
    stream = opened(
        hub,
        ["same", "moved", "set", "dropped", "gone", "fresh", "left"],
        same=2,
        moved=1,
        set=0,
        dropped=4,
        gone=1,
    )
    assert stream.changes(7) == [
        ("same", CURRENT, 0, 2),
        ("moved", MOVED, 1, 2),
        ("set", SET, 0, 3),
        ("dropped", DELETED, 4, 0),
        ("gone", VERSION_DELETED, 1, 0),
        ("fresh", CURRENT, 0, 4),
        ("left", CURRENT, 0, 3),
    ]
    assert reachable(stream.take(1)[0]) is True
    assert stream.watcher.queued == 0


# -- MLflow outages and deleted models ---------------------------------------------------


def test_an_outage_is_one_status_then_back_then_the_changes_made_meanwhile(hub, fake, metrics):
    fake.set_model_alias("m", "champion", 1)
    stream = opened(hub, ["champion"])
    stream.take(2)
    fake.fail("get_registered_model", UnavailableError("MLflow is down"), times=None)
    poll(hub)
    poll(hub)  # still down: no second status
    assert stream.watcher.queued == 1
    (down,) = stream.take(1)
    assert down == WatchStatus(False, down.last_poll_time_ms, "MLflow is down")  # type: ignore[union-attr]
    fake.set_model_alias("m", "champion", 2)
    fake.clear_failures()
    poll(hub)
    assert stream.watcher.queued == 2
    back, moved = stream.take(2)
    assert reachable(back) is True
    assert (moved.kind, moved.previous_version, moved.version) == (MOVED, 1, 2)  # type: ignore[union-attr]
    polls = metrics.alias_watch_polls
    assert polls.labels("unreachable")._value.get() == 2
    assert polls.labels("ok")._value.get() == 2  # the opening poll, and the one after


def test_a_failed_version_lookup_is_an_outage_too_and_nothing_is_lost(hub, fake):
    stream = opened(hub, ["champion"])
    stream.take(2)
    fake.set_model_alias("m", "champion", 3)
    fake.fail("get_model_version", UnavailableError("MLflow is down"))
    poll(hub)
    assert reachable(stream.take(1)[0]) is False
    poll(hub)
    back, change = stream.take(2)
    assert reachable(back) is True
    assert (change.kind, change.version) == (SET, 3)  # type: ignore[union-attr]


def test_a_deleted_model_deletes_each_set_alias_and_is_watched_on(hub, fake, metrics):
    fake.set_model_alias("m", "champion", 1)
    fake.set_model_alias("m", "canary", 2)
    stream = opened(hub, ["champion", "canary", "unset"])
    stream.take(4)
    fake.delete_registered_model("m")
    poll(hub)
    assert stream.changes(2) == [("champion", DELETED, 1, 0), ("canary", DELETED, 2, 0)]
    poll(hub)
    assert hub.pollers() == ("m",)
    model(fake, versions=1)
    fake.set_model_alias("m", "champion", 1)
    poll(hub)
    assert stream.changes(1) == [("champion", SET, 0, 1)]
    assert metrics.alias_watch_polls.labels("model_missing")._value.get() == 2


def test_a_model_deleted_and_made_again_within_one_interval_is_reported(hub, fake):
    """Its new version 1 is another version than the old one: the alias moved to it."""
    fake.set_model_alias("m", "champion", 1)
    fake.set_model_alias("m", "canary", 2)
    stream = opened(hub, ["champion", "canary"])
    stream.take(3)
    fake.delete_registered_model("m")
    time.sleep(0.01)  # the new model's creation time differs from the old one's
    model(fake, versions=2)
    fake.set_model_alias("m", "champion", 1)
    poll(hub)
    assert stream.changes(3) == [
        ("champion", DELETED, 1, 0),
        ("canary", DELETED, 2, 0),
        ("champion", SET, 0, 1),
    ]
    poll(hub)
    assert stream.watcher.queued == 0  # once


def test_a_model_that_does_not_exist_is_not_found_when_the_stream_opens(hub):
    with pytest.raises(NotFoundError) as err:
        hub.open("ghost", ["champion"], {})
    assert err.value.reason == ErrorReason.MODEL_NOT_FOUND
    assert hub.pollers() == ()


def test_a_resumed_stream_of_a_model_deleted_meanwhile_reports_it_and_is_watched_on(
    hub, fake, metrics
):
    """The client saw the model before (last_seen_versions): its deletion while no stream
    was open is a change like any other, not a model that never was."""
    fake.delete_registered_model("m")
    stream = opened(hub, ["champion", "canary", "unset"], champion=1, canary=2, unset=0)
    assert stream.changes(3) == [
        ("champion", DELETED, 1, 0),
        ("canary", DELETED, 2, 0),
        ("unset", CURRENT, 0, 0),
    ]
    assert reachable(stream.take(1)[0]) is True
    assert hub.pollers() == ("m",)
    model(fake, versions=1)
    fake.set_model_alias("m", "champion", 1)
    poll(hub)
    assert stream.changes(1) == [("champion", SET, 0, 1)]
    assert stream.watcher.queued == 0
    assert metrics.alias_watch_polls.labels("model_missing")._value.get() == 1


def test_a_resumed_stream_opened_during_an_outage_reports_a_deleted_model_once_it_answers(
    hub, fake
):
    fake.delete_registered_model("m")
    fake.fail("get_registered_model", UnavailableError("MLflow is down"), times=None)
    stream = opened(hub, ["champion"], champion=1)
    assert reachable(stream.take(1)[0]) is False
    fake.clear_failures()
    poll(hub)
    back, deleted = stream.take(2)
    assert reachable(back) is True
    assert (deleted.kind, deleted.previous_version, deleted.version) == (DELETED, 1, 0)  # type: ignore[union-attr]


def test_a_stream_opened_during_an_outage_starts_once_mlflow_answers(hub, fake):
    fake.set_model_alias("m", "champion", 1)
    fake.fail("get_registered_model", UnavailableError("MLflow is down"), times=None)
    stream = opened(hub, ["champion"])
    assert reachable(stream.take(1)[0]) is False
    fake.clear_failures()
    poll(hub)
    back, current = stream.take(2)
    assert reachable(back) is True
    assert (current.kind, current.version) == (CURRENT, 1)  # type: ignore[union-attr]


def test_a_missing_model_ends_a_stream_opened_during_an_outage_once_mlflow_answers(hub, fake):
    fake.fail("get_registered_model", UnavailableError("MLflow is down"), times=None)
    stream = Stream(hub.open("ghost", ["champion"], {}))
    stream.take(1)
    fake.clear_failures()
    poll(hub, "ghost")
    error = stream.end()
    assert isinstance(error, NotFoundError)
    assert error.reason == ErrorReason.MODEL_NOT_FOUND
    assert hub.pollers() == ()


def test_mlflow_refusing_the_first_read_fails_the_open(hub, fake):
    fake.fail("get_registered_model", PermissionDeniedError("not yours"))
    with pytest.raises(PermissionDeniedError):
        opened(hub, ["champion"])
    assert hub.pollers() == ()


# -- one poller per model ----------------------------------------------------------------


def test_one_poller_per_model_reads_it_once_per_poll_whatever_the_watchers(hub, fake, metrics):
    model(fake, "n", versions=1)
    streams = [opened(hub, ["champion"]) for _ in range(5)]
    other = Stream(hub.open("n", ["champion"], {}))
    assert sorted(hub.pollers()) == ["m", "n"]
    assert metrics.alias_watch_pollers._value.get() == 2
    assert metrics.alias_watch_streams._value.get() == 6
    reads = fake.calls["get_registered_model"]
    fake.set_model_alias("m", "champion", 4)
    poll(hub)
    assert fake.calls["get_registered_model"] == reads + 1
    assert fake.calls["get_model_version"] > 0
    for stream in streams:
        stream.take(2)  # its opening
        assert stream.changes(1) == [("champion", SET, 0, 4)]
    assert other.watcher.queued == 2


def test_the_poller_stops_after_the_last_watcher_leaves(hub, fake, metrics):
    first, second = opened(hub, ["champion"]), opened(hub, ["champion"])
    poller = hub.poller("m")
    assert poller is not None
    first.watcher.close()
    assert hub.pollers() == ("m",) and not poller.stopped
    second.watcher.close()
    assert hub.pollers() == () and poller.stopped
    assert metrics.alias_watch_pollers._value.get() == 0
    assert metrics.alias_watch_streams._value.get() == 0
    third = opened(hub, ["champion"])
    assert hub.poller("m") is not poller
    third.watcher.close()


def test_closing_from_another_thread_ends_a_waiting_stream_and_frees_its_queue(hub):
    stream = opened(hub, ["champion"])
    stream.take(2)
    done = threading.Event()

    def read() -> None:
        assert stream.end() is None  # waits: nothing is queued, no heartbeat for an hour
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    stream.watcher.close()
    reader.join(60)
    assert done.is_set()
    assert hub.pollers() == ()


def test_an_idle_stream_gets_a_heartbeat(fake):
    hub = AliasWatchHub(fake, WatchConfig(poll_interval_s=HOUR, heartbeat_s=0.1))
    stream = opened(hub, ["champion"])
    events = stream.watcher.events()
    taken = [next(events) for _ in range(3)]  # the opening, then a heartbeat: no poll between
    assert [type(m) for m in taken] == [AliasChange, WatchStatus, WatchStatus]
    assert taken[2] == hub.poller("m").status()  # type: ignore[union-attr]
    stream.watcher.close()


# -- ends ----------------------------------------------------------------------------------


def test_stopping_ends_every_stream_with_shutting_down_and_refuses_new_ones(hub, fake):
    streams = [opened(hub, ["champion"]) for _ in range(3)]
    fake.set_model_alias("m", "champion", 1)
    poll(hub)  # queued, but the stream ends before it
    hub.end_all()
    for stream in streams:
        error = stream.end()
        assert isinstance(error, UnavailableError)
        assert error.reason == ErrorReason.SHUTTING_DOWN
        assert error.retry_after_s is not None and error.retry_after_s > 0
    assert hub.pollers() == ()
    with pytest.raises(UnavailableError) as err:
        opened(hub, ["champion"])
    assert err.value.reason == ErrorReason.SHUTTING_DOWN


def test_a_client_that_falls_behind_the_queue_limit_is_ended_to_resume(fake):
    hub = AliasWatchHub(fake, WatchConfig(poll_interval_s=HOUR, heartbeat_s=HOUR), queue_limit=4)
    stream = opened(hub, ["champion"])  # 2 queued
    for version in (1, 2):
        fake.set_model_alias("m", "champion", version)
        poll(hub)
    assert stream.watcher.queued == 4  # at the limit, not past it
    fake.set_model_alias("m", "champion", 3)
    poll(hub)
    error = stream.end()  # what was queued is dropped: a resumed stream says it again
    assert isinstance(error, ResourceExhaustedError)
    assert error.reason == ErrorReason.WATCH_FELL_BEHIND
    assert error.retry_after_s == 0.0
    assert hub.pollers() == ()
    resumed = opened(hub, ["champion"], champion=0)
    assert resumed.changes(1) == [("champion", SET, 0, 3)]


def test_by_default_a_stream_ends_past_1024_waiting_messages(hub, fake):
    assert WATCH_QUEUE_LIMIT == 1024
    stream = opened(hub, ["champion"])  # 2 queued: the opening and its status
    for poll_number in range(WATCH_QUEUE_LIMIT - 2):
        fake.set_model_alias("m", "champion", 1 + poll_number % 2)
        poll(hub)
    assert stream.watcher.queued == WATCH_QUEUE_LIMIT
    fake.set_model_alias("m", "champion", 3)
    poll(hub)
    assert isinstance(stream.end(), ResourceExhaustedError)


# -- the poller's interval ------------------------------------------------------------------


@pytest.mark.parametrize(("uniform", "factor"), [(0.0, 0.8), (0.5, 1.0), (1.0, 1.2)])
def test_the_interval_is_jittered_within_its_bounds(fake, uniform, factor):
    poller = ModelPoller(
        "m", fake, interval_s=10.0, jitter=0.2, heartbeat_s=HOUR, uniform=lambda: uniform
    )
    assert poller.next_delay() == pytest.approx(10.0 * factor)


def test_jittered_intervals_spread_over_the_whole_range(fake):
    poller = ModelPoller("m", fake, interval_s=10.0, jitter=0.2, heartbeat_s=HOUR)
    delays = [poller.next_delay() for _ in range(2000)]
    assert all(8.0 <= delay <= 12.0 for delay in delays)
    assert min(delays) < 8.5 and max(delays) > 11.5


def test_without_jitter_the_interval_is_exact(fake):
    poller = ModelPoller("m", fake, interval_s=2.5, jitter=0.0, heartbeat_s=HOUR)
    assert {poller.next_delay() for _ in range(100)} == {2.5}


def test_the_poller_polls_on_its_own_every_interval(fake):
    polled = threading.Event()
    hub = AliasWatchHub(fake, WatchConfig(poll_interval_s=0.05, heartbeat_s=HOUR))
    stream = opened(hub, ["champion"])
    fake.on_call("get_registered_model", polled.set)  # after the opening poll
    assert polled.wait(60)
    stream.watcher.close()


# -- the request -------------------------------------------------------------------------


def service(hub: AliasWatchHub) -> AliasWatchService:
    return AliasWatchService(hub)


@pytest.mark.parametrize(
    ("name", "aliases", "last_seen", "field", "reason"),
    [
        ("", ["champion"], {}, "name", ErrorReason.INVALID_ARGUMENT),
        ("m", [], {}, "aliases", ErrorReason.INVALID_ARGUMENT),
        ("m", [f"a{i}" for i in range(17)], {}, "aliases", ErrorReason.INVALID_ARGUMENT),
        ("m", ["champion", "champion"], {}, "aliases", ErrorReason.INVALID_ARGUMENT),
        ("m", ["champion", "latest"], {}, "aliases[1]", ErrorReason.RESERVED_ALIAS),
        ("m", ["V3"], {}, "aliases[0]", ErrorReason.RESERVED_ALIAS),
        ("m", ["no spaces"], {}, "aliases[0]", ErrorReason.INVALID_ARGUMENT),
        ("m", [""], {}, "aliases[0]", ErrorReason.INVALID_ARGUMENT),
        ("m", ["a" * 256], {}, "aliases[0]", ErrorReason.INVALID_ARGUMENT),
        ("m", ["champion"], {"other": 1}, "last_seen_versions", ErrorReason.INVALID_ARGUMENT),
        (
            "m",
            ["champion"],
            {"champion": -1},
            "last_seen_versions[champion]",
            ErrorReason.INVALID_ARGUMENT,
        ),
    ],
)
def test_a_bad_request_names_its_field(hub, name, aliases, last_seen, field, reason):
    with pytest.raises(InvalidArgumentError) as err:
        service(hub).watch(name, aliases, last_seen)
    assert (err.value.field, err.value.reason) == (field, reason)
    assert hub.pollers() == ()


def test_sixteen_distinct_aliases_are_watched(hub):
    aliases = [f"a{i}" for i in range(16)]
    watcher = service(hub).watch("m", aliases, {"a3": 0})
    assert watcher.aliases == tuple(aliases)
    assert watcher.queued == 17
    watcher.close()


def test_a_repeated_alias_is_refused_as_a_repeat_whatever_the_count(hub):
    # The limit counts distinct aliases: 17 copies of one are a repeat, not 17 aliases.
    with pytest.raises(InvalidArgumentError) as err:
        service(hub).watch("m", ["champion"] * (MAX_WATCH_ALIASES + 1), {})
    assert err.value.field == "aliases"
    assert "listed twice" in str(err.value)
