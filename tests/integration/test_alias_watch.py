"""WatchModelAlias against a real `mlflow server`: five watchers of one champion see every
move once and in order, through a 10 s MLflow outage, while MLflow gets one poll stream for
the model; the sidecar stopping ends a watch at once; the typed watch rides out restarts
of the sidecar process and misses nothing, a model deleted meanwhile included."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import mlflow
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlflow_sidecar.client import AliasChange, AliasChangeKind, ClientContainer
from mlflow_sidecar.core.errors import ErrorReason, error_from_rpc
from mlflow_sidecar.v1 import registry_pb2 as pb
from mlflow_sidecar.v1 import registry_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningSidecar, sidecar_config
from tests.support.delay_proxy import DelayProxy
from tests.support.sidecar_process import SidecarProcess

POLL_INTERVAL_S = 0.5
WAIT_S = 120.0  # for an event: generous, a shared machine may be slow
WATCHERS = 5
MOVED = pb.ALIAS_CHANGE_KIND_MOVED


def eventually(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}"
        time.sleep(0.05)


def model_with_versions(client: mlflow.MlflowClient, name: str, count: int) -> None:
    client.create_registered_model(name)
    experiment = client.create_experiment(f"exp-{name}")
    run = client.create_run(experiment).info.run_id
    for _ in range(count):
        client.create_model_version(name, f"runs:/{run}/model", run_id=run)


@dataclass
class RawWatcher:
    """One WatchModelAlias stream, read on a thread of its own: every message with the
    moment it arrived."""

    call: Iterator[pb.WatchModelAliasResponse]
    received: list[tuple[float, pb.WatchModelAliasResponse]] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def read(self) -> None:
        try:
            for message in self.call:
                self.received.append((time.monotonic(), message))
        except grpc.RpcError as exc:
            self.error = exc

    def changes(self) -> list[tuple[int, int, int]]:
        """(kind, previous version, version) of every change received."""
        return [
            (m.change.kind, m.change.previous_version, m.change.model_version.version)
            for _, m in self.received
            if m.HasField("change")
        ]

    def reachability(self) -> list[bool]:
        """The reachability the statuses reported, each run of equal ones as one."""
        seen: list[bool] = []
        for _, message in self.received:
            if message.HasField("status") and (
                not seen or seen[-1] != message.status.mlflow_reachable
            ):
                seen.append(message.status.mlflow_reachable)
        return seen

    def arrival_of(self, version: int) -> float | None:
        for at, message in self.received:
            if message.HasField("change") and message.change.model_version.version == version:
                return at
        return None


def test_five_watchers_see_each_move_once_in_order_through_an_outage_with_one_poller(
    own_mlflow, tmp_path, capsys
):
    plain = mlflow.MlflowClient(tracking_uri=own_mlflow.url)
    model_with_versions(plain, "champion-model", 4)
    plain.set_registered_model_alias("champion-model", "champion", "1")
    with DelayProxy(own_mlflow.url, delay_s=0, delayed=lambda method, path: False) as proxy:
        sidecar = RunningSidecar(
            sidecar_config(
                tmp_path / "sidecar",
                proxy.url,
                watch={"poll_interval_s": POLL_INTERVAL_S, "heartbeat_s": 60.0},
            )
        )
        channel = grpc.insecure_channel(sidecar.target)
        stub = pb_grpc.ModelRegistryServiceStub(channel)
        request = pb.WatchModelAliasRequest(name="champion-model", aliases=["champion"])
        watchers = [RawWatcher(stub.WatchModelAlias(request)) for _ in range(WATCHERS)]
        threads = [threading.Thread(target=w.read, daemon=True) for w in watchers]
        for thread in threads:
            thread.start()
        latencies: dict[int, list[float]] = {}

        def move(version: int) -> None:
            stub.SetModelAlias(
                pb.SetModelAliasRequest(name="champion-model", alias="champion", version=version)
            )
            moved_at = time.monotonic()
            eventually(
                lambda: all(w.arrival_of(version) for w in watchers),
                f"every watcher sees {version}",
            )
            latencies[version] = [w.arrival_of(version) - moved_at for w in watchers]  # type: ignore[operator]

        try:
            eventually(lambda: all(w.changes() for w in watchers), "every watcher opened")

            # MLflow's load: one poll stream for the model, whatever the number of watchers.
            polls = lambda: proxy.count("GET", "/registered-models/get")  # noqa: E731
            first, started = polls(), time.monotonic()
            time.sleep(5.0)  # the window counted
            counted, window_s = polls() - first, time.monotonic() - started
            one_poller = window_s / POLL_INTERVAL_S
            print(
                f"registered-model reads in {window_s:.1f}s: {counted} (one poller:"
                f" {one_poller:.0f}, {WATCHERS} pollers: {WATCHERS * one_poller:.0f})"
            )
            assert 1 <= counted <= 2 * one_poller < WATCHERS * one_poller

            move(2)
            own_mlflow.stop()
            eventually(
                lambda: all(w.reachability()[-1:] == [False] for w in watchers),
                "every watcher told that MLflow is unreachable",
            )
            time.sleep(10.0)  # the outage
            own_mlflow.start()
            move(3)  # right after MLflow is back
            move(4)
        finally:
            for watcher in watchers:
                watcher.call.cancel()  # type: ignore[attr-defined]
            for thread in threads:
                thread.join(WAIT_S)
            channel.close()
            sidecar.stop()

    current = (pb.ALIAS_CHANGE_KIND_CURRENT, 0, 1)
    for watcher in watchers:
        assert watcher.changes() == [current, (MOVED, 1, 2), (MOVED, 2, 3), (MOVED, 3, 4)]
        assert watcher.reachability() == [True, False, True]
        assert watcher.error is not None and watcher.error.code() == grpc.StatusCode.CANCELLED
    with capsys.disabled():
        for version, seconds in sorted(latencies.items()):
            shown = ", ".join(f"{s * 1000:.0f}" for s in sorted(seconds))
            print(
                f"\nSetModelAlias -> watchers, move to v{version}: {shown} ms"
                f" (poll interval {POLL_INTERVAL_S * 1000:.0f} ms)"
            )


def test_stopping_the_sidecar_ends_a_watch_with_shutting_down_at_once(mlflow_server, tmp_path):
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    name = f"stop-{tmp_path.name}"
    model_with_versions(plain, name, 1)
    sidecar = RunningSidecar(sidecar_config(tmp_path / "sidecar", mlflow_server.url))
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.ModelRegistryServiceStub(channel)
        call = stub.WatchModelAlias(pb.WatchModelAliasRequest(name=name, aliases=["champion"]))
        assert next(call).change.kind == pb.ALIAS_CHANGE_KIND_CURRENT
        # A grace period of two minutes: a stop that waited for the watch would take it all.
        stopping = threading.Thread(target=sidecar.server.stop, kwargs={"grace_s": 120.0})
        stopping.start()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        stopping.join(WAIT_S / 2)
        assert not stopping.is_alive(), "the stop waited out its grace period"
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_from_rpc(err.value).reason == ErrorReason.SHUTTING_DOWN
    status = rpc_status.from_call(err.value)
    assert status is not None
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)


def test_the_typed_watch_rides_out_sidecar_restarts_and_misses_nothing(mlflow_server, tmp_path):
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    name = f"restart-{tmp_path.name}"
    model_with_versions(plain, name, 3)
    plain.set_registered_model_alias(name, "champion", "1")
    sidecar = SidecarProcess(
        tmp_path / "sidecar",
        mlflow_server.url,
        MLFLOW_SIDECAR__WATCH__POLL_INTERVAL_S=str(POLL_INTERVAL_S),
    )
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "stream_reconnect_s": WAIT_S})
    seen: list[AliasChange] = []
    failures: list[BaseException] = []
    try:
        watch = container.model_registry().watch(name, ["champion", "canary"])

        def read() -> None:
            try:
                seen.extend(watch)
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        eventually(lambda: len(seen) == 2, "the opening")

        sidecar.stop()  # SIGTERM: the stream ends with SHUTTING_DOWN
        plain.set_registered_model_alias(name, "champion", "2")  # while the sidecar is down
        sidecar.start()
        eventually(lambda: len(seen) == 3, "the move made while the sidecar was down")

        sidecar.kill()  # no goodbye: the stream just breaks
        plain.set_registered_model_alias(name, "canary", "3")
        sidecar.start()
        eventually(lambda: len(seen) == 4, "the alias set while the sidecar was dead")

        plain.set_registered_model_alias(name, "champion", "3")
        eventually(lambda: len(seen) == 5, "a move after the restarts")
        watch.close()
        reader.join(WAIT_S)
    finally:
        container.shutdown_resources()
        sidecar.stop()
    assert not failures, failures
    assert [(c.alias, c.kind, c.previous_version, c.version) for c in seen] == [
        ("champion", AliasChangeKind.CURRENT, 0, 1),
        ("canary", AliasChangeKind.CURRENT, 0, 0),
        ("champion", AliasChangeKind.MOVED, 1, 2),
        ("canary", AliasChangeKind.SET, 0, 3),
        ("champion", AliasChangeKind.MOVED, 2, 3),
    ]
    assert watch.status is not None and watch.status.mlflow_reachable


def test_the_typed_watch_reports_a_model_deleted_while_the_sidecar_was_down(
    mlflow_server, tmp_path
):
    """The watch resumes after the restart with the versions it reported: the model it saw
    is gone, which is a change (DELETED), and the watch goes on to see it made again."""
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    name = f"deleted-{tmp_path.name}"
    model_with_versions(plain, name, 1)
    plain.set_registered_model_alias(name, "champion", "1")
    source = plain.get_model_version(name, "1")
    sidecar = SidecarProcess(
        tmp_path / "sidecar",
        mlflow_server.url,
        MLFLOW_SIDECAR__WATCH__POLL_INTERVAL_S=str(POLL_INTERVAL_S),
    )
    sidecar.start()
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "stream_reconnect_s": WAIT_S})
    seen: list[AliasChange] = []
    failures: list[BaseException] = []
    try:
        watch = container.model_registry().watch(name, ["champion"])

        def read() -> None:
            try:
                seen.extend(watch)
            except BaseException as exc:
                failures.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        eventually(lambda: len(seen) == 1, "the opening")

        sidecar.stop()
        plain.delete_registered_model(name)  # while the sidecar is down
        sidecar.start()
        eventually(lambda: len(seen) == 2 or bool(failures), "the deletion, or a failure")
        assert not failures, failures

        plain.create_registered_model(name)
        plain.create_model_version(name, source.source, run_id=source.run_id)
        plain.set_registered_model_alias(name, "champion", "1")
        eventually(lambda: len(seen) == 3 or bool(failures), "the model made again")
        watch.close()
        reader.join(WAIT_S)
    finally:
        container.shutdown_resources()
        sidecar.stop()
    assert not failures, failures
    assert [(c.kind, c.previous_version, c.version) for c in seen] == [
        (AliasChangeKind.CURRENT, 0, 1),
        (AliasChangeKind.DELETED, 1, 0),
        (AliasChangeKind.SET, 0, 1),
    ]


def test_a_typed_watch_resumed_later_reports_a_model_made_again_on_the_same_version_number(
    mlflow_server, client_container, tmp_path
):
    """What a caller keeps across a restart of its own (the versions and their creation
    times) tells the new model's version 1 from the one it saw."""
    plain = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    name = f"again-{tmp_path.name}"
    model_with_versions(plain, name, 1)
    plain.set_registered_model_alias(name, "champion", "1")
    source = plain.get_model_version(name, "1")
    registry = client_container.model_registry()
    with registry.watch(name, ["champion"]) as watch:
        first = next(watch)
        versions, created = watch.last_seen_versions, watch.last_seen_creation_times_ms
    plain.delete_registered_model(name)
    time.sleep(0.01)  # the new version's creation time differs from the old one's
    plain.create_registered_model(name)
    plain.create_model_version(name, source.source, run_id=source.run_id)
    plain.set_registered_model_alias(name, "champion", "1")
    with registry.watch(
        name, ["champion"], last_seen_versions=versions, last_seen_creation_times_ms=created
    ) as watch:
        # A watch that reports nothing would wait for ever: closing it ends the iteration.
        closer = threading.Timer(WAIT_S, watch.close)
        closer.start()
        got = list(itertools.islice(watch, 2))
        closer.cancel()
    assert len(got) == 2, f"not within {WAIT_S:.0f}s: the model made again ({got})"
    deleted, made = got
    assert first.model_version is not None and made.model_version is not None
    assert (deleted.kind, deleted.previous_version, deleted.version) == (
        AliasChangeKind.DELETED,
        1,
        0,
    )
    assert (made.kind, made.previous_version, made.version) == (AliasChangeKind.SET, 0, 1)
    assert made.model_version.creation_time_ms != first.model_version.creation_time_ms
