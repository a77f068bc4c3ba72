"""The calls in flight while the server stops, and which of them its grace period cut off.

grpc ends every call still running when `server.grace_s` is over with UNAVAILABLE
("Cancelling all calls"), while the handler only sees a cancelled call, as if its client had
left, or a request stream that simply ends. The calls still running are marked just before
grpc is told to cancel them, so the access log can say what their clients saw; and the stop
can wait for their handlers to write that line before the process ends.
"""

from __future__ import annotations

import threading
import time

import grpc


class CallDrain:
    """The calls in flight, and those the shutdown cut off."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_flight: dict[int, grpc.ServicerContext] = {}
        self._cut: set[int] = set()

    def started(self, context: grpc.ServicerContext) -> None:
        """A call began."""
        with self._changed:
            self._in_flight[id(context)] = context

    def finished(self, context: grpc.ServicerContext) -> None:
        """A call ended, its access log line written."""
        with self._changed:
            self._in_flight.pop(id(context), None)
            self._cut.discard(id(context))
            self._changed.notify_all()

    def cut_off_running(self) -> int:
        """Mark every call still running as cut off by the shutdown (call it right before the
        server cancels them); returns how many there are."""
        with self._changed:
            # A call whose client has already gone saw its own outcome, not the cut.
            self._cut = {key for key, call in self._in_flight.items() if call.is_active()}
            return len(self._cut)

    def was_cut(self, context: grpc.ServicerContext) -> bool:
        """True when the shutdown cut this call off: its client saw UNAVAILABLE."""
        with self._changed:
            return id(context) in self._cut

    def wait_finished(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for every call in flight to end; returns how many have not."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return len(self._in_flight)
