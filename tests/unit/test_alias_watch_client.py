"""The typed client's alias watch against a scripted sidecar: it reconnects through the
failures a new stream gets past, resumes from what it reported, drops the replays of it,
and raises what no new stream would fix. Client dependencies only (the compatibility runs
take it): the script reports errors as the sidecar does, with `google.rpc.Status` details."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_status import rpc_status

from mlflow_sidecar.client.alias_watch import reconnect_delays
from mlflow_sidecar.client.grpc_registry import GrpcModelRegistry
from mlflow_sidecar.core import conversions as conv
from mlflow_sidecar.core.domain import AliasChange, AliasChangeKind, ModelVersion, WatchStatus
from mlflow_sidecar.core.errors import (
    ClientErrorReason,
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SidecarError,
    UnavailableError,
    to_rpc_status,
)
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc

Item = pb.WatchModelAliasResponse | SidecarError


def change(kind: AliasChangeKind, version: int, previous: int = 0) -> pb.WatchModelAliasResponse:
    found = ModelVersion("m", version) if version else None
    return pb.WatchModelAliasResponse(
        change=conv.alias_change_to_pb(AliasChange("champion", kind, found, previous))
    )


def current(created_ms: int) -> pb.WatchModelAliasResponse:
    """The champion on version 1, made at `created_ms`, as a stream opens with it."""
    found = ModelVersion("m", 1, creation_time_ms=created_ms)
    return pb.WatchModelAliasResponse(
        change=conv.alias_change_to_pb(AliasChange("champion", AliasChangeKind.CURRENT, found, 0))
    )


def status(reachable: bool = True) -> pb.WatchModelAliasResponse:
    return pb.WatchModelAliasResponse(
        status=conv.watch_status_to_pb(WatchStatus(reachable, 1234, "" if reachable else "down"))
    )


def shutting_down() -> UnavailableError:
    return UnavailableError("stopping", reason=ErrorReason.SHUTTING_DOWN, retry_after_s=0.0)


class ScriptedSidecar(pb_grpc.ModelRegistryServiceServicer):
    """Each WatchModelAlias call plays the next session of the script: its messages, then
    the error it ends with, or (no error) it stays open until the client leaves. Past the
    script, every call plays `rest`. `ended[i]` is set once call i is over."""

    def __init__(self, sessions: list[list[Item]], rest: list[Item] | None = None) -> None:
        self.sessions = sessions
        self.rest = rest
        self.requests: list[pb.WatchModelAliasRequest] = []
        self.ended: list[threading.Event] = []

    def WatchModelAlias(self, request, context) -> Iterator[pb.WatchModelAliasResponse]:
        self.requests.append(request)
        ended = threading.Event()
        self.ended.append(ended)
        # Before the first message: a client may leave as soon as it has read them.
        if not context.add_callback(ended.set):
            ended.set()
        if self.sessions:
            session = self.sessions.pop(0)
        else:
            assert self.rest is not None, "one call more than the script has"
            session = self.rest
        for item in session:
            if isinstance(item, SidecarError):
                context.abort_with_status(rpc_status.to_status(to_rpc_status(item)))
            yield item
        ended.wait()


@pytest.fixture()
def serve() -> Iterator:
    servers = []

    def start(sidecar: ScriptedSidecar, reconnect_s: float = 60.0) -> GrpcModelRegistry:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ModelRegistryServiceServicer_to_server(sidecar, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, channel))
        stub = pb_grpc.ModelRegistryServiceStub(channel)
        return GrpcModelRegistry(stub, watch_reconnect_s=reconnect_s)

    yield start
    for server, channel in servers:
        channel.close()
        server.stop(0)


def seen(changes: list[AliasChange]) -> list[tuple[AliasChangeKind, int, int]]:
    return [(c.kind, c.previous_version, c.version) for c in changes]


def test_the_watch_resumes_after_a_stop_and_drops_the_replay(serve):
    sidecar = ScriptedSidecar(
        [
            [change(AliasChangeKind.CURRENT, 1), status(), shutting_down()],
            [change(AliasChangeKind.CURRENT, 1), change(AliasChangeKind.MOVED, 2, 1)],
        ]
    )
    with serve(sidecar).watch("m", ["champion"]) as watch:
        got = [next(watch), next(watch)]
        assert watch.status == WatchStatus(True, 1234, "")
        assert watch.last_seen_versions == {"champion": 2}
    assert seen(got) == [(AliasChangeKind.CURRENT, 0, 1), (AliasChangeKind.MOVED, 1, 2)]
    first, second = sidecar.requests
    assert (first.name, list(first.aliases), dict(first.last_seen_versions)) == (
        "m",
        ["champion"],
        {},
    )
    assert dict(second.last_seen_versions) == {"champion": 1}
    assert sidecar.ended[1].wait(60)  # leaving the block ended the stream


def test_a_model_made_again_while_no_stream_was_open_is_reported(serve):
    """After a restart the alias points at version 1 again, but at another version 1 (the
    model was deleted and made again meanwhile): not a replay."""

    sidecar = ScriptedSidecar(
        [
            [current(1000), status(), shutting_down()],
            [current(1000), status(), shutting_down()],  # a replay: nothing to report
            [current(2000), change(AliasChangeKind.MOVED, 2, 1), shutting_down()],
        ],
        # Ends the watch for good once the script is played, rather than leave it waiting.
        rest=[NotFoundError("gone", reason=ErrorReason.MODEL_NOT_FOUND)],
    )
    with serve(sidecar).watch("m", ["champion"]) as watch:
        got = [next(watch) for _ in range(4)]
    assert seen(got) == [
        (AliasChangeKind.CURRENT, 0, 1),
        (AliasChangeKind.DELETED, 1, 0),
        (AliasChangeKind.SET, 0, 1),
        (AliasChangeKind.MOVED, 1, 2),
    ]
    assert got[2].model_version is not None and got[2].model_version.creation_time_ms == 2000


def test_a_watch_resumed_in_another_process_reports_a_model_made_again_meanwhile(serve):
    """The caller kept both what it saw and when that version was made: the sidecar's
    CURRENT on another version 1 is the model made again, not the one the caller saw."""
    first = ScriptedSidecar([[current(1000), status()]])
    with serve(first).watch("m", ["champion"]) as watch:
        next(watch)
        versions = watch.last_seen_versions
        created = watch.last_seen_creation_times_ms
    assert (versions, created) == ({"champion": 1}, {"champion": 1000})
    again = ScriptedSidecar([[current(2000), status()]])
    with serve(again).watch(
        "m", ["champion"], last_seen_versions=versions, last_seen_creation_times_ms=created
    ) as watch:
        got = [next(watch), next(watch)]
        assert watch.last_seen_creation_times_ms == {"champion": 2000}
    assert seen(got) == [(AliasChangeKind.DELETED, 1, 0), (AliasChangeKind.SET, 0, 1)]
    assert dict(again.requests[0].last_seen_versions) == {"champion": 1}


def test_a_watch_resumed_with_the_version_it_saw_reports_no_replay(serve):
    sidecar = ScriptedSidecar([[current(1000), status(), change(AliasChangeKind.MOVED, 2, 1)]])
    with serve(sidecar).watch(
        "m",
        ["champion"],
        last_seen_versions={"champion": 1},
        last_seen_creation_times_ms={"champion": 1000},
    ) as watch:
        assert seen([next(watch)]) == [(AliasChangeKind.MOVED, 1, 2)]


@pytest.mark.parametrize(
    "failure",
    [
        UnavailableError("MLflow or the sidecar, unreachable"),
        ResourceExhaustedError("fell behind", retry_after_s=0.0),
        ResourceExhaustedError("too many calls"),
    ],
)
def test_the_watch_reconnects_through_what_a_new_stream_gets_past(serve, failure):
    sidecar = ScriptedSidecar(
        [
            [change(AliasChangeKind.CURRENT, 0), failure],
            [failure],
            [change(AliasChangeKind.SET, 3)],
        ]
    )
    with serve(sidecar).watch("m", ["champion"]) as watch:
        assert seen([next(watch), next(watch)]) == [
            (AliasChangeKind.CURRENT, 0, 0),
            (AliasChangeKind.SET, 0, 3),
        ]
    assert [dict(r.last_seen_versions) for r in sidecar.requests] == [
        {},
        {"champion": 0},
        {"champion": 0},
    ]


def test_versions_the_caller_saw_are_reported_only_once_they_change(serve):
    sidecar = ScriptedSidecar(
        [[change(AliasChangeKind.CURRENT, 4), change(AliasChangeKind.MOVED, 5, 4)]]
    )
    with serve(sidecar).watch("m", ["champion"], last_seen_versions={"champion": 4}) as watch:
        assert seen([next(watch)]) == [(AliasChangeKind.MOVED, 4, 5)]
    assert dict(sidecar.requests[0].last_seen_versions) == {"champion": 4}


def test_a_missing_model_raises_when_the_watch_opens(serve):
    sidecar = ScriptedSidecar(
        [[NotFoundError("no such model", reason=ErrorReason.MODEL_NOT_FOUND)]]
    )
    with pytest.raises(NotFoundError) as err:
        serve(sidecar).watch("ghost", ["champion"])
    assert err.value.reason == ErrorReason.MODEL_NOT_FOUND
    assert len(sidecar.requests) == 1


def test_a_bad_alias_raises_with_its_field(serve):
    refusal = InvalidArgumentError("aliases[0]", "reserved", reason=ErrorReason.RESERVED_ALIAS)
    with pytest.raises(InvalidArgumentError) as err:
        serve(ScriptedSidecar([[refusal]])).watch("m", ["latest"])
    assert (err.value.field, err.value.reason) == ("aliases[0]", ErrorReason.RESERVED_ALIAS)


def test_a_model_found_missing_after_an_outage_raises_from_the_iteration(serve):
    missing = NotFoundError("no such model", reason=ErrorReason.MODEL_NOT_FOUND)
    sidecar = ScriptedSidecar([[status(False), missing]])
    watch = serve(sidecar).watch("m", ["champion"])
    assert watch.status is not None and watch.status.mlflow_reachable is False
    with pytest.raises(NotFoundError):
        next(watch)
    watch.close()


def test_a_sidecar_unreachable_past_the_budget_raises_sidecar_unreachable(serve):
    sidecar = ScriptedSidecar([], rest=[UnavailableError("gone")])
    with pytest.raises(UnavailableError) as err:
        serve(sidecar, reconnect_s=0.3).watch("m", ["champion"])
    assert err.value.reason == ClientErrorReason.SIDECAR_UNREACHABLE
    assert len(sidecar.requests) > 1


def test_close_from_another_thread_ends_a_waiting_iteration(serve):
    sidecar = ScriptedSidecar([[change(AliasChangeKind.CURRENT, 1)]])
    watch = serve(sidecar).watch("m", ["champion"])
    next(watch)
    ended = threading.Event()

    def iterate() -> None:
        for _ in watch:
            pass
        ended.set()

    reader = threading.Thread(target=iterate)
    reader.start()
    watch.close()
    reader.join(60)
    assert ended.is_set()
    assert sidecar.ended[0].wait(60)


def test_a_change_of_a_kind_this_client_does_not_know_is_skipped(serve):
    unknown = pb.WatchModelAliasResponse(change=pb.AliasChange(alias="champion", kind=99))  # type: ignore[arg-type]
    sidecar = ScriptedSidecar([[unknown, change(AliasChangeKind.CURRENT, 2)]])
    with serve(sidecar).watch("m", ["champion"]) as watch:
        assert seen([next(watch)]) == [(AliasChangeKind.CURRENT, 0, 2)]


def test_reconnects_back_off_from_a_tenth_of_a_second_to_five_seconds():
    delays = reconnect_delays()
    bounds = [next(delays) for _ in range(8)]
    assert bounds == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
