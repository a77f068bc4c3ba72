"""`AliasWatchHub`: the sidecar's alias watches, one poller per watched model."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from mlflow_sidecar.core.errors import ErrorReason, UnavailableError
from mlflow_sidecar.server.alias_watch.poller import UNREACHABLE, ModelPoller
from mlflow_sidecar.server.alias_watch.watcher import WATCH_QUEUE_LIMIT, Watcher
from mlflow_sidecar.server.config import WatchConfig
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.observability import SidecarMetrics

# When a client may open its stream again after the sidecar stopped: a restart takes seconds.
SHUTDOWN_RETRY_AFTER_S = 1.0


def shutting_down() -> UnavailableError:
    """The error that ends every stream when the sidecar stops."""
    return UnavailableError(
        "the sidecar is stopping; open the watch again (with last_seen_versions) once it is back",
        reason=ErrorReason.SHUTTING_DOWN,
        retry_after_s=SHUTDOWN_RETRY_AFTER_S,
    )


class AliasWatchHub:
    """Opens watches: the first watcher of a model starts its poller, the last one to leave
    stops it. `end_all` (the sidecar stopping) ends every stream at once and refuses new
    ones, so that no stream holds the server's drain."""

    def __init__(
        self,
        port: MlflowPort,
        config: WatchConfig,
        metrics: SidecarMetrics | None = None,
        *,
        queue_limit: int = WATCH_QUEUE_LIMIT,
        uniform: Callable[[], float] | None = None,
    ) -> None:
        self._port = port
        self._config = config
        self._metrics = metrics
        self._queue_limit = queue_limit
        self._uniform = uniform
        self._lock = threading.Lock()
        self._pollers: dict[str, ModelPoller] = {}
        self._watchers = 0
        self._ending = False

    def open(self, name: str, aliases: Sequence[str], last_seen: Mapping[str, int]) -> Watcher:
        """A watcher of `aliases` of model `name` with its first messages queued, or, while
        MLflow is unreachable, the news of that (its first state follows once MLflow
        answers). A model that does not exist is NotFoundError, unless `last_seen` is given
        (a resumed watch: each alias seen set opens as DELETED, and the model is watched
        on); MLflow refusing the read is that error (not an outage); a stopping sidecar is
        UnavailableError (SHUTTING_DOWN)."""
        with self._lock:
            if self._ending:
                raise shutting_down()
            poller = self._pollers.get(name)
            if poller is None:
                poller = self._new_poller(name)
            watcher = poller.add(aliases, last_seen, lambda left: self._leave(poller, left))
            self._watchers += 1
            self._publish()
        try:
            # A poll of its own: the stream starts from what MLflow says now. Other watchers
            # of the model just get this reading early.
            failure = poller.poll()
            if watcher.ended is not None and watcher.pending:
                raise watcher.ended
            if failure is not None and not isinstance(failure, UNREACHABLE):
                raise failure
        except BaseException:
            watcher.close()
            raise
        return watcher

    def end_all(self) -> None:
        """End every stream now (UNAVAILABLE, SHUTTING_DOWN), stop polling and refuse new
        streams."""
        with self._lock:
            self._ending = True
            pollers = list(self._pollers.values())
            self._pollers.clear()
            self._publish()
        for poller in pollers:
            poller.stop()
            poller.end_all(shutting_down())

    def pollers(self) -> tuple[str, ...]:
        """The models polled now."""
        with self._lock:
            return tuple(self._pollers)

    def poller(self, name: str) -> ModelPoller | None:
        """The poller of model `name`, while it is watched."""
        with self._lock:
            return self._pollers.get(name)

    def _new_poller(self, name: str) -> ModelPoller:
        config = self._config
        options = {} if self._uniform is None else {"uniform": self._uniform}
        poller = ModelPoller(
            name,
            self._port,
            interval_s=config.poll_interval_s,
            jitter=config.poll_jitter,
            heartbeat_s=config.heartbeat_s,
            metrics=self._metrics,
            queue_limit=self._queue_limit,
            **options,
        )
        self._pollers[name] = poller
        poller.start()
        return poller

    def _leave(self, poller: ModelPoller, watcher: Watcher) -> None:
        with self._lock:
            self._watchers -= 1
            if poller.remove(watcher) == 0:
                poller.stop()
                if self._pollers.get(poller.name) is poller:
                    del self._pollers[poller.name]
            self._publish()

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.alias_watch_pollers.set(len(self._pollers))
            self._metrics.alias_watch_streams.set(self._watchers)
