"""Alias watches (WatchModelAlias): one poller per watched model reads its aliases from
MLflow and feeds every watcher of the model through the watcher's own bounded queue."""

from mlflow_sidecar.server.alias_watch.hub import AliasWatchHub, shutting_down
from mlflow_sidecar.server.alias_watch.poller import ModelPoller
from mlflow_sidecar.server.alias_watch.readings import ModelReading
from mlflow_sidecar.server.alias_watch.watcher import WATCH_QUEUE_LIMIT, Watcher

__all__ = [
    "WATCH_QUEUE_LIMIT",
    "AliasWatchHub",
    "ModelPoller",
    "ModelReading",
    "Watcher",
    "shutting_down",
]
