"""`UploadOnce`: one effect per request id for the single-file upload RPCs.

The unary calls are answered from the ledger by the interceptor; an upload is a stream,
so its header is looked up here before any byte goes to MLflow. A repeat of an upload
that took effect (the same run or model, path and size) is read to its end and checked,
and nothing of it is stored: a retry that arrives late cannot overwrite what a newer
upload put at that path. The same id with another header, or with other bytes, is
REQUEST_ID_REUSED.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from mlflow_sidecar.server.idempotency.ledger import RequestLedger, request_id_reused

_FIELD = "header.request_id"


@dataclass(frozen=True, slots=True)
class FirstUpload:
    """What the first upload of a request id stored."""

    artifact_path: str
    size_bytes: int
    sha256: str


class UploadOnce:
    """The ledger's view for one upload RPC (`method`, its full gRPC name)."""

    def __init__(self, ledger: RequestLedger | None, method: str) -> None:
        self._ledger = ledger
        self._method = method

    def held(self, request_id: str) -> AbstractContextManager[None]:
        """Uploads of one request id one at a time: a repeat racing its first try waits for
        it, then finds its outcome."""
        if self._ledger is None:
            return nullcontext()
        return self._ledger.hold(self._method, request_id)

    @property
    def rpc(self) -> str:
        """The RPC's short name, for messages."""
        return self._method.rsplit("/", 1)[-1]

    def first(self, request_id: str, owner: str, path: str, size_bytes: int) -> FirstUpload | None:
        """The upload this request id already stored, or None; REQUEST_ID_REUSED when the
        id was used for an upload of another owner (run or model), path or size."""
        if not request_id or self._ledger is None:
            return None
        answer = self._ledger.answer(
            self._method, request_id, _print(owner, path, size_bytes), _FIELD
        )
        if answer is None:
            return None
        stored = json.loads(answer)
        return FirstUpload(str(stored[0]), int(stored[1]), str(stored[2]))

    def check_same_bytes(self, request_id: str, first: FirstUpload, sha256: str) -> None:
        """REQUEST_ID_REUSED unless a repeat carried the bytes its first upload stored."""
        if sha256 != first.sha256:
            raise request_id_reused(_FIELD, request_id, self.rpc)

    def record(self, request_id: str, owner: str, path: str, size_bytes: int, sha256: str) -> None:
        """Remember an upload that took effect."""
        if request_id and self._ledger is not None:
            self._ledger.record(
                self._method,
                request_id,
                _print(owner, path, size_bytes),
                json.dumps([path, size_bytes, sha256]).encode(),
            )


def _print(owner: str, path: str, size_bytes: int) -> str:
    return hashlib.sha256(json.dumps([owner, path, size_bytes]).encode()).hexdigest()
