"""`ModelPoller`: reads one registered model's aliases from MLflow every interval (with
jitter) on a thread of its own, and hands each reading to every watcher of the model."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence

from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.domain import ModelVersion, WatchStatus
from mlflow_sidecar.core.errors import (
    DeadlineExceededError,
    InternalError,
    NotFoundError,
    SidecarError,
    UnavailableError,
)
from mlflow_sidecar.server.alias_watch.readings import ModelReading
from mlflow_sidecar.server.alias_watch.watcher import WATCH_QUEUE_LIMIT, Watcher
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.observability import SidecarMetrics

log = logging.getLogger(__name__)

# Failures that say MLflow could not be asked, as opposed to MLflow refusing the question.
UNREACHABLE = (UnavailableError, DeadlineExceededError)


class ModelPoller:
    """The one poller of a model, whatever the number of its watchers.

    Each poll is one try of each MLflow call (the next poll is the retry). A failed poll
    tells every watcher once that MLflow is unreachable; the next good one tells them it is
    back, then what changed meanwhile. The watchers share this poller's lock, so that a
    reading reaches all of them at once and a heartbeat never overtakes a reading."""

    def __init__(
        self,
        name: str,
        port: MlflowPort,
        *,
        interval_s: float,
        jitter: float,
        heartbeat_s: float,
        metrics: SidecarMetrics | None = None,
        queue_limit: int = WATCH_QUEUE_LIMIT,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self._port = port
        self._interval_s = interval_s
        self._jitter = jitter
        self._heartbeat_s = heartbeat_s
        self._metrics = metrics
        self._queue_limit = queue_limit
        self._uniform = uniform
        self._lock = threading.Lock()  # the state below, and every watcher's queue
        self._polling = threading.Lock()  # one poll at a time
        self._watchers: list[Watcher] = []
        self._reachable: bool | None = None
        self._message = ""
        self._last_poll_ms = 0
        # The creation time of the model the last reading found (0: none found yet).
        self._created_ms = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"alias-watch:{name}", daemon=True)

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> None:
        """Poll every interval from now on; the first poll comes one interval later."""
        self._thread.start()

    def stop(self) -> None:
        """Poll no more; a poll in progress finishes without waiting for it here."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        """True once `stop` was called."""
        return self._stopped.is_set()

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval, give or take `jitter` of it."""
        return self._interval_s * (1.0 + self._jitter * (2.0 * self._uniform() - 1.0))

    def _run(self) -> None:
        while not self._stopped.wait(self.next_delay()):
            self.poll()

    # -- watchers ---------------------------------------------------------------------------

    def add(
        self,
        aliases: Sequence[str],
        last_seen: Mapping[str, int],
        on_close: Callable[[Watcher], None],
    ) -> Watcher:
        """A new, pending watcher of `aliases`; its first state comes with the next poll."""
        watcher = Watcher(
            self.name,
            aliases,
            last_seen,
            lock=self._lock,
            status=self._status,
            heartbeat_s=self._heartbeat_s,
            on_close=on_close,
            queue_limit=self._queue_limit,
        )
        with self._lock:
            self._watchers.append(watcher)
        return watcher

    def remove(self, watcher: Watcher) -> int:
        """Forget a watcher; returns how many are left."""
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)
            return len(self._watchers)

    def end_all(self, error: SidecarError) -> None:
        """End every watcher's stream with `error`, dropping what waits for them."""
        with self._lock:
            for watcher in self._watchers:
                watcher.end(error, at_once=True)

    def status(self) -> WatchStatus:
        """How this poller sees MLflow now."""
        with self._lock:
            return self._status()

    def _status(self) -> WatchStatus:
        return WatchStatus(
            mlflow_reachable=self._reachable is not False,
            last_poll_time_ms=self._last_poll_ms,
            message=self._message,
        )

    # -- polling ----------------------------------------------------------------------------

    def poll(self) -> SidecarError | None:
        """Read the model once and hand the reading to every watcher; returns what made the
        poll fail (the watchers are told), or None."""
        with self._polling:
            started_ms = now_ms()
            try:
                reading = self._read()
                if self._recreated(reading):
                    # Read again: the new model's aliases point at versions anew.
                    reading = self._read()
            except SidecarError as exc:
                self._failed(exc)
                return exc
            except Exception as exc:  # a poller outlives any one bad answer
                log.exception("reading the aliases of registered model %r failed", self.name)
                error = InternalError(f"reading the model's aliases failed: {exc}")
                self._failed(error)
                return error
            self._count("ok" if reading.exists else "model_missing")
            with self._lock:
                if reading.exists:
                    self._created_ms = reading.created_ms
                if self._reachable is False:
                    log.info("alias watch of %r: MLflow answers again", self.name)
                self._reachable, self._message, self._last_poll_ms = True, "", started_ms
                status = self._status()
                for watcher in self._watchers:
                    watcher.take(reading, status)
            return None

    def _recreated(self, reading: ModelReading) -> bool:
        """True (and every watcher told the old model's aliases are gone) when `reading`
        found another model of the name than the reading before it: deleted and made again
        within one interval, which a missing-model reading never showed."""
        with self._lock:
            known = self._created_ms
            if not (reading.exists and known and reading.created_ms != known):
                return False
            self._created_ms = reading.created_ms
            status = self._status()
            for watcher in self._watchers:
                watcher.take_recreated(status)
        return True

    def _read(self) -> ModelReading:
        try:
            model = self._port.get_registered_model(self.name, retry=False)
        except NotFoundError:
            return ModelReading(exists=False)
        aliases = dict(model.aliases)
        with self._lock:
            wanted = set().union(
                *(w.lookups(aliases, exists=True) for w in self._watchers if w.ended is None)
            )
        found: dict[int, ModelVersion] = {}
        missing: set[int] = set()
        for version in sorted(wanted):
            try:
                found[version] = self._port.get_model_version(self.name, version, retry=False)
            except NotFoundError:
                missing.add(version)
        return ModelReading(True, aliases, found, frozenset(missing), model.creation_time_ms)

    def _failed(self, error: SidecarError) -> None:
        self._count("unreachable" if isinstance(error, UNREACHABLE) else "error")
        with self._lock:
            if self._reachable is not False:
                log.warning(
                    "alias watch of %r: MLflow is unreachable, polling on: %s",
                    self.name,
                    error.message,
                )
            self._reachable, self._message = False, error.message
            status = self._status()
            for watcher in self._watchers:
                watcher.tell(status)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.alias_watch_polls.labels(outcome).inc()
