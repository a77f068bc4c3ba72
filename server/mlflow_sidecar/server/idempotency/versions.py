"""A model version found by its request id tag, checked against the request that reuses
the id: once the ledger has forgotten an id, the version itself tells a repeat from
another call."""

from __future__ import annotations

from collections.abc import Mapping

from mlflow_sidecar.core.domain import ModelVersion
from mlflow_sidecar.server.idempotency.ledger import request_id_reused


def check_same_version_request(
    found: ModelVersion,
    *,
    field: str,
    request_id: str,
    rpc: str,
    name: str,
    run_id: str,
    description: str,
    tags: Mapping[str, str],
    source: str | None = None,
) -> None:
    """REQUEST_ID_REUSED unless `found` is what this request would have created.

    A run or source left empty (None) is not compared: MLflow fills a version's run from
    its logged model, and rewrites a models:/NAME@ALIAS source to the version it names.
    The tags asked for must be on the version with these values; tags set on it since are
    allowed, as they would be after the first call."""
    differs = (
        found.name != name
        or (run_id and found.run_id != run_id)
        or (source is not None and found.source != source)
        or found.description != description
        or any(found.tags.get(key) != value for key, value in tags.items())
    )
    if differs:
        raise request_id_reused(field, request_id, rpc)
