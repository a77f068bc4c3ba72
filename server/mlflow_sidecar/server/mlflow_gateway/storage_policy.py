"""Where the sidecar may read and write artifact bytes: its configured artifact stores only.

A client names storage in two places, an experiment's `artifact_location` and a model
version's `source`; MLflow itself names it in every run's `artifact_uri` and every
version's download URI (which may have been registered by anyone, MLflow directly too).
Each is checked here before the sidecar moves a byte:

- local paths (`file:` URIs and plain paths) only under `artifacts.allowed_roots` (the
  embedded store's own artifact root always), after resolving symlinks;
- MLflow's artifact proxy (`mlflow-artifacts:`, or its `http(s)` endpoint) of the
  configured tracking server;
- other stores (`s3://` and the like) only under `artifacts.allowed_uris` or under the
  tracking server's own default artifact root (read from its default experiment).

Errors never echo the URI: it may name a host file.
"""

from __future__ import annotations

import os
import posixpath
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError, PermissionDeniedError
from mlflow_sidecar.server.uri_syntax import uri_syntax_problem

_PROXY_SCHEME = "mlflow-artifacts"
_PROXY_PATH = "/api/2.0/mlflow-artifacts/artifacts"
_REFERENCE_SCHEMES = ("runs", "models")


def check_uri_syntax(field: str, uri: str) -> None:
    """Refuse `..` segments, backslashes, NUL, percent-encoded dots or slashes, a scheme
    not in lower case, a query or fragment (INVALID_ARGUMENT on `field`, reason
    UNSAFE_URI)."""
    problem = uri_syntax_problem(uri)
    if problem:
        raise InvalidArgumentError(field, problem, reason=ErrorReason.UNSAFE_URI)


def is_reference(uri: str) -> bool:
    """True for `runs:/` and `models:/` URIs, which name MLflow entities, not storage."""
    return urllib.parse.urlsplit(uri).scheme.lower() in _REFERENCE_SCHEMES


def _local_path(uri: str) -> str | None:
    """The host path a `file:` URI or plain path names; None for every other URI."""
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if not scheme:
        return uri
    if scheme != "file":
        return None
    if parsed.netloc not in ("", "localhost"):
        return ""  # a file on another host: never ours
    return urllib.request.url2pathname(parsed.path)


def _under(child: str, parent: str) -> bool:
    """True when the URI `child` is `parent` or below it (whole segments only)."""
    parent = parent.rstrip("/")
    return child == parent or child.startswith(parent + "/")


class StoragePolicy:
    """Decides whether a storage URI belongs to the sidecar's configured artifact stores.

    `discover_root` returns the tracking server's default artifact root (or None); it is
    asked once, the first time a remote URI is not covered by `allowed_uris`.
    """

    def __init__(
        self,
        *,
        allowed_roots: Sequence[Path],
        allowed_uris: Sequence[str],
        tracking_uri: str,
        discover_root: Callable[[], str | None] | None = None,
    ) -> None:
        self._roots = tuple(os.path.realpath(root) for root in allowed_roots)
        self._uris = tuple(allowed_uris)
        tracking = urllib.parse.urlsplit(tracking_uri)
        self._server = (
            (tracking.scheme.lower(), tracking.netloc.lower())
            if tracking.scheme.lower() in ("http", "https")
            else None
        )
        self._discover_root = discover_root
        self._discovered: tuple[str, ...] | None = None
        self._lock = threading.Lock()

    def allows(self, uri: str) -> bool:
        """True when the sidecar may read and write at `uri` (a storage URI, not a reference)."""
        try:
            check_uri_syntax("uri", uri)
        except InvalidArgumentError:
            return False  # stored by someone else with a trick in it: not ours either
        local = _local_path(uri)
        if local is not None:
            return self._allows_local(local)
        parsed = urllib.parse.urlsplit(uri)
        scheme = parsed.scheme.lower()
        if scheme == _PROXY_SCHEME:
            # The proxy of the configured server, which confines paths to its own store.
            return self._server is not None and parsed.netloc.lower() in ("", self._server[1])
        if self._server is not None and (scheme, parsed.netloc.lower()) == self._server:
            return _under(posixpath.normpath(parsed.path), _PROXY_PATH)
        if any(_under(uri, prefix) for prefix in self._uris):
            return True
        return any(_under(uri, prefix) for prefix in self._server_roots())

    def check(self, field: str, uri: str) -> None:
        """PERMISSION_DENIED (reason PATH_OUTSIDE_ROOTS) unless `allows(uri)`; the message
        names `field`, never the URI."""
        if not self.allows(uri):
            raise PermissionDeniedError(
                f"{field}: the location is outside the artifact stores this sidecar is"
                " configured with (artifacts.allowed_roots, artifacts.allowed_uris)",
                reason=ErrorReason.PATH_OUTSIDE_ROOTS,
                field=field,
            )

    def _allows_local(self, path: str) -> bool:
        if not path or not os.path.isabs(path):
            return False
        # realpath: a symlink inside a root that points outside it is outside.
        resolved = os.path.realpath(path)
        return any(resolved == root or resolved.startswith(root + os.sep) for root in self._roots)

    def _server_roots(self) -> tuple[str, ...]:
        with self._lock:
            if self._discovered is None:
                found = self._discover_root() if self._discover_root is not None else None
                # A local default root is a path on the server's host, not ours to touch.
                usable = found and _local_path(found) is None and not is_reference(found)
                self._discovered = (found,) if usable and found else ()
            return self._discovered
