"""`RegistryService`: the sidecar's model-registry use cases, over `MlflowPort`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from mlflow_sidecar.core import limits
from mlflow_sidecar.core.domain import (
    LifecycleStage,
    ModelVersion,
    Page,
    RegisteredModel,
    RunStatus,
)
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SidecarError,
)
from mlflow_sidecar.core.limits import (
    DEFAULT_PAGE_SIZE,
    MAX_ALIAS_LENGTH,
    MAX_PAGE_SIZE,
)
from mlflow_sidecar.core.paths import check_relative_path
from mlflow_sidecar.core.transfer import collect_files
from mlflow_sidecar.server import call_deadline
from mlflow_sidecar.server import validation as check
from mlflow_sidecar.server.artifact_writers import ArtifactWriters, run_files
from mlflow_sidecar.server.idempotency import REQUEST_ID_TAG, RequestLedger
from mlflow_sidecar.server.idempotency.ledger import request_id_reused
from mlflow_sidecar.server.idempotency.versions import check_same_version_request
from mlflow_sidecar.server.keyed_locks import KeyedLocks
from mlflow_sidecar.server.mlflow_gateway import MlflowPort, registration
from mlflow_sidecar.server.mlflow_gateway.sources import is_reserved_alias, reserved_alias_error
from mlflow_sidecar.server.mlflow_gateway.storage_policy import check_uri_syntax
from mlflow_sidecar.server.services.artifacts import (
    check_room_for_file,
    check_upload_size,
    store_file,
)
from mlflow_sidecar.server.staging import Staging

log = logging.getLogger(__name__)

_ALIAS_RE = re.compile(r"^[\w\-]+\Z")
# The ledger's name for UploadModel outcomes: the RPC's, as the interceptor names the others.
_UPLOAD_MODEL = "/mlflow_sidecar.v1.ModelRegistryService/UploadModel"
# Makes of the registered model an upload tries while a concurrent failed upload of the
# same new name takes it back between its making and the version.
_MODEL_GONE_TRIES = 3
# Uploaded model directories live among their run's artifacts under models/<hex id>/.
MODEL_ARTIFACT_DIR = "models"
# Marks the runs UploadModel creates when it is given an experiment instead of a run.
UPLOADED_MODEL_TAG = "mlflow_sidecar.uploaded_model"
# Set on a version once its upload did all it was asked (aliases set, its run FINISHED):
# a repeat that finds the version without it finishes the work of a try cut short.
UPLOAD_COMPLETE_TAG = "mlflow_sidecar.upload_complete"


def _name(field: str, value: str) -> str:
    return check.require(field, value, max_length=limits.MAX_NAME_LENGTH)


def _new_name(field: str, value: str) -> str:
    """A name for a model to be created or renamed to, by MLflow's rules: not blank, no '/'
    or ':', not a name that a path would read as another ('.', '..') nor one starting with
    '..', and no longer than MLflow's database column holds."""
    check.require(field, value, max_length=limits.MAX_CREATED_NAME_LENGTH)
    if not value.strip():
        raise InvalidArgumentError(field, "must not be blank")
    if "/" in value or ":" in value:
        raise InvalidArgumentError(field, f"{value!r} must not contain '/' or ':'")
    if value in (".", "..") or posixpath.normpath(value) != value:
        raise InvalidArgumentError(field, f"{value!r} would name another path as a file name")
    if value.startswith(".."):
        # MLflow refuses these as it refuses '..' itself, naming no field; an upload would
        # have made its run and stored its files by then.
        raise InvalidArgumentError(field, f"{value!r} must not start with '..'")
    return value


def _version(value: int) -> int:
    if value < 1:
        raise InvalidArgumentError("version", f"must be 1 or more, got {value}")
    return value


def _alias_name(value: str, field: str = "alias") -> str:
    """An alias as MLflow stores it (MLflow's own rule, so aliases set elsewhere resolve)."""
    check.require(field, value, max_length=MAX_ALIAS_LENGTH)
    if not _ALIAS_RE.match(value):
        raise InvalidArgumentError(
            field, f"{value!r} may only contain letters, digits, underscores and dashes"
        )
    return value


