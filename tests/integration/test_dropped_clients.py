"""Typed-client objects dropped without close() give back what they hold, as a file does:
a metric stream's thread sends its points, as close() would, and ends, and the channel
closes after it; a watch cancels its stream, so the sidecar frees its worker and slot.
Against a real `mlflow server` and sidecar."""

from __future__ import annotations

import gc
import threading
import weakref

from mlflow_sidecar.client import ClientContainer
from mlflow_sidecar.client.channel import SharedChannel
from tests.integration.conftest import RunningSidecar
from tests.support.files import wait_until

STREAMS = 20
WATCHES = 10
WAIT_S = 120.0  # for the background work to end: generous, a shared machine may be slow


def _container(sidecar: RunningSidecar) -> ClientContainer:
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target, "timeout_s": 30.0})
    return container


def _stream_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "metric-stream"}


def _log_and_drop(sidecar: RunningSidecar, run_id: str, step: int) -> weakref.ref[SharedChannel]:
    """Log one point to a stream of a container of its own and drop both, unclosed and
    unflushed; returns a reference to the container's channel."""
    container = _container(sidecar)
    stream = container.metric_stream()
    stream.log(run_id, "loss", float(step), step=step)
    return weakref.ref(container.shared_channel())


def test_dropped_metric_streams_deliver_their_points_and_end_their_threads(
    sidecar: RunningSidecar, client_container: ClientContainer, run_id: str
) -> None:
    before = _stream_threads()
    channels = [_log_and_drop(sidecar, run_id, step) for step in range(STREAMS)]
    gc.collect()

    assert wait_until(lambda: _stream_threads() <= before, WAIT_S), (
        f"{len(_stream_threads() - before)} metric-stream threads outlived their streams"
    )
    gc.collect()
    assert [channel() for channel in channels] == [None] * STREAMS
    tracking = client_container.experiment_tracking()
    assert tracking.flush_metrics(run_id, timeout_s=WAIT_S).complete
    history = tracking.get_metric_history(run_id, "loss")
    assert sorted(point.step for point in history.items) == list(range(STREAMS))


def _open_and_drop_watch(sidecar: RunningSidecar, name: str) -> None:
    watch = _container(sidecar).model_registry().watch(name, ["champion"])
    assert next(watch).version == 1


def test_dropped_watches_end_their_streams_on_the_sidecar(
    sidecar: RunningSidecar, client_container: ClientContainer, run_id: str, unique: str
) -> None:
    registry = client_container.model_registry()
    name = f"dropped-watches-{unique}"
    registry.create_registered_model(name)
    registry.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    registry.set_model_alias(name, "champion", 1)
    metrics = sidecar.server.metrics.registry

    def gauges() -> tuple[float, float]:
        return (
            metrics.get_sample_value("mlflow_sidecar_alias_watch_streams") or 0.0,
            metrics.get_sample_value("mlflow_sidecar_streams_in_progress") or 0.0,
        )

    watches_before, streams_before = gauges()
    kept = _container(sidecar).model_registry().watch(name, ["champion"])
    try:
        next(kept)
        assert gauges() == (watches_before + 1, streams_before + 1)  # the gauges count one
        for _ in range(WATCHES):
            _open_and_drop_watch(sidecar, name)
        gc.collect()

        assert wait_until(lambda: gauges() == (watches_before + 1, streams_before + 1), WAIT_S), (
            f"the sidecar still serves dropped watches: (watches, streams) = {gauges()}"
        )
    finally:
        kept.close()
    assert wait_until(lambda: gauges() == (watches_before, streams_before), WAIT_S)
