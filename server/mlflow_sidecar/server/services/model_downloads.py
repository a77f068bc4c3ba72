"""`ModelDownloads`: the DownloadModel use case, through the model cache.

A download resolves its version (by number or alias) with one registry call, then is
answered from the cache when it holds that version (verified), else fetched from MLflow
into the staging directory, described (every file hashed) and moved into the cache. One
fetch per version runs at a time; downloads of the version meanwhile wait for it (no longer
than their own deadline) and send its result, or, when it ran out of the deadline of the
call that ran it, fetch it again within their own. A client that already has the
version's content (`if_none_match`) gets an `unchanged` answer instead of the files; one
that reads the cache through a shared volume (`accept_cache_entry`) gets the entry's
place, its sizes checked and its sha256s left to that client.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.core.errors import (
    DeadlineExceededError,
    ErrorReason,
    InvalidArgumentError,
    NotFoundError,
)
from mlflow_sidecar.core.model_digest import check_digest
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server.disk_full import disk_full_as_resource_exhausted
from mlflow_sidecar.server.mlflow_gateway import MlflowPort
from mlflow_sidecar.server.model_cache import (
    CacheKey,
    Manifest,
    ModelCache,
    ModelLease,
    scratch_lease,
)
from mlflow_sidecar.server.observability import SidecarMetrics
from mlflow_sidecar.server.services.registry import RegistryService
from mlflow_sidecar.server.single_flight import SingleFlight
from mlflow_sidecar.server.staging import Staging


@dataclass(frozen=True, slots=True)
class ModelDownload:
    """What a DownloadModel call sends: the version and its digest, and the files to
    stream (`lease`, to be released once sent), or None when the client's copy matches.
    `cache_entry`: where the client may read the files itself (see `ModelLease`), when it
    asked to and they are a cache entry."""

    version: ModelVersion
    digest: str
    lease: ModelLease | None
    cache_entry: str | None = None


class ModelDownloads:
    """Opens model downloads; see the module's docstring."""

    def __init__(
        self,
        registry: RegistryService,
        gateway: MlflowPort,
        cache: ModelCache,
        staging: Staging,
        *,
        scope: str = "",
        metrics: SidecarMetrics | None = None,
    ) -> None:
        """`scope` names the registry and the artifact storage policy (see `CacheKey`):
        a cached version is served only under the ones it was checked under."""
        self._scope = scope
        self._metrics = metrics or SidecarMetrics()
        self._registry = registry
        self._gateway = gateway
        self._cache = cache
        self._staging = staging
        self._flights: SingleFlight[CacheKey, ModelLease] = SingleFlight()

    def open(
        self,
        name: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        if_none_match: str = "",
        accept_cache_entry: bool = False,
    ) -> ModelDownload:
        """The download of one version (give `version` or `alias`); `accept_cache_entry`:
        the client reads a cached version's files itself and verifies them."""
        known = check_digest("if_none_match", if_none_match)
        if version is not None and alias is None:
            found = self._registry.get_model_version(name, version)
        elif alias is not None and version is None:
            found = self._registry.get_model_version_by_alias(name, alias)
        else:
            raise InvalidArgumentError("selector", "set version or alias")
        key = CacheKey(found.name, found.version, found.creation_time_ms, self._scope)
        if known and self._cache.digest_of(key) == known:
            self._cache.count_hit()
            return ModelDownload(found, known, None)
        lease = self._cache.acquire(key, hash_files=not accept_cache_entry) or self._flights.run(
            key,
            lambda: self._fetch(found, key),
            ModelLease.share,
            run_again=_not_our_deadline,
            patience_s=call_deadline.remaining,
            gave_up=lambda: _gave_up_waiting(found),
        )
        digest = lease.manifest.digest
        if digest == known:
            lease.release()
            return ModelDownload(found, digest, None)
        if accept_cache_entry and lease.cache_entry is not None:
            self._metrics.model_cache_handoffs.inc()
            return ModelDownload(found, digest, lease, lease.cache_entry)
        return ModelDownload(found, digest, lease)

    def _fetch(self, version: ModelVersion, key: CacheKey) -> ModelLease:
        """The version's files from MLflow, cached when the cache takes them."""
        # The fetch before this one may have just cached the version.
        cached = self._cache.acquire(key, count_miss=False)
        if cached is not None:
            return cached
        scratch = contextlib.ExitStack()
        try:
            directory = scratch.enter_context(self._staging.directory("download-model"))
            target = directory / "model"
            target.mkdir()
            with disk_full_as_resource_exhausted("no room to stage the model download"):
                # Pinned by number: an alias moving meanwhile cannot mix two versions.
                root = self._gateway.download_model_version(version.name, version.version, target)
                manifest = Manifest.describe(key, root, self._staging.chunk_bytes)
            if not manifest.files:
                # MLflow lists a missing location as empty: a version registered from a
                # wrong source would empty the client's copy of the model.
                raise NotFoundError(
                    f"{version.name} version {version.version} has no files: nothing is"
                    f" stored at its source {version.source!r}",
                    reason=ErrorReason.ARTIFACT_NOT_FOUND,
                )
        except BaseException:
            scratch.close()
            raise
        lease = self._cache.put(manifest, root)
        if lease is not None:
            scratch.close()
            return lease
        return scratch_lease(root, manifest, scratch.close)


def _gave_up_waiting(version: ModelVersion) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"deadline exceeded while {version.name} version {version.version} was still being"
        " fetched from MLflow for another download; nothing was sent: download again with a"
        " longer deadline (the fetch it waited for goes on)"
    )


def _not_our_deadline(error: BaseException) -> bool:
    """True when a shared fetch failed on the deadline of the call that ran it (the
    gateway retries MLflow only within that call's deadline) while this call's own
    deadline has time left: this call then fetches the version itself."""
    return isinstance(error, DeadlineExceededError) and not call_deadline.expired()