def _alias(value: str, field: str = "alias") -> str:
    """An alias as every alias RPC takes it: not one of the names MLflow reserves for
    versions ('latest', 'v<number>', in any case). MLflow refuses to set them, so they
    can never resolve: reading, downloading or deleting by one is refused the same way."""
    _alias_name(value, field)
    if is_reserved_alias(value):
        raise reserved_alias_error(field, value)
    return value


def check_alias(value: str, field: str = "alias") -> str:
    """An alias as every alias RPC takes it (see `_alias`); WatchModelAlias checks each of
    its aliases this way too."""
    return _alias(value, field)


def _upload_dir_id(request_id: str) -> str:
    """32 hex digits naming an upload's artifact directory after its request id."""
    return hashlib.sha256(request_id.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _header_fields() -> Iterator[None]:
    """An INVALID_ARGUMENT about a field of UploadModel's header names it as the request
    spells it (`header.experiment_id`), whichever check found it."""
    try:
        yield
    except InvalidArgumentError as exc:
        if not exc.field or exc.field.startswith("header."):
            raise
        raise InvalidArgumentError(
            f"header.{exc.field}", exc.problem, reason=exc.reason, metadata=exc.metadata
        ) from exc


def check_model_upload(
    name: str,
    *,
    run_id: str,
    experiment_id: str,
    description: str,
    tags: Mapping[str, str],
    aliases: Sequence[str],
    fields: str = "",
) -> None:
    """Validate what an upload_model call says about the model, before any file moves
    (or any run is made for them). `fields`: what the refused field's name is prefixed
    with ("header." where the values are an UploadModelHeader's)."""
    _new_name(f"{fields}name", name)
    if run_id and experiment_id:
        raise InvalidArgumentError(
            f"{fields}experiment_id", "give run_id or experiment_id, not both"
        )
    if not run_id and not experiment_id:
        raise InvalidArgumentError(
            f"{fields}run_id",
            "give the run to log the files to, or an experiment_id to create one in",
        )
    if run_id:
        check.run_id(f"{fields}run_id", run_id)
    check.experiment_id(f"{fields}experiment_id", experiment_id, required=False)
    check.bounded(f"{fields}description", description, limits.MAX_DESCRIPTION_LENGTH)
    check.tags(f"{fields}tags", tags, max_value_length=limits.MAX_MODEL_VERSION_TAG_VALUE_LENGTH)
    for index, alias in enumerate(aliases):
        _alias(alias, f"{fields}aliases[{index}]")


class RegistryService:
    """Model registry backed by MLflow. Versions of one model are created one at a time,
    so concurrent trainers each get a distinct version and no error."""

    def __init__(
        self,
        gateway: MlflowPort,
        staging: Staging,
        *,
        ledger: RequestLedger | None = None,
        writers: ArtifactWriters | None = None,
    ) -> None:
        """`ledger`: where UploadModel records its outcomes (unary calls are recorded by
        the idempotency interceptor, before they reach the service). `writers`: the one
        instance shared by every service that stores artifacts (a model's files are
        among its run's artifacts)."""
        self._gateway = gateway
        self._staging = staging  # transfer limits and scratch space
        self._ledger = ledger
        self._writers = ArtifactWriters() if writers is None else writers
        self._model_locks = KeyedLocks()

    def create_registered_model(
        self,
        name: str,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        get_if_exists: bool = False,
        request_id: str = "",
    ) -> RegisteredModel:
        _new_name("name", name)
        check.bounded("description", description, limits.MAX_DESCRIPTION_LENGTH)
        check.tags(
            "tags", tags or {}, max_value_length=limits.MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH
        )
        if get_if_exists:
            try:
                return self._gateway.get_registered_model(name)
            except NotFoundError:
                pass
        try:
            return self._gateway.create_registered_model(
                name,
                description=description,
                tags=tags or {},
                request_id=request_id or uuid.uuid4().hex,
            )
        except AlreadyExistsError:
            if not get_if_exists:
                raise
            return self._gateway.get_registered_model(name)

    def get_registered_model(self, name: str) -> RegisteredModel:
        return self._gateway.get_registered_model(_name("name", name))

    def search_registered_models(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegisteredModel]:
        check.search_terms(filter_string, order_by)
        return self._gateway.search_registered_models(
            filter_string=filter_string,
            order_by=order_by,
            page_size=check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE),
            page_token=check.page_token(page_token),
        )

    def update_registered_model(self, name: str, *, description: str) -> RegisteredModel:
        check.bounded("description", description, limits.MAX_DESCRIPTION_LENGTH)
        return self._gateway.update_registered_model(_name("name", name), description)

    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str = ""
    ) -> RegisteredModel:
        _name("name", name)
        _new_name("new_name", new_name)
        with self._model_locks.hold(name):
            return self._gateway.rename_registered_model(
                name, new_name, request_id=request_id or uuid.uuid4().hex
            )

    def delete_registered_model(self, name: str, *, request_id: str = "") -> None:
        self._gateway.delete_registered_model(_name("name", name))

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        check.tag_key("key", key)
        check.bounded("value", value, limits.MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH)
        self._gateway.set_registered_model_tag(_name("name", name), key, value)

    def delete_registered_model_tag(self, name: str, key: str, *, request_id: str = "") -> None:
        check.tag_key("key", key)
        self._gateway.delete_registered_model_tag(_name("name", name), key)

    def create_model_version(
        self,
        name: str,
        *,
        source: str = "",
        run_id: str = "",
        artifact_path: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> ModelVersion:
        _name("name", name)
        # Before the generic checks: a NUL is UNSAFE_URI in a source, as in any URI.
        check_uri_syntax("source", source)
        check.bounded("source", source, limits.MAX_SOURCE_LENGTH)
        check.bounded("run_id", run_id, limits.MAX_ID_LENGTH)
        check.bounded("description", description, limits.MAX_DESCRIPTION_LENGTH)
        check.tags("tags", tags or {}, max_value_length=limits.MAX_MODEL_VERSION_TAG_VALUE_LENGTH)
        if not source:
            if not run_id or not artifact_path:
                raise InvalidArgumentError(
                    "source", "give a runs:/ or models:/ source, or run_id and artifact_path"
                )
            # The caller named no source: what is wrong is in the fields it gave.
            check.run_id("run_id", run_id)
            source = _run_source(run_id, artifact_path)
        elif artifact_path:
            raise InvalidArgumentError("artifact_path", "give either source or artifact_path")
        # NOT_FOUND for an unknown model instead of MLflow creating nothing with a vague error.
        self._gateway.get_registered_model(name)
        # NOT_FOUND for a missing run, source version or alias, before registering anything.
        run_id = self._gateway.resolve_source(source, run_id)
        # One registration per model at a time: each caller gets the next number, no conflict.
        with self._model_locks.hold(name):
            # A caller that gave up while others registered must not leave a version behind.
            if registration.deadline_passed():
                raise DeadlineExceededError(
                    f"deadline exceeded while waiting to register a version of {name!r}"
                )
            with _source_at_fault():
                created = self._gateway.create_model_version(
                    name,
                    source=source,
                    run_id=run_id,
                    description=description,
                    tags=tags or {},
                    request_id=request_id or uuid.uuid4().hex,
                )
        return self._gateway.wait_until_ready(created)

    @contextlib.contextmanager
    def _model_named(self, name: str) -> Iterator[None]:
        """A version call's NOT_FOUND is MODEL_NOT_FOUND when the model itself is missing:
        MLflow says only that the version is (one more MLflow call, on that failure only)."""
        try:
            yield
        except NotFoundError as exc:
            if exc.reason == ErrorReason.MODEL_VERSION_NOT_FOUND and self._model_missing(name):
                raise NotFoundError(
                    f"registered model {name!r} does not exist", reason=ErrorReason.MODEL_NOT_FOUND
                ) from exc
            raise

    def _model_missing(self, name: str) -> bool:
        """True when MLflow says there is no model `name`; False when it has one, or when
        asking failed (the version's NOT_FOUND then stands as it was)."""
        try:
            self._gateway.get_registered_model(name, retry=False)
        except NotFoundError:
            return True
        except SidecarError:
            return False
        return False

    def get_model_version(self, name: str, version: int) -> ModelVersion:
        with self._model_named(name):
            return self._gateway.get_model_version(_name("name", name), _version(version))

    def get_model_version_by_alias(self, name: str, alias: str) -> ModelVersion:
        _name("name", name)
        _alias(alias)
        return self._gateway.get_model_version_by_alias(name, alias)

    def get_latest_model_version(self, name: str) -> ModelVersion:
        latest = self._gateway.latest_model_version(_name("name", name))
        # MLflow's search leaves out the aliases; a version read by number has them.
        return self._gateway.get_model_version(name, latest.version)

    def search_model_versions(
        self,
        *,
        filter_string: str = "",
        order_by: Sequence[str] = (),
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[ModelVersion]:
        check.search_terms(filter_string, order_by)
        return self._gateway.search_model_versions(
            filter_string=filter_string,
            order_by=order_by,
            page_size=check.page_size(page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE),
            page_token=check.page_token(page_token),
        )

    def update_model_version(self, name: str, version: int, *, description: str) -> ModelVersion:
        check.bounded("description", description, limits.MAX_DESCRIPTION_LENGTH)
        with self._model_named(name):
            return self._gateway.update_model_version(
                _name("name", name), _version(version), description
            )

    def delete_model_version(self, name: str, version: int, *, request_id: str = "") -> None:
        with self._model_named(name):
            self._gateway.delete_model_version(_name("name", name), _version(version))

    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        check.tag_key("key", key)
        check.bounded("value", value, limits.MAX_MODEL_VERSION_TAG_VALUE_LENGTH)
        with self._model_named(name):
            self._gateway.set_model_version_tag(_name("name", name), _version(version), key, value)

    def delete_model_version_tag(
        self, name: str, version: int, key: str, *, request_id: str = ""
    ) -> None:
        check.tag_key("key", key)
        with self._model_named(name):
            self._gateway.delete_model_version_tag(_name("name", name), _version(version), key)

    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        _name("name", name)
        _alias(alias)
        with self._model_named(name):
            self._gateway.set_model_alias(name, alias, _version(version))

    def delete_model_alias(self, name: str, alias: str, *, request_id: str = "") -> None:
        _name("name", name)
        self._gateway.delete_model_alias(name, _alias(alias))

    # -- model files --------------------------------------------------------------------

    def upload_model(
        self,
        name: str,
        local_dir: Path,
        *,
        run_id: str = "",
        experiment_id: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
        request_id: str = "",
    ) -> ModelVersion:
        """Store the model directory `local_dir` (staged by the sidecar) among a run's
        artifacts and register it as a new version, with its aliases: all or nothing."""
        check_model_upload(
            name,
            run_id=run_id,
            experiment_id=experiment_id,
            description=description,
            tags=tags or {},
            aliases=aliases,
        )
        files = collect_files(local_dir)
        if not files:
            raise InvalidArgumentError("local_dir", f"{local_dir} contains no files")
        total = sum(f.size_bytes for f in files)
        check_upload_size("local_dir", total, self._staging.max_upload_bytes)
        request_id = request_id or uuid.uuid4().hex
        run_id, created_run = self._upload_run(name, run_id, experiment_id, request_id)
        # Derived from the request id: a retry after a lost answer writes the same files
        # again instead of leaving the first try's copy behind.
        artifact_dir = f"{MODEL_ARTIFACT_DIR}/{_upload_dir_id(request_id)}"
        if not created_run:
            # A run of the caller's may hold a file where the model's directory goes.
            check_room_for_file(
                lambda path: self._gateway.list_artifacts(run_id, path),
                run_files(run_id),
                f"{artifact_dir}/{files[0].relpath}",
            )
        created_model = False
        try:
            for local in files:
                store_file(
                    self._gateway,
                    self._staging,
                    run_id,
                    local.path,
                    f"{artifact_dir}/{local.relpath}",
                    writers=self._writers,
                )
            for attempt in range(_MODEL_GONE_TRIES):
                created_model = self._ensure_registered_model(name) or created_model
                try:
                    created = self.create_model_version(
                        name,
                        source=f"runs:/{run_id}/{artifact_dir}",
                        run_id=run_id,
                        description=description,
                        tags=tags,
                        request_id=request_id,
                    )
                    break
                except NotFoundError as exc:
                    # Removed between the two calls: by a concurrent upload of the same new
                    # name that failed and took back the empty model it made. This upload
                    # makes the model again; its version is what makes it not empty.
                    if (
                        exc.reason != ErrorReason.MODEL_NOT_FOUND
                        or attempt + 1 == _MODEL_GONE_TRIES
                    ):
                        raise
            for alias in dict.fromkeys(aliases):
                self.set_model_alias(name, alias, created.version)
            result = self.get_model_version(name, created.version)
        except Exception:
            self._undo_upload(
                name, run_id, artifact_dir, created_run=created_run, created_model=created_model
            )
            raise
        if created_run:
            self._gateway.set_terminated(run_id, RunStatus.FINISHED, 0)
        self._gateway.set_model_version_tag(name, created.version, UPLOAD_COMPLETE_TAG, "true")
        return result

    def _finish_upload(
        self, found: ModelVersion, aliases: Sequence[str], *, created_run: bool
    ) -> ModelVersion:
        """The version an earlier try of this upload registered, with the rest of that
        try's work done if it was cut short (a killed sidecar): its aliases set and the
        run made for it FINISHED. A complete upload is left as it is, so a late repeat
        cannot move back an alias set since."""
        if self._gateway.model_version_tag(found.name, found.version, UPLOAD_COMPLETE_TAG):
            return self.get_model_version(found.name, found.version)
        for alias in dict.fromkeys(aliases):
            self.set_model_alias(found.name, alias, found.version)
        if created_run:
            run = self._gateway.get_run(found.run_id)
            if run.info.status is RunStatus.RUNNING:
                self._gateway.set_terminated(found.run_id, RunStatus.FINISHED, 0)
        self._gateway.set_model_version_tag(found.name, found.version, UPLOAD_COMPLETE_TAG, "true")
        return self.get_model_version(found.name, found.version)

    def upload_once(
        self,
        name: str,
        request_id: str,
        request_print: str,
        upload: Callable[[], ModelVersion],
        *,
        run_id: str = "",
        experiment_id: str = "",
        description: str = "",
        tags: Mapping[str, str] | None = None,
        aliases: Sequence[str] = (),
    ) -> ModelVersion:
        """`upload()` (which reads and registers the files) once per request id.

        A repeat of an upload that took effect gets its version without `upload` running,
        so its files are not read again: from the ledger when it recorded the first
        outcome (the same `request_print` required, else REQUEST_ID_REUSED), else found
        by the version's request id tag (the same model name, run or run's experiment,
        description and tags required), with what the first try left undone done
        (`aliases`, its run's end)."""
        if not request_id:
            return upload()
        made: list[ModelVersion] = []

        def first() -> bytes:
            found = self._uploaded_version(
                name,
                request_id,
                run_id=run_id,
                experiment_id=experiment_id,
                description=description,
                tags=tags or {},
            )
            version = (
                upload()
                if found is None
                else self._finish_upload(found, aliases, created_run=not run_id)
            )
            made.append(version)
            return json.dumps([version.name, version.version]).encode()

        if self._ledger is None:
            first()
            return made[0]
        recorded = self._ledger.once(
            _UPLOAD_MODEL, request_id, request_print, first, field="header.request_id"
        )
        if made:
            return made[0]
        found_name, number = json.loads(recorded)
        return self.get_model_version(found_name, number)

    def _uploaded_version(
        self,
        name: str,
        request_id: str,
        *,
        run_id: str,
        experiment_id: str,
        description: str,
        tags: Mapping[str, str],
    ) -> ModelVersion | None:
        """The version an earlier UploadModel with this request id registered, or None."""
        found = self._gateway.find_model_version(request_id)
        if found is None:
            return None
        # Made in a run of another experiment: another call's.
        if experiment_id and found.run_id:
            made_in = self._gateway.get_run(found.run_id).info.experiment_id
            if made_in != experiment_id:
                raise request_id_reused("header.request_id", request_id, "UploadModel")
        check_same_version_request(
            found,
            field="header.request_id",
            request_id=request_id,
            rpc="UploadModel",
            name=name,
            run_id=run_id,
            description=description,
            tags=tags,
        )
        return found

    def _upload_run(
        self, name: str, run_id: str, experiment_id: str, request_id: str
    ) -> tuple[str, bool]:
        """The active run to log model files to, and whether it was created for them."""
        with _header_fields():
            return self._upload_run_of(name, run_id, experiment_id, request_id)

    def _upload_run_of(
        self, name: str, run_id: str, experiment_id: str, request_id: str
    ) -> tuple[str, bool]:
        if run_id:
            run = self._gateway.get_run(run_id)
            if run.info.lifecycle_stage is LifecycleStage.DELETED:
                raise FailedPreconditionError(
                    f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
                )
            if run.info.artifact_uri:
                self._gateway.check_storage("header.run_id", run.info.artifact_uri)
            return run_id, False
        experiment = self._gateway.get_experiment(experiment_id)
        if experiment.lifecycle_stage is LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"experiment {experiment_id} is deleted", reason=ErrorReason.EXPERIMENT_NOT_ACTIVE
            )
        # Before the run is made: its files could not be stored, and the run would stay.
        if experiment.artifact_location:
            self._gateway.check_storage("header.experiment_id", experiment.artifact_location)
        run = self._gateway.find_or_create_run(
            experiment_id,
            run_name="",
            tags={UPLOADED_MODEL_TAG: name, REQUEST_ID_TAG: request_id},
            start_time_ms=0,
            key_tag=REQUEST_ID_TAG,
        )
        return run.run_id, True

    def _ensure_registered_model(self, name: str) -> bool:
        """Create the registered model unless it exists; True when this call created it."""
        try:
            self._gateway.get_registered_model(name)
            return False
        except NotFoundError:
            pass
        try:
            self._gateway.create_registered_model(
                name, description="", tags={}, request_id=uuid.uuid4().hex
            )
        except AlreadyExistsError:
            return False  # created by a concurrent caller meanwhile
        return True

    def _undo_upload(
        self,
        name: str,
        run_id: str,
        artifact_dir: str,
        *,
        created_run: bool,
        created_model: bool,
    ) -> None:
        """Best effort after a failed upload: no half-registered version, no orphan files,
        no empty registered model that this upload created.

        A version whose creation failed may still exist (MLflow answered, the answer got
        lost), so versions are looked up by source rather than trusted from the call. The
        files are deleted only once no version points at them.
        """
        source = f"runs:/{run_id}/{artifact_dir}"
        with call_deadline.cleanup_scope():
            try:
                for version in self._gateway.versions_from(name, source):
                    self._gateway.delete_model_version(version.name, version.version)
                self._gateway.delete_artifacts(run_id, artifact_dir)
                if created_model and not self._has_versions(name):
                    self._gateway.delete_registered_model(name)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original failure
                log.warning("after a failed model upload, could not remove %s: %s", source, exc)
            if created_run:
                try:
                    self._gateway.set_terminated(run_id, RunStatus.FAILED, 0)
                except Exception as exc:  # noqa: BLE001 - as above
                    log.warning(
                        "after a failed model upload, could not fail run %s: %s", run_id, exc
                    )

    def _has_versions(self, name: str) -> bool:
        try:
            self._gateway.latest_model_version(name)
        except NotFoundError:
            return False
        return True


def _run_source(run_id: str, artifact_path: str) -> str:
    """The `runs:/` source that `run_id` and `artifact_path` name, held to the rules of a
    source given whole (faults named on `artifact_path`)."""
    check_relative_path("artifact_path", artifact_path)
    source = f"runs:/{run_id}/{artifact_path}"
    check_uri_syntax("artifact_path", source)
    if len(source) > limits.MAX_SOURCE_LENGTH:
        raise InvalidArgumentError(
            "artifact_path",
            f"makes a source of {len(source)} characters ({source[:40]}...); a version's"
            f" source holds at most {limits.MAX_SOURCE_LENGTH}",
        )
    return source


@contextlib.contextmanager
def _source_at_fault() -> Iterator[None]:
    """MLflow's refusals of a new version name no field; every other field was checked
    before, so what MLflow refuses is the source (with the run it names or lacks)."""
    try:
        yield
    except InvalidArgumentError as exc:
        if exc.field:
            raise
        raise InvalidArgumentError(
            "source", exc.problem, reason=exc.reason, metadata=exc.metadata
        ) from None
