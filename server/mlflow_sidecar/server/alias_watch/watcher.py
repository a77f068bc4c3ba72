"""`Watcher`: one WatchModelAlias stream's side of its model's poller: what it has been told,
and a bounded queue of the messages still to send."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence

from mlflow_sidecar.core.domain import AliasChange, WatchStatus
from mlflow_sidecar.core.errors import (
    ErrorReason,
    NotFoundError,
    ResourceExhaustedError,
    SidecarError,
)
from mlflow_sidecar.server.alias_watch.readings import (
    ModelReading,
    change_since,
    covers,
    lookups,
    opening,
)

WATCH_QUEUE_LIMIT = 1024
"""Messages that may wait for one stream; a client that reads slower than that falls behind
and its stream ends (RESOURCE_EXHAUSTED), to be opened again with last_seen_versions."""

Message = AliasChange | WatchStatus


class Watcher:
    """One stream's view of a model. The poller feeds it (`take`, `tell`, `end`) holding the
    lock it was made with; the stream reads it (`events`) and closes it (`close`, from any
    thread). Until its first reading it is pending: it knows only what the client saw last."""

    def __init__(
        self,
        name: str,
        aliases: Sequence[str],
        last_seen: Mapping[str, int],
        *,
        lock: threading.Lock,
        status: Callable[[], WatchStatus],
        heartbeat_s: float,
        on_close: Callable[[Watcher], None],
        queue_limit: int = WATCH_QUEUE_LIMIT,
    ) -> None:
        self.name = name
        self.aliases = tuple(aliases)
        self._last_seen = dict(last_seen)
        # alias -> the version the stream has been told of; None while pending.
        self._known: dict[str, int] | None = None
        # The reachability the stream was last told of; None: none yet.
        self._told: bool | None = None
        self._queue: deque[Message] = deque()
        self._queue_limit = queue_limit
        self._changed = threading.Condition(lock)
        self._status = status  # called with the lock held
        self._heartbeat_s = heartbeat_s
        self._on_close = on_close
        self._ended: SidecarError | None = None
        self._closed = False

    # -- the poller's side (the lock held) ------------------------------------------------

    @property
    def pending(self) -> bool:
        """True until a reading gave the stream its first state."""
        return self._known is None

    @property
    def queued(self) -> int:
        """Messages waiting for the stream."""
        with self._changed:
            return len(self._queue)

    @property
    def ended(self) -> SidecarError | None:
        """What ended the stream, once something did."""
        return self._ended

    def lookups(self, aliases_now: Mapping[str, int], *, exists: bool) -> set[int]:
        """The versions a reading must look up for this stream's next messages."""
        if self._known is None:
            return lookups(self.aliases, self._last_seen, aliases_now, exists=exists, fresh=True)
        return lookups(self.aliases, self._known, aliases_now, exists=exists, fresh=False)

    def take_recreated(self, status: WatchStatus) -> None:
        """The model was deleted and made again since the last reading: each alias this
        stream knows set is DELETED, as a reading of the missing model would say, so that
        the new model's aliases come as SET even on the same version numbers."""
        if self._known is not None:
            self.take(ModelReading(exists=False), status)

    def take(self, reading: ModelReading, status: WatchStatus) -> None:
        """Queue what `reading` means for this stream: its first state, or its changes."""
        if self._ended is not None or self._closed:
            return
        if self._known is None and not reading.exists and not self._last_seen:
            # Only a fresh watch: a resumed one saw the model, which may have been deleted
            # while no stream was open, and opens as a live stream reads that (DELETED).
            self.end(
                NotFoundError(
                    f"registered model {self.name!r} does not exist",
                    reason=ErrorReason.MODEL_NOT_FOUND,
                )
            )
            return
        if not covers(reading, self.lookups(reading.aliases, exists=reading.exists)):
            return  # it changed while it was read; the next reading tells
        messages: list[Message] = []
        if self._told is False:
            messages.append(status)  # back: the news first, then what changed meanwhile
        if self._known is None:
            changes = opening(self.aliases, self._last_seen, reading)
        else:
            known = self._known
            changes = [
                change
                for alias in self.aliases
                if (change := change_since(alias, known[alias], reading)) is not None
            ]
        messages += changes
        if self._told is None:
            messages.append(status)
        self._known = {alias: reading.version_of(alias) for alias in self.aliases}
        self._told = True
        self._push(messages)

    def tell(self, status: WatchStatus) -> None:
        """Queue `status` unless the stream was told of this reachability already."""
        if self._ended is None and not self._closed and self._told is not status.mlflow_reachable:
            self._told = status.mlflow_reachable
            self._push([status])

    def end(self, error: SidecarError, *, at_once: bool = False) -> None:
        """End the stream with `error`, after the messages already queued (`at_once`:
        instead of them)."""
        if self._ended is not None or self._closed:
            return
        if at_once:
            self._queue.clear()
        self._ended = error
        self._changed.notify_all()

    def _push(self, messages: list[Message]) -> None:
        if len(self._queue) + len(messages) > self._queue_limit:
            self.end(
                ResourceExhaustedError(
                    f"the client fell behind: {self._queue_limit} messages of this"
                    " WatchModelAlias stream were waiting for it; open it again with"
                    " last_seen_versions to miss no change",
                    reason=ErrorReason.WATCH_FELL_BEHIND,
                    retry_after_s=0.0,
                ),
                at_once=True,
            )
            return
        self._queue.extend(messages)
        self._changed.notify_all()

    # -- the stream's side ----------------------------------------------------------------

    def events(self) -> Iterator[Message]:
        """The messages to send, with a heartbeat status when none was sent for
        `heartbeat_s`; ends when the watcher is closed, raises what ended it otherwise.
        Leaving it (however) closes the watcher."""
        try:
            next_status = time.monotonic() + self._heartbeat_s
            while True:
                message = self._next(next_status)
                if message is None:
                    return
                if isinstance(message, WatchStatus):
                    next_status = time.monotonic() + self._heartbeat_s
                yield message
        finally:
            self.close()

    def _next(self, heartbeat_at: float) -> Message | None:
        with self._changed:
            while not (self._queue or self._ended or self._closed):
                left = heartbeat_at - time.monotonic()
                if left <= 0:
                    # Decided under the poller's lock: a heartbeat never overtakes news.
                    return self._status()
                self._changed.wait(left)
            if self._closed:
                return None
            if self._queue:
                return self._queue.popleft()
            assert self._ended is not None
            raise self._ended

    def close(self) -> None:
        """End the stream (the client left, or the stream ended): drop what waits for it
        and leave the model's poller. Safe from any thread, more than once."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._changed.notify_all()
        self._on_close(self)
