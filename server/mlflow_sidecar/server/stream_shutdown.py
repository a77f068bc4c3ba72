"""The end of client streams when the sidecar stops.

A StreamMetrics call lasts as long as its client sends. Cut by grpc at the end of the
grace period, it would end without its `accepted-points` trailer, and a client that
resends what it cannot count as accepted would send accepted points twice. Once the
sidecar stops, each stream ends instead at its next message, refusing that message
with UNAVAILABLE (SHUTTING_DOWN) and a trailer that counts what the spool holds."""

from __future__ import annotations

import threading

from mlflow_sidecar.core.errors import ErrorReason, UnavailableError

# When a client may send again: a restart takes seconds.
RETRY_AFTER_SHUTDOWN_S = 1.0


class StreamShutdown:
    """Set once the sidecar stops (`end_all`); StreamMetrics asks it at each message."""

    def __init__(self) -> None:
        self._ending = threading.Event()

    def end_all(self) -> None:
        """The sidecar stops: streams end at their next message."""
        self._ending.set()

    @property
    def ending(self) -> bool:
        """Whether the sidecar is stopping."""
        return self._ending.is_set()


def stream_shut_down(accepted: int) -> UnavailableError:
    """The refusal of a stream's message once the sidecar stops."""
    return UnavailableError(
        f"the sidecar is stopping: {accepted} points of this stream are in its spool (the"
        " accepted-points trailer); send the rest again once it is back",
        reason=ErrorReason.SHUTTING_DOWN,
        retry_after_s=RETRY_AFTER_SHUTDOWN_S,
    )
