"""An HTTP proxy in front of a real `mlflow server` that answers some requests late.

It forwards every request, lets MLflow do the work, and holds back the answers of the
requests `delayed` picks: what a slow network or an overloaded server looks like to a
client whose request timeout is shorter. The requests `held` picks reach MLflow only
`hold_s` after they arrived, once their client has given up on them: a busy proxy or
MLflow that takes a write late. The requests `refused` picks are answered 503
without reaching MLflow, as an unavailable MLflow answers them. It counts every request
by method and path, and keeps the W3C `traceparent` header of those that carry one.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# Hop-by-hop headers are the proxy's own business, not to be passed on.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def mlflow_writes(method: str, path: str) -> bool:
    """MLflow's REST creates and renames: the writes that are not safe to repeat."""
    return method == "POST" and path.split("?", maxsplit=1)[0].endswith(("/create", "/rename"))


class DelayProxy:
    """`with DelayProxy(upstream_url, delay_s=3) as proxy:` then point a client at
    `proxy.url`; `held(method, path)` picks requests passed on to MLflow only after
    `hold_s`, `refused(method, path)` picks requests to answer 503 (asked per request,
    so an outage can start and end while the proxy runs), and `page(method, path)` those
    answered, without reaching MLflow, with a proxy's own (status, HTML page).
    `proxy.count(method, suffix)` counts requests whose path ends so; `answered` is set
    each time a delayed request has been done by MLflow (its answer is then held back)."""

    def __init__(
        self,
        upstream_url: str,
        *,
        delay_s: float,
        delayed: Callable[[str, str], bool] = mlflow_writes,
        refused: Callable[[str, str], bool] = lambda _method, _path: False,
        page: Callable[[str, str], tuple[int, str] | None] = lambda _method, _path: None,
        held: Callable[[str, str], bool] = lambda _method, _path: False,
        hold_s: float = 0.0,
    ) -> None:
        upstream = urlsplit(upstream_url)
        self._upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self.delay_s = delay_s
        self._delayed = delayed
        self._refused = refused
        self._page = page
        self._held = held
        self.hold_s = hold_s
        self._counts: Counter[tuple[str, str]] = Counter()
        # (method, path, W3C traceparent) of every request that carried one.
        self.traceparents: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self.answered = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, path_suffix: str) -> int:
        """Requests so far whose method matches and whose path ends with `path_suffix`."""
        with self._lock:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if m == method and p.split("?")[0].endswith(path_suffix)
            )

    def count_under(self, path_prefix: str) -> int:
        """Requests so far, of any method, whose path starts with `path_prefix`."""
        with self._lock:
            return sum(n for (_, p), n in self._counts.items() if p.startswith(path_prefix))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy._counts[(self.command, self.path)] += 1
                    traceparent = self.headers.get("traceparent")
                    if traceparent:
                        proxy.traceparents.append((self.command, self.path, traceparent))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._refused(self.command, self.path):
                    self._unavailable()
                    return
                own = proxy._page(self.command, self.path)
                if own is not None:
                    self._answer(*own)
                    return
                if proxy._held(self.command, self.path):
                    time.sleep(proxy.hold_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                finally:
                    upstream.close()
                if proxy._delayed(self.command, self.path):
                    proxy.answered.set()
                    time.sleep(proxy.delay_s)
                try:
                    self.send_response(reply.status)
                    for key, value in reply.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting: exactly the case under test

            def _answer(self, status: int, html: str) -> None:
                data = html.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                # A streamed (chunked) body is left unread: the connection goes with it.
                self.send_header("Connection", "close")
                self.close_connection = True
                self.end_headers()
                self.wfile.write(data)

            def _unavailable(self) -> None:
                data = b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815

        return Handler
