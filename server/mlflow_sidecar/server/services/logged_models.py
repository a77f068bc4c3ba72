"""`LoggedModelService`: MLflow 3's logged models, as `log_model` and autologging use them.

Validation and paging here; the MLflow calls in `mlflow_gateway.logged_models`. A logged
model's files are received and verified like a run's artifact (size and sha256), staged,
then stored under the model's artifact location.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.domain import FileInfo, Page
from mlflow_sidecar.core.errors import ErrorReason, InvalidArgumentError, NotFoundError
from mlflow_sidecar.core.limits import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus
from mlflow_sidecar.core.names import LOGGED_MODEL_NAME_BAD_CHARS
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.core.transfer import read_chunks
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.artifact_writers import ArtifactWriters, logged_model_files
from mlflow_sidecar.server.mlflow_gateway.port import LoggedModelsPort, StreamedDownload
from mlflow_sidecar.server.services.artifacts import (
    check_room_for_file,
    decode_listing_token,
    encode_listing_token,
)
from mlflow_sidecar.server.staging import Staging

_FINAL_STATUSES = frozenset({LoggedModelStatus.READY, LoggedModelStatus.FAILED})


_MODEL_ID_RE = re.compile(r"[a-zA-Z0-9][\w\-]{0,63}")
_REQUIRED_DATASET_FIELDS = frozenset({"name", "digest", "source_type", "source"})


def model_id(field: str, value: str) -> str:
    """A logged model id as MLflow makes them (e.g. "m-" and 32 hex digits)."""
    check.require(field, value, max_length=limits.MAX_ID_LENGTH)
    if not _MODEL_ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            field, f"{value!r} is not a logged model id (letters, digits, '_' and '-')"
        )
    return value


class ModelFileUpload:
    """An upload sink for one file of a logged model: the file is stored once verified."""

    needs_file = True

    def __init__(
        self,
        gateway: LoggedModelsPort,
        writers: ArtifactWriters,
        model_id: str,
        artifact_path: str,
    ) -> None:
        self._gateway = gateway
        self._writers = writers
        self._model_id = model_id
        self._artifact_path = artifact_path

    def write(self, chunk: bytes) -> None:
        """Nothing to pass on while the bytes arrive: the verified file is stored whole."""

    def store(self, verified_file: Path | None) -> None:
        """Store the verified file under the model's artifact location, as the only
        writer of that path in this sidecar until the store's outcome is known."""
        if verified_file is None:
            raise ValueError("a logged model's file is stored from its staged copy")
        directory = self._artifact_path.rpartition("/")[0]
        with self._writers.writing(logged_model_files(self._model_id), self._artifact_path):
            self._gateway.log_artifact(self._model_id, verified_file, directory)

    def abort(self) -> None:
        """Nothing reached MLflow before `store`: nothing to undo."""


class LoggedModelService:
    """Create, read, search, finalize and tag logged models; record them as run outputs;
    move their files."""

    def __init__(
        self, gateway: LoggedModelsPort, staging: Staging, writers: ArtifactWriters | None = None
    ) -> None:
        """`writers`: the one instance shared by every service that stores artifacts."""
        self._gateway = gateway
        self._staging = staging
        self._writers = ArtifactWriters() if writers is None else writers

    def create(
        self,
        experiment_id: str,
        *,
        name: str = "",
        model_type: str = "",
        source_run_id: str = "",
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> LoggedModel:
        """A new logged model in PENDING status."""
        check.experiment_id("experiment_id", experiment_id)
        if name:
            check.bounded("name", name, limits.MAX_NAME_LENGTH)
            bad = [c for c in LOGGED_MODEL_NAME_BAD_CHARS if c in name]
            if bad:
                # MLflow's rule for a logged model's name; it refuses without naming a field.
                raise InvalidArgumentError(
                    "name", f"{name!r}: a logged model name cannot hold {' '.join(bad)}"
                )
        check.bounded("model_type", model_type, limits.MAX_MODEL_TYPE_LENGTH)
        if source_run_id:
            check.run_id("source_run_id", source_run_id)
        check.string_map("params", params or {}, max_value_length=limits.MAX_PARAM_VALUE_LENGTH)
        check.tags("tags", tags or {})
        return self._gateway.create(
            experiment_id,
            name=name,
            model_type=model_type,
            source_run_id=source_run_id,
            params=params or {},
            tags=tags or {},
        )

    def get(self, model_id_: str) -> LoggedModel:
        """One logged model."""
        return self._gateway.get(model_id("model_id", model_id_))

    def search(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str = "",
        order_by: Sequence[tuple[str, bool]] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[LoggedModel]:
        """One page of logged models of the experiments."""
        if not experiment_ids:
            raise InvalidArgumentError("experiment_ids", "name at least one experiment")
        for index, experiment_id in enumerate(experiment_ids):
            check.experiment_id(f"experiment_ids[{index}]", experiment_id)
        check.search_terms(filter_string, ())
        check.order_by_count(len(order_by))
        for index, (field_name, _) in enumerate(order_by):
            check.require(
                f"order_by[{index}].field_name", field_name, max_length=limits.MAX_ORDER_BY_LENGTH
            )
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        return self._gateway.search(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by,
            page_size=size,
            page_token=check.page_token(page_token),
        )

    def finalize(self, model_id_: str, status: LoggedModelStatus | None) -> LoggedModel:
        """Set the final status: READY or FAILED."""
        model_id("model_id", model_id_)
        if status not in _FINAL_STATUSES:
            raise InvalidArgumentError("status", "must be READY or FAILED")
        return self._gateway.finalize(model_id_, status)

    def set_tags(self, model_id_: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags."""
        model_id("model_id", model_id_)
        check.tags("tags", tags)
        self._gateway.set_tags(model_id_, tags)

    def delete_tag(self, model_id_: str, key: str) -> None:
        """Delete one tag."""
        model_id("model_id", model_id_)
        check.tag_key("key", key)
        self._gateway.delete_tag(model_id_, key)

    def log_outputs(self, run_id: str, outputs: Sequence[tuple[str, int]]) -> None:
        """Record logged models as the run's outputs."""
        check.run_id("run_id", run_id)
        if not outputs:
            raise InvalidArgumentError("models", "name at least one model")
        seen: set[str] = set()
        for index, (output_id, _) in enumerate(outputs):
            model_id(f"models[{index}].model_id", output_id)
            if output_id in seen:
                raise InvalidArgumentError(f"models[{index}].model_id", "is listed twice")
            seen.add(output_id)
        self._gateway.log_outputs(run_id, outputs)

    def log_inputs(
        self, run_id: str, datasets: Sequence[DatasetUse], model_ids: Sequence[str]
    ) -> None:
        """Record the datasets and logged models the run used."""
        check.run_id("run_id", run_id)
        if not datasets and not model_ids:
            raise InvalidArgumentError("datasets", "name at least one dataset or model")
        for index, dataset in enumerate(datasets):
            for name, most in limits.DATASET_FIELD_LENGTHS.items():
                value = getattr(dataset, name)
                if name in _REQUIRED_DATASET_FIELDS:
                    check.require(f"datasets[{index}].{name}", value, max_length=most)
                else:
                    check.bounded(f"datasets[{index}].{name}", value, most)
            for key, value in dataset.tags.items():
                check.require(
                    f"datasets[{index}].tags.key", key, max_length=limits.MAX_INPUT_TAG_KEY_LENGTH
                )
                check.not_reserved(f"datasets[{index}].tags.key", key)
                check.bounded(
                    f"datasets[{index}].tags[{key}]", value, limits.MAX_INPUT_TAG_VALUE_LENGTH
                )
        for index, input_id in enumerate(model_ids):
            model_id(f"model_ids[{index}]", input_id)
        self._gateway.log_inputs(run_id, datasets, model_ids)

    # -- files ----------------------------------------------------------------------------

    def begin_upload(self, model_id_: str, artifact_path: str, size_bytes: int) -> ModelFileUpload:
        """Check the model, its location and that the path is free for a file before any
        byte travels."""
        self._gateway.artifact_location(model_id("header.model_id", model_id_))
        check_room_for_file(
            lambda path: self._gateway.list_artifacts(model_id_, path),
            logged_model_files(model_id_),
            artifact_path,
        )
        return ModelFileUpload(self._gateway, self._writers, model_id_, artifact_path)

    def list_artifacts(
        self,
        model_id_: str,
        path: str = "",
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[FileInfo]:
        """One page of the model's files directly under `path`, in path order."""
        model_id("model_id", model_id_)
        check_relative_path("path", path, allow_empty=True)
        size = check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        after = decode_listing_token(page_token, model_id_, path)
        entries = sorted(self._gateway.list_artifacts(model_id_, path), key=lambda e: e.path)
        remaining = [e for e in entries if e.path > after] if after else entries
        page = tuple(remaining[:size])
        more = len(remaining) > size
        return Page(page, encode_listing_token(model_id_, path, page[-1].path) if more else "")

    def open_download(self, model_id_: str, artifact_path: str, scratch: Path) -> StreamedDownload:
        """The bytes of one of the model's files, downloaded into `scratch` first."""
        model_id("model_id", model_id_)
        check_relative_path("artifact_path", artifact_path)
        parent = artifact_path.rpartition("/")[0]
        listed = self._gateway.list_artifacts(model_id_, parent)
        entry = next((e for e in listed if e.path.rstrip("/") == artifact_path), None)
        if entry is None:
            raise NotFoundError(
                f"logged model {model_id_} has no file {artifact_path!r}",
                reason=ErrorReason.ARTIFACT_NOT_FOUND,
                field="artifact_path",
            )
        if entry.is_dir:
            raise InvalidArgumentError(
                "artifact_path",
                f"{artifact_path!r} is a directory; list it and download its files one by one",
            )
        local = self._gateway.download_artifact(model_id_, artifact_path, scratch)
        chunk_bytes = self._staging.chunk_bytes
        return StreamedDownload(local.stat().st_size, read_chunks(local, chunk_bytes), _no_op)


def _no_op() -> None:
    """Nothing to release: the scratch directory goes with the call."""
