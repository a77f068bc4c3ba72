"""`FakeMlflow`: the one in-memory `MlflowPort` (and, as `FakeMlflow().logged_models`,
`LoggedModelsPort`), for unit tests.

It behaves as the contract suite (tests/contract) says MLflow behind `MlflowGateway`
does, and adds what tests need to steer it: fault injection (`fail`, `outage`,
`slow`, `on_call`), pending registrations, and a record of what was called.

Filters understand the subset the sidecar's tests use: `attr = 'value'` and
`attr LIKE 'pattern'` clauses joined by AND, on `name`, `run_id`, `source` and
`tags.<key>`; anything else is INVALID_ARGUMENT on `filter`, as MLflow's parser answers
for what it cannot read.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.clock import now_ms
from mlflow_sidecar.core.errors import (
    AlreadyExistsError,
    ErrorReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from mlflow_sidecar.core.logged_models import DatasetUse, LoggedModel, LoggedModelStatus
from mlflow_sidecar.core.names import LOGGED_MODEL_NAME_BAD_CHARS
from mlflow_sidecar.server.idempotency.ledger import (
    request_id_reused,
)
from mlflow_sidecar.server.mlflow_gateway import metric_history, page_tokens, registration
from mlflow_sidecar.server.mlflow_gateway.port import (
    ArtifactUpload,
    LoggedModelsPort,
    MlflowPort,
    StreamedDownload,
)
from mlflow_sidecar.server.mlflow_gateway.sources import (
    check_source_alias,
    models_source,
    runs_source_run_id,
)

F = TypeVar("F", bound=Callable[..., Any])

_LOGGED_MODELS = "logged_models"
# The characters MLflow refuses in a logged model's name.
# The fields MLflow orders logged models by (its names, and its aliases of them).
_LOGGED_MODEL_ORDER = {
    "name": "name",
    "model_id": "model_id",
    "model_type": "model_type",
    "source_run_id": "source_run_id",
    "creation_timestamp": "creation_timestamp",
    "creation_time": "creation_timestamp",
    "last_updated_timestamp": "last_updated_timestamp",
}

DEFAULT_EXPERIMENT_ID = "0"
# The sidecar's own tags: kept with a run, never shown among its tags (as the gateway).
_OWN_TAG_PREFIX = "mlflow_sidecar."
_CLAUSE = re.compile(
    r"""^\s*(?P<attr>[\w.]+|tags\.`[^`]+`)\s*(?P<op>=|LIKE)\s*(?P<q>['"])(?P<value>.*?)(?P=q)\s*$""",
    re.IGNORECASE,
)


def _port_call(method: F) -> F:
    """Apply the fake's fault knobs around one port method and record the call."""
    name = method.__name__
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self: FakeMlflow | FakeLoggedModels, *args: Any, **kwargs: Any) -> Any:
        # The logged models' calls are steered and recorded by their FakeMlflow's knobs,
        # under names of their own ("logged_models.delete_tag" is not "delete_tag").
        fake = self if isinstance(self, FakeMlflow) else self.fake
        call = name if isinstance(self, FakeMlflow) else f"{_LOGGED_MODELS}.{name}"
        fake._enter(call)
        try:
            failure = fake._failure(call, before=True)
            if failure is not None:
                raise failure
            result = method(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            del arguments["self"]
            with fake._lock:
                fake.record.append((call, arguments))
            failure = fake._failure(call, before=False)
            if failure is not None:
                raise failure
            return result
        finally:
            fake._leave(call)

    return wrapper  # type: ignore[return-value]


@dataclass
class _Failure:
    error: Exception
    times: int | None  # None: every call until cleared
    after_effect: bool


@dataclass
class _StoredExperiment:
    experiment: domain.Experiment
    request_id: str


@dataclass
class _StoredRun:
    info: domain.RunInfo
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    history: dict[str, list[domain.Metric]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    # Logged models recorded as the run's outputs (model id, step) and inputs, in order.
    model_outputs: list[tuple[str, int]] = field(default_factory=list)
    model_inputs: list[str] = field(default_factory=list)
    dataset_inputs: list[DatasetUse] = field(default_factory=list)


@dataclass
class _StoredLoggedModel:
    model: LoggedModel
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _StoredModel:
    model: domain.RegisteredModel
    request_id: str
    rename_request_id: str = ""
    next_version: int = 1


@dataclass
class _StoredVersion:
    version: domain.ModelVersion
    request_id: str
    pending_polls: int = 0
    outcome: domain.ModelVersionStatus = domain.ModelVersionStatus.READY


class FakeMlflow:
    """An in-memory MLflow behind the `MlflowPort` contract. Thread-safe.

    Knobs:
      fail(method, error, times=1, after_effect=False): the next `times` calls of
        `method` ("*": any method) raise `error`; with `after_effect` the call takes
        effect first (a lost answer). `times=None` fails until `clear_failures()`.
      outage(): every call is UnavailableError until `recover()`.
      slow(method, seconds): each call of `method` takes that long.
      on_call(method, hook): `hook()` runs at the start of each call (a barrier, an event).
      pending_registrations(polls, outcome): new versions report PENDING_REGISTRATION for
        `polls` reads, then `outcome`.
    Records: `calls` (attempts per method), `record` (the calls that took effect, with
    their arguments, in order; see `effects`), `max_in_flight` (per method).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._failures: dict[str, list[_Failure]] = defaultdict(list)
        self._delays: dict[str, float] = {}
        self._hooks: dict[str, Callable[[], None]] = {}
        self._down = False
        self._pending_polls = 0
        self._outcome = domain.ModelVersionStatus.READY
        self.calls: Counter[str] = Counter()
        # (method, arguments) of every call that took effect, in order.
        self.record: list[tuple[str, dict[str, Any]]] = []
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.experiments: dict[str, _StoredExperiment] = {}
        self.runs: dict[str, _StoredRun] = {}
        self.models: dict[str, _StoredModel] = {}
        self.versions: dict[tuple[str, int], _StoredVersion] = {}
        # MLflow 3's logged models, behind their own port (their method names are taken).
        self.logged_models = FakeLoggedModels(self)
        now = now_ms()
        self.experiments[DEFAULT_EXPERIMENT_ID] = _StoredExperiment(
            domain.Experiment(
                DEFAULT_EXPERIMENT_ID,
                "Default",
                artifact_location=f"fake:/{DEFAULT_EXPERIMENT_ID}",
                creation_time_ms=now,
                last_update_time_ms=now,
            ),
            "",
        )

    # -- knobs --------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        error: Exception,
        *,
        times: int | None = 1,
        after_effect: bool = False,
    ) -> None:
        """Make the next `times` calls of `method` ("*": any) raise `error`."""
        with self._lock:
            self._failures[method].append(_Failure(error, times, after_effect))

    def clear_failures(self) -> None:
        """Forget every failure still to come."""
        with self._lock:
            self._failures.clear()

    def outage(self) -> None:
        """MLflow goes away: every call is UnavailableError until `recover()`."""
        self._down = True

    def recover(self) -> None:
        """MLflow is back."""
        self._down = False

    def slow(self, method: str, seconds: float) -> None:
        """Each call of `method` takes `seconds` (0: as fast as it can)."""
        self._delays[method] = seconds

    def on_call(self, method: str, hook: Callable[[], None] | None) -> None:
        """Run `hook` at the start of every call of `method` (None: no more)."""
        if hook is None:
            self._hooks.pop(method, None)
        else:
            self._hooks[method] = hook

    def pending_registrations(
        self, polls: int, outcome: domain.ModelVersionStatus = domain.ModelVersionStatus.READY
    ) -> None:
        """New versions stay PENDING_REGISTRATION for `polls` reads, then turn `outcome`."""
        self._pending_polls = polls
        self._outcome = outcome

    def _enter(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1
            self.in_flight[name] += 1
            self.max_in_flight[name] = max(self.max_in_flight[name], self.in_flight[name])
        if self._down:
            raise UnavailableError(
                "MLflow is unreachable (a simulated outage)", reason=ErrorReason.MLFLOW_UNAVAILABLE
            )
        hook = self._hooks.get(name)
        if hook is not None:
            hook()
        if delay := self._delays.get(name, 0.0):
            time.sleep(delay)

    def _leave(self, name: str) -> None:
        with self._lock:
            self.in_flight[name] -= 1

    def _failure(self, name: str, *, before: bool) -> Exception | None:
        with self._lock:
            for key in (name, "*"):
                queued = self._failures.get(key)
                if not queued or queued[0].after_effect == before:
                    continue
                failure = queued[0]
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        queued.pop(0)
                return failure.error
        return None

    # -- inspection ---------------------------------------------------------------------

    @property
    def files(self) -> dict[tuple[str, str], bytes]:
        """Every stored artifact file, by (run id, path)."""
        with self._lock:
            return {
                (run_id, path): data
                for run_id, run in self.runs.items()
                for path, data in run.files.items()
            }

    def effects(self, method: str) -> list[dict[str, Any]]:
        """The arguments of each call of `method` that took effect, in order."""
        with self._lock:
            return [arguments for name, arguments in self.record if name == method]

    def new_experiment(self, name: str = "") -> str:
        """An experiment for a test to work in; returns its id."""
        return self.create_experiment(
            name or f"experiment-{next(self._ids)}",
            artifact_location="",
            tags={},
            request_id=f"setup-{next(self._ids)}",
        )

    def add_run(self, run_id: str, experiment_id: str = DEFAULT_EXPERIMENT_ID) -> None:
        """A RUNNING run with a chosen id, for tests that name their runs."""
        with self._lock:
            location = self._experiment(experiment_id).experiment.artifact_location
            self.runs[run_id] = _StoredRun(
                domain.RunInfo(
                    run_id,
                    experiment_id,
                    run_id,
                    start_time_ms=now_ms(),
                    artifact_uri=f"{location}/{run_id}/artifacts",
                )
            )

    def new_run(self, experiment_id: str = "") -> str:
        """A RUNNING run for a test to work in (in a new experiment unless given); its id."""
        key = f"setup-{next(self._ids)}"
        return self.find_or_create_run(
            experiment_id or self.new_experiment(),
            run_name="",
            tags={"setup": key},
            start_time_ms=0,
            key_tag="setup",
        ).run_id

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _matches(filter_string: str, values: Callable[[str], str | None]) -> bool:
        for attr, op, wanted in _clauses(filter_string):
            found = values(attr)
            if op == "=":
                if found != wanted:
                    return False
            elif found is None or not _like(wanted).fullmatch(found):
                return False
        return True

    @staticmethod
    def _ordered(
        items: list[Any], order_by: Sequence[str], keys: Mapping[str, Callable[[Any], Any]]
    ) -> list[Any]:
        for index, clause in reversed(list(enumerate(order_by))):
            parts = clause.split()
            bad_direction = len(parts) == 2 and parts[1].upper() not in ("ASC", "DESC")
            if not parts or len(parts) > 2 or parts[0] not in keys or bad_direction:
                raise InvalidArgumentError(f"order_by[{index}]", f"cannot order by {clause!r}")
            descending = len(parts) == 2 and parts[1].upper() == "DESC"
            items = sorted(items, key=keys[parts[0]], reverse=descending)
        return items

    @staticmethod
    def _page(kind: str, items: list[Any], page_size: int, page_token: str) -> domain.Page[Any]:
        offset = 0
        if page_token:
            decoded = page_tokens.decode(kind, page_token)
            offset = page_tokens.bounded_int(decoded.get("offset"), 1, page_tokens.MAX_OFFSET)
        end = offset + page_size
        token = page_tokens.encode(kind, offset=end) if end < len(items) else ""
        return domain.Page(tuple(items[offset:end]), token)

    def _experiment(self, experiment_id: str) -> _StoredExperiment:
        found = self.experiments.get(experiment_id)
        if found is None:
            if not experiment_id.isdigit():
                raise InvalidArgumentError(
                    "experiment_id", f"{experiment_id!r} is not a valid experiment id"
                )
            raise NotFoundError(
                f"experiment {experiment_id} does not exist",
                reason=ErrorReason.EXPERIMENT_NOT_FOUND,
            )
        return found

    def _run(self, run_id: str) -> _StoredRun:
        found = self.runs.get(run_id)
        if found is None:
            raise NotFoundError(f"run {run_id!r} not found", reason=ErrorReason.RUN_NOT_FOUND)
        return found

    def _as_run(self, stored: _StoredRun) -> domain.Run:
        latest = {
            key: max(points, key=lambda m: (m.step, m.timestamp_ms, m.value))
            for key, points in stored.history.items()
            if points
        }
        return domain.Run(
            stored.info,
            params=dict(stored.params),
            metrics={
                k: domain.Metric(m.key, m.value, m.timestamp_ms, m.step) for k, m in latest.items()
            },
            tags={k: v for k, v in stored.tags.items() if not k.startswith(_OWN_TAG_PREFIX)},
            dataset_inputs=tuple(stored.dataset_inputs),
            model_inputs=tuple(dict.fromkeys(stored.model_inputs)),
            model_outputs=tuple(stored.model_outputs),
        )

    def _model(self, name: str) -> _StoredModel:
        found = self.models.get(name)
        if found is None:
            raise NotFoundError(
                f"registered model {name!r} not found", reason=ErrorReason.MODEL_NOT_FOUND
            )
        return found

    def _stored_version(self, name: str, version: int) -> _StoredVersion:
        found = self.versions.get((name, version))
        if found is None:
            raise NotFoundError(
                f"version {version} of {name!r} not found",
                reason=ErrorReason.MODEL_VERSION_NOT_FOUND,
            )
        return found

    def _as_version(self, stored: _StoredVersion) -> domain.ModelVersion:
        model = self.models[stored.version.name]
        aliases = tuple(
            sorted(a for a, v in model.model.aliases.items() if v == stored.version.version)
        )
        tags = {k: v for k, v in stored.version.tags.items() if not k.startswith(_OWN_TAG_PREFIX)}
        return replace(stored.version, aliases=aliases, tags=tags)

    def _touch_model(self, name: str, **changes: Any) -> None:
        stored = self._model(name)
        stored.model = replace(stored.model, last_updated_time_ms=now_ms(), **changes)

    # -- reachability -------------------------------------------------------------------

    @_port_call
    def ping(self, *, retry: bool = True) -> None:
        """Nothing to reach: the knobs alone make it fail."""

    # -- experiments --------------------------------------------------------------------

    @_port_call
    def create_experiment(
        self, name: str, *, artifact_location: str, tags: Mapping[str, str], request_id: str
    ) -> str:
        with self._lock:
            for experiment_id, stored in self.experiments.items():
                if stored.request_id == request_id:
                    return experiment_id
            if any(s.experiment.name == name for s in self.experiments.values()):
                raise AlreadyExistsError(f"experiment {name!r} already exists")
            experiment_id = str(next(self._ids) + 1000)
            now = now_ms()
            self.experiments[experiment_id] = _StoredExperiment(
                domain.Experiment(
                    experiment_id,
                    name,
                    artifact_location=artifact_location or f"fake:/{experiment_id}",
                    tags=dict(tags),
                    creation_time_ms=now,
                    last_update_time_ms=now,
                ),
                request_id,
            )
            return experiment_id

    @_port_call
    def get_experiment(self, experiment_id: str) -> domain.Experiment:
        with self._lock:
            return self._experiment(experiment_id).experiment

    @_port_call
    def get_experiment_by_name(self, name: str) -> domain.Experiment:
        with self._lock:
            for stored in self.experiments.values():
                if stored.experiment.name == name:
                    return stored.experiment
        raise NotFoundError(
            f"experiment {name!r} does not exist", reason=ErrorReason.EXPERIMENT_NOT_FOUND
        )

    @_port_call
    def search_experiments(
        self,
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_size: int,
        page_token: str,
        view_type: domain.ViewType,
    ) -> domain.Page[domain.Experiment]:
        _clauses(filter_string)
        with self._lock:
            found = [
                s.experiment
                for s in self.experiments.values()
                if _in_view(s.experiment.lifecycle_stage, view_type)
                and self._matches(filter_string, functools.partial(_named_value, s.experiment))
            ]
        found = sorted(found, key=lambda e: (-e.creation_time_ms, int(e.experiment_id)))
        found = self._ordered(
            found,
            order_by,
            {
                "name": lambda e: e.name,
                "experiment_id": lambda e: int(e.experiment_id),
                "creation_time": lambda e: e.creation_time_ms,
                "last_update_time": lambda e: e.last_update_time_ms,
            },
        )
        return self._page(
            page_tokens.of_query("experiments", filter_string, order_by, view_type.value),
            found,
            page_size,
            page_token,
        )

    @_port_call
    def delete_experiment(self, experiment_id: str) -> None:
        with self._lock:
            stored = self._experiment(experiment_id)
            stored.experiment = replace(
                stored.experiment, lifecycle_stage=domain.LifecycleStage.DELETED
            )
            for run in self.runs.values():
                if run.info.experiment_id == experiment_id:
                    run.info = replace(run.info, lifecycle_stage=domain.LifecycleStage.DELETED)

    @_port_call
    def restore_experiment(self, experiment_id: str) -> domain.Experiment:
        with self._lock:
            stored = self._experiment(experiment_id)
            if stored.experiment.lifecycle_stage is domain.LifecycleStage.DELETED:
                stored.experiment = replace(
                    stored.experiment, lifecycle_stage=domain.LifecycleStage.ACTIVE
                )
                for run in self.runs.values():
                    if run.info.experiment_id == experiment_id:
                        run.info = replace(run.info, lifecycle_stage=domain.LifecycleStage.ACTIVE)
            return stored.experiment

    # -- runs ---------------------------------------------------------------------------

    @_port_call
    def find_or_create_run(
        self,
        experiment_id: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        start_time_ms: int,
        key_tag: str,
        also_tagged: tuple[str, str] | None = None,
    ) -> domain.Run:
        wanted = {(key_tag, tags[key_tag])} | ({also_tagged} if also_tagged else set())
        with self._lock:
            experiment = self._experiment(experiment_id).experiment
            for stored in self.runs.values():
                if stored.info.experiment_id == experiment_id and any(
                    stored.tags.get(tag) == value for tag, value in wanted
                ):
                    return self._as_run(stored)
            run_id = f"{next(self._ids):032x}"
            name = run_name or f"run-{run_id[-6:]}"
            stored = _StoredRun(
                domain.RunInfo(
                    run_id,
                    experiment_id,
                    name,
                    start_time_ms=start_time_ms or now_ms(),
                    artifact_uri=f"{experiment.artifact_location}/{run_id}/artifacts",
                ),
                tags={**tags, "mlflow.runName": name},
            )
            self.runs[run_id] = stored
            return self._as_run(stored)

    @_port_call
    def get_run(self, run_id: str) -> domain.Run:
        with self._lock:
            return self._as_run(self._run(run_id))

    @_port_call
    def search_runs(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        order_by: Sequence[str],
        page_size: int,
        page_token: str,
        view_type: domain.ViewType,
    ) -> domain.Page[domain.Run]:
        _clauses(filter_string)
        with self._lock:
            found = [
                self._as_run(s)
                for s in self.runs.values()
                if s.info.experiment_id in experiment_ids
                and _in_view(s.info.lifecycle_stage, view_type)
                and self._matches(filter_string, functools.partial(_run_value, s))
            ]
        found = sorted(found, key=lambda r: (-r.info.start_time_ms, r.run_id))
        found = self._ordered(
            found,
            order_by,
            {
                "start_time": lambda r: r.info.start_time_ms,
                "attributes.start_time": lambda r: r.info.start_time_ms,
                "run_name": lambda r: r.info.run_name,
                "attributes.run_name": lambda r: r.info.run_name,
            },
        )
        return self._page(
            page_tokens.of_query("runs", experiment_ids, filter_string, order_by, view_type.value),
            found,
            page_size,
            page_token,
        )

    @_port_call
    def delete_run(self, run_id: str) -> None:
        with self._lock:
            stored = self._run(run_id)
            stored.info = replace(stored.info, lifecycle_stage=domain.LifecycleStage.DELETED)

    @_port_call
    def restore_run(self, run_id: str) -> domain.Run:
        with self._lock:
            stored = self._run(run_id)
            stored.info = replace(stored.info, lifecycle_stage=domain.LifecycleStage.ACTIVE)
            return self._as_run(stored)

    @_port_call
    def set_terminated(self, run_id: str, status: domain.RunStatus, end_time_ms: int) -> None:
        with self._lock:
            stored = self._active_run(run_id)
            stored.info = replace(stored.info, status=status, end_time_ms=end_time_ms or now_ms())

    @_port_call
    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        with self._lock:
            stored = self._active_run(run_id)
            stored.info = replace(
                stored.info, status=domain.RunStatus(status), end_time_ms=end_time_ms or now_ms()
            )

    @_port_call
    def set_running(self, run_id: str) -> None:
        with self._lock:
            stored = self._active_run(run_id)
            stored.info = replace(stored.info, status=domain.RunStatus.RUNNING)

    def _active_run(self, run_id: str) -> _StoredRun:
        """The run, refused as MLflow refuses writes to a deleted run."""
        stored = self._run(run_id)
        if stored.info.lifecycle_stage is domain.LifecycleStage.DELETED:
            raise FailedPreconditionError(
                f"run {run_id} is deleted", reason=ErrorReason.RUN_NOT_ACTIVE
            )
        return stored

    @_port_call
    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[domain.Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self._log_batch(run_id, metrics, params or {}, tags or {})

    @_port_call
    def log_metrics(
        self, run_id: str, metrics: Sequence[domain.Metric], *, retry: bool = True
    ) -> None:
        self._log_batch(run_id, metrics, {}, {})

    def _log_batch(
        self,
        run_id: str,
        metrics: Sequence[domain.Metric],
        params: Mapping[str, str],
        tags: Mapping[str, str],
    ) -> None:
        with self._lock:
            stored = self._active_run(run_id)
            for key, value in (params or {}).items():
                if stored.params.get(key, value) != value:
                    raise InvalidArgumentError(
                        "", f"changing param {key!r} of run {run_id} is not allowed"
                    )
            stored.params.update(params or {})
            stored.tags.update(tags or {})
            for m in metrics:
                history = stored.history.setdefault(m.key, [])
                point = domain.Metric(m.key, m.value, m.timestamp_ms, m.step)
                # MLflow's SQL stores drop exact duplicate points.
                if point not in history:
                    history.append(point)

    @_port_call
    def delete_tag(self, run_id: str, key: str) -> None:
        with self._lock:
            stored = self._run(run_id)
            if key not in stored.tags:
                raise NotFoundError(
                    f"no tag {key!r} on run {run_id}", reason=ErrorReason.TAG_NOT_FOUND
                )
            del stored.tags[key]

    @_port_call
    def get_metric_history(
        self, run_id: str, key: str, *, page_size: int, page_token: str
    ) -> domain.Page[domain.Metric]:
        metric_history.check_token(page_token, run_id, key)
        with self._lock:
            history = list(self._run(run_id).history.get(key, []))
        # MLflow hands a history out ordered by timestamp, then step.
        history.sort(key=lambda m: (m.timestamp_ms, m.step))
        return metric_history.page(history, run_id, key, page_size=page_size, page_token=page_token)

    # -- registered models --------------------------------------------------------------

    @_port_call
    def create_registered_model(
        self, name: str, *, description: str, tags: Mapping[str, str], request_id: str
    ) -> domain.RegisteredModel:
        with self._lock:
            existing = self.models.get(name)
            if existing is not None:
                if existing.request_id == request_id:
                    return existing.model
                raise AlreadyExistsError(f"registered model {name!r} already exists")
            now = now_ms()
            self.models[name] = _StoredModel(
                domain.RegisteredModel(
                    name,
                    description=description,
                    creation_time_ms=now,
                    last_updated_time_ms=now,
                    tags=dict(tags),
                ),
                request_id,
            )
            return self.models[name].model

    @_port_call
    def get_registered_model(self, name: str, *, retry: bool = True) -> domain.RegisteredModel:
        with self._lock:
            return self._model(name).model

    @_port_call
    def search_registered_models(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.RegisteredModel]:
        _clauses(filter_string)
        with self._lock:
            found = [
                s.model
                for s in self.models.values()
                if self._matches(filter_string, functools.partial(_named_value, s.model))
            ]
        found = self._ordered(
            sorted(found, key=lambda m: m.name),
            order_by,
            {
                "name": lambda m: m.name,
                "creation_timestamp": lambda m: m.creation_time_ms,
                "last_updated_timestamp": lambda m: m.last_updated_time_ms,
            },
        )
        return self._page(
            page_tokens.of_query("registered-models", filter_string, order_by),
            found,
            page_size,
            page_token,
        )

    @_port_call
    def update_registered_model(self, name: str, description: str) -> domain.RegisteredModel:
        with self._lock:
            self._touch_model(name, description=description)
            return self._model(name).model

    @_port_call
    def rename_registered_model(
        self, name: str, new_name: str, *, request_id: str
    ) -> domain.RegisteredModel:
        with self._lock:
            if name not in self.models:
                renamed = self.models.get(new_name)
                if renamed is not None and renamed.rename_request_id == request_id:
                    return renamed.model
            stored = self._model(name)
            if new_name in self.models:
                raise AlreadyExistsError(f"registered model {new_name!r} already exists")
            del self.models[name]
            stored.rename_request_id = request_id
            stored.model = replace(stored.model, name=new_name, last_updated_time_ms=now_ms())
            self.models[new_name] = stored
            for (model, number), version in list(self.versions.items()):
                if model == name:
                    del self.versions[(model, number)]
                    version.version = replace(version.version, name=new_name)
                    self.versions[(new_name, number)] = version
            return stored.model

    @_port_call
    def delete_registered_model(self, name: str) -> None:
        with self._lock:
            self._model(name)
            del self.models[name]
            for key in [k for k in self.versions if k[0] == name]:
                del self.versions[key]

    @_port_call
    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        with self._lock:
            stored = self._model(name)
            self._touch_model(name, tags={**stored.model.tags, key: value})

    @_port_call
    def delete_registered_model_tag(self, name: str, key: str) -> None:
        with self._lock:
            stored = self._model(name)
            # As MLflow has it: deleting a model's missing tag is done already.
            self._touch_model(name, tags={k: v for k, v in stored.model.tags.items() if k != key})

    # -- model versions -----------------------------------------------------------------

    def resolve_source(self, source: str, run_id: str) -> str:
        check_source_alias(source)
        if source_run_id := runs_source_run_id(source):
            if run_id and run_id != source_run_id:
                raise InvalidArgumentError(
                    "run_id", f"{run_id!r} is not the run of the source {source!r}"
                )
            run_id = source_run_id
        if origin := models_source(source):
            if origin.alias:
                self.get_model_version_by_alias(origin.name, origin.alias)
            else:
                self.get_model_version(origin.name, origin.version)
        if run_id:
            self.get_run(run_id)
        return run_id

    @_port_call
    def create_model_version(
        self,
        name: str,
        *,
        source: str,
        run_id: str,
        description: str,
        tags: Mapping[str, str],
        request_id: str,
    ) -> domain.ModelVersion:
        with self._lock:
            model = self._model(name)
            for stored in self.versions.values():
                if stored.request_id == request_id:
                    if stored.version.name != name:
                        raise request_id_reused("request_id", request_id, "CreateModelVersion")
                    return self._as_version(stored)
            number = model.next_version
            model.next_version += 1
        # Outside the lock: a slow MLflow must not serialize versions of different models.
        now = now_ms()
        pending = self._pending_polls > 0
        stored = _StoredVersion(
            domain.ModelVersion(
                name,
                number,
                source=source,
                run_id=run_id,
                status=domain.ModelVersionStatus.PENDING_REGISTRATION if pending else self._outcome,
                status_message="" if pending else _status_message(self._outcome),
                description=description,
                tags=dict(tags),
                creation_time_ms=now,
                last_updated_time_ms=now,
            ),
            request_id,
            pending_polls=self._pending_polls,
            outcome=self._outcome,
        )
        with self._lock:
            self.versions[(name, number)] = stored
            return self._as_version(stored)

    def wait_until_ready(self, version: domain.ModelVersion) -> domain.ModelVersion:
        return registration.await_ready(version, self.get_model_version)

    @_port_call
    def find_model_version(self, request_id: str) -> domain.ModelVersion | None:
        with self._lock:
            for stored in self.versions.values():
                if stored.request_id == request_id:
                    return self._as_version(stored)
        return None

    @_port_call
    def get_model_version(
        self, name: str, version: int, *, retry: bool = True
    ) -> domain.ModelVersion:
        with self._lock:
            stored = self._stored_version(name, version)
            if stored.version.status is domain.ModelVersionStatus.PENDING_REGISTRATION:
                if stored.pending_polls > 0:
                    stored.pending_polls -= 1
                else:
                    stored.version = replace(
                        stored.version,
                        status=stored.outcome,
                        status_message=_status_message(stored.outcome),
                    )
            return self._as_version(stored)

    @_port_call
    def get_model_version_by_alias(self, name: str, alias: str) -> domain.ModelVersion:
        with self._lock:
            model = self._model(name)
            if alias not in model.model.aliases:
                raise NotFoundError(
                    f"registered model {name!r} has no alias {alias!r}",
                    reason=ErrorReason.ALIAS_NOT_FOUND,
                )
            return self._as_version(self._stored_version(name, model.model.aliases[alias]))

    @_port_call
    def latest_model_version(self, name: str) -> domain.ModelVersion:
        with self._lock:
            self._model(name)
            numbers = [number for (model, number) in self.versions if model == name]
            if not numbers:
                raise NotFoundError(
                    f"registered model {name!r} has no versions",
                    reason=ErrorReason.MODEL_VERSION_NOT_FOUND,
                )
            return self._as_version(self.versions[(name, max(numbers))])

    @_port_call
    def search_model_versions(
        self, *, filter_string: str, order_by: Sequence[str], page_size: int, page_token: str
    ) -> domain.Page[domain.ModelVersion]:
        _clauses(filter_string)
        with self._lock:
            found = [
                self._as_version(s)
                for s in self.versions.values()
                if self._matches(filter_string, functools.partial(_version_value, s.version))
            ]
        found = self._ordered(
            sorted(found, key=lambda v: (v.name, -v.version)),
            order_by,
            {
                "name": lambda v: v.name,
                "version_number": lambda v: v.version,
                "creation_timestamp": lambda v: v.creation_time_ms,
                "last_updated_timestamp": lambda v: v.last_updated_time_ms,
            },
        )
        return self._page(
            page_tokens.of_query("model-versions", filter_string, order_by),
            found,
            page_size,
            page_token,
        )

    @_port_call
    def versions_from(self, name: str, source: str) -> tuple[domain.ModelVersion, ...]:
        with self._lock:
            found = [
                self._as_version(s)
                for (model, _), s in self.versions.items()
                if model == name and s.version.source == source
            ]
        return tuple(sorted(found, key=lambda v: -v.version))

    @_port_call
    def update_model_version(
        self, name: str, version: int, description: str
    ) -> domain.ModelVersion:
        with self._lock:
            stored = self._stored_version(name, version)
            stored.version = replace(
                stored.version, description=description, last_updated_time_ms=now_ms()
            )
            return self._as_version(stored)

    @_port_call
    def delete_model_version(self, name: str, version: int) -> None:
        with self._lock:
            self._stored_version(name, version)
            del self.versions[(name, version)]
            model = self.models[name]
            model.model = replace(
                model.model,
                aliases={a: v for a, v in model.model.aliases.items() if v != version},
            )

    @_port_call
    def set_model_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        with self._lock:
            stored = self._stored_version(name, version)
            stored.version = replace(stored.version, tags={**stored.version.tags, key: value})

    @_port_call
    def model_version_tag(self, name: str, version: int, key: str) -> str | None:
        with self._lock:
            return self._stored_version(name, version).version.tags.get(key)

    @_port_call
    def delete_model_version_tag(self, name: str, version: int, key: str) -> None:
        with self._lock:
            stored = self._stored_version(name, version)
            # As MLflow has it: deleting a version's missing tag is done already.
            stored.version = replace(
                stored.version, tags={k: v for k, v in stored.version.tags.items() if k != key}
            )

    @_port_call
    def set_model_alias(self, name: str, alias: str, version: int) -> None:
        with self._lock:
            self._stored_version(name, version)
            model = self._model(name)
            model.model = replace(model.model, aliases={**model.model.aliases, alias: version})

    @_port_call
    def delete_model_alias(self, name: str, alias: str) -> None:
        with self._lock:
            model = self._model(name)
            if alias not in model.model.aliases:
                raise NotFoundError(
                    f"registered model {name!r} has no alias {alias!r}",
                    reason=ErrorReason.ALIAS_NOT_FOUND,
                )
            model.model = replace(
                model.model,
                aliases={a: v for a, v in model.model.aliases.items() if a != alias},
            )

    # -- artifacts ----------------------------------------------------------------------

    @_port_call
    def log_artifact(self, run_id: str, local_file: Path, artifact_dir: str) -> None:
        data = local_file.read_bytes()
        with self._lock:
            path = f"{artifact_dir}/{local_file.name}" if artifact_dir else local_file.name
            self._run(run_id).files[path] = data

    def start_artifact_upload(
        self, artifact_uri: str, artifact_dir: str, file_name: str, size_bytes: int
    ) -> ArtifactUpload | None:
        return None

    def open_artifact_download(
        self, artifact_uri: str, artifact_path: str, chunk_bytes: int, size_hint: int = 0
    ) -> StreamedDownload | None:
        return None

    @_port_call
    def list_artifacts(self, run_id: str, path: str) -> list[domain.FileInfo]:
        with self._lock:
            files = dict(self._run(run_id).files)
        return _listing(files, path)

    @_port_call
    def download_artifact(self, run_id: str, artifact_path: str, dst_dir: Path) -> Path:
        with self._lock:
            files = dict(self._run(run_id).files)
        destination = dst_dir / artifact_path.rpartition("/")[2]
        return _write_tree(files, artifact_path, destination, f"run {run_id}")

    @_port_call
    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        with self._lock:
            files = self._run(run_id).files
            for stored in [p for p in files if _under(p, artifact_path)]:
                del files[stored]

    def check_storage(self, field: str, uri: str) -> str:
        # Every location is in a configured store here.
        return uri

    @_port_call
    def download_model_version(self, name: str, version: int, dst_dir: Path) -> Path:
        found = self.get_model_version(name, version)
        run_id = runs_source_run_id(found.source) or found.run_id
        path = found.source.partition(f"runs:/{run_id}")[2].strip("/")
        with self._lock:
            files = dict(self._run(run_id).files)
        _write_tree(files, path, dst_dir, f"run {run_id}")
        return dst_dir


class FakeLoggedModels:
    """MLflow 3's logged models behind the `LoggedModelsPort` contract, in the memory of
    a `FakeMlflow` (its experiments, runs, lock and knobs): reach it as
    `FakeMlflow().logged_models`. Its calls are named "logged_models.<method>" in the
    fake's knobs and records (`fake.fail("logged_models.create", ...)`).

    Filters take the fake's clause forms on `name`, `model_id`, `model_type`,
    `source_run_id`, `tags.<key>` and `params.<key>`.
    """

    def __init__(self, fake: FakeMlflow) -> None:
        self.fake = fake
        self.stored: dict[str, _StoredLoggedModel] = {}

    def _stored(self, model_id: str) -> _StoredLoggedModel:
        found = self.stored.get(model_id)
        if found is None:
            raise NotFoundError(
                f"logged model {model_id!r} not found",
                reason=ErrorReason.LOGGED_MODEL_NOT_FOUND,
            )
        return found

    def _active_run(self, run_id: str) -> _StoredRun:
        run = self.fake._run(run_id)
        if run.info.lifecycle_stage is domain.LifecycleStage.DELETED:
            # As MLflow has it: a deleted run takes no more inputs or outputs.
            raise FailedPreconditionError(
                f"run {run_id} must be in the 'active' state",
                reason=ErrorReason.RUN_NOT_ACTIVE,
            )
        return run

    @_port_call
    def create(
        self,
        experiment_id: str,
        *,
        name: str,
        model_type: str,
        source_run_id: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
    ) -> LoggedModel:
        # As MLflow checks a given name; an empty one gets a name made up.
        if name and any(c in name for c in LOGGED_MODEL_NAME_BAD_CHARS):
            raise InvalidArgumentError("", f"{name!r} is not a valid logged model name")
        with self.fake._lock:
            experiment = self.fake._experiment(experiment_id).experiment
            if experiment.lifecycle_stage is domain.LifecycleStage.DELETED:
                # MLflow's "must be in the 'active' state", as the gateway maps it.
                raise FailedPreconditionError(
                    f"experiment {experiment_id} must be in the 'active' state",
                    reason=ErrorReason.EXPERIMENT_NOT_ACTIVE,
                )
            number = next(self.fake._ids)
            model_id = f"m-{number:032x}"
            now = now_ms()
            model = LoggedModel(
                model_id=model_id,
                experiment_id=experiment_id,
                name=name or f"model-{number}",
                artifact_location=f"{experiment.artifact_location}/models/{model_id}/artifacts",
                creation_time_ms=now,
                last_updated_time_ms=now,
                model_type=model_type,
                # As MLflow has it: the source run is not checked.
                source_run_id=source_run_id,
                tags=dict(tags),
                params=dict(params),
            )
            self.stored[model_id] = _StoredLoggedModel(model)
            return model

    @_port_call
    def get(self, model_id: str) -> LoggedModel:
        with self.fake._lock:
            return self._stored(model_id).model

    @_port_call
    def search(
        self,
        experiment_ids: Sequence[str],
        *,
        filter_string: str,
        order_by: Sequence[tuple[str, bool]],
        page_size: int,
        page_token: str,
    ) -> domain.Page[LoggedModel]:
        _clauses(filter_string)
        with self.fake._lock:
            found = [
                s.model
                for s in self.stored.values()
                if s.model.experiment_id in experiment_ids
                and FakeMlflow._matches(
                    filter_string, functools.partial(_logged_model_value, s.model)
                )
            ]
        # MLflow's order: the requested fields, then the newest first, then by id.
        found.sort(key=lambda m: m.model_id)
        if not any(_LOGGED_MODEL_ORDER.get(f) == "creation_timestamp" for f, _ in order_by):
            found.sort(key=lambda m: m.creation_time_ms, reverse=True)
        for index, (field_name, ascending) in reversed(list(enumerate(order_by))):
            column = _LOGGED_MODEL_ORDER.get(field_name)
            if column is None:
                raise InvalidArgumentError(
                    f"order_by[{index}].field_name", f"cannot order by {field_name!r}"
                )
            found.sort(key=functools.partial(_logged_model_column, column), reverse=not ascending)
        return FakeMlflow._page(
            page_tokens.of_query(_LOGGED_MODELS, list(experiment_ids), filter_string, order_by),
            found,
            page_size,
            page_token,
        )

    @_port_call
    def finalize(self, model_id: str, status: LoggedModelStatus) -> LoggedModel:
        with self.fake._lock:
            stored = self._stored(model_id)
            stored.model = replace(stored.model, status=status, last_updated_time_ms=now_ms())
            return stored.model

    @_port_call
    def set_tags(self, model_id: str, tags: Mapping[str, str]) -> None:
        with self.fake._lock:
            stored = self._stored(model_id)
            stored.model = replace(stored.model, tags={**stored.model.tags, **tags})

    @_port_call
    def delete_tag(self, model_id: str, key: str) -> None:
        with self.fake._lock:
            stored = self._stored(model_id)
            if key not in stored.model.tags:
                raise NotFoundError(
                    f"logged model {model_id} has no tag {key!r}",
                    reason=ErrorReason.TAG_NOT_FOUND,
                    field="key",
                )
            stored.model = replace(
                stored.model, tags={k: v for k, v in stored.model.tags.items() if k != key}
            )

    @_port_call
    def log_outputs(self, run_id: str, outputs: Sequence[tuple[str, int]]) -> None:
        with self.fake._lock:
            # As MLflow has it: the run is checked, the model ids are not.
            run = self._active_run(run_id)
            recorded = dict(run.model_outputs)
            for model_id, step in outputs:
                if model_id in recorded and recorded[model_id] != step:
                    raise AlreadyExistsError(
                        f"model {model_id} is an output of run {run_id} already",
                        metadata={"model_id": model_id, "step": str(recorded[model_id])},
                    )
            run.model_outputs.extend((m, s) for m, s in outputs if m not in recorded)

    @_port_call
    def log_inputs(
        self, run_id: str, datasets: Sequence[DatasetUse], model_ids: Sequence[str]
    ) -> None:
        with self.fake._lock:
            run = self._active_run(run_id)
            run.dataset_inputs.extend(datasets)
            run.model_inputs.extend(model_ids)

    # -- files ----------------------------------------------------------------------------

    @_port_call
    def artifact_location(self, model_id: str) -> str:
        return self.get(model_id).artifact_location

    @_port_call
    def log_artifact(self, model_id: str, local_file: Path, artifact_dir: str) -> None:
        data = local_file.read_bytes()
        with self.fake._lock:
            path = f"{artifact_dir}/{local_file.name}" if artifact_dir else local_file.name
            self._stored(model_id).files[path] = data

    @_port_call
    def list_artifacts(self, model_id: str, path: str) -> list[domain.FileInfo]:
        with self.fake._lock:
            files = dict(self._stored(model_id).files)
        return _listing(files, path)

    @_port_call
    def download_artifact(self, model_id: str, artifact_path: str, dst_dir: Path) -> Path:
        with self.fake._lock:
            files = dict(self._stored(model_id).files)
        # As MLflow's artifact repositories have it: the file keeps its path under dst_dir.
        destination = dst_dir / artifact_path.strip("/")
        return _write_tree(files, artifact_path, destination, f"logged model {model_id}")


def _clauses(filter_string: str) -> list[tuple[str, str, str]]:
    """(attribute, operator, value) of each clause of a filter; INVALID_ARGUMENT on `filter`
    for one the fake cannot read."""
    if not filter_string.strip():
        return []
    clauses = []
    for clause in re.split(r"\s+and\s+", filter_string.strip(), flags=re.IGNORECASE):
        match = _CLAUSE.match(clause)
        if match is None:
            raise InvalidArgumentError("filter", f"cannot read the filter {filter_string!r}")
        clauses.append((match["attr"].replace("`", ""), match["op"].upper(), match["value"]))
    return clauses


def _like(pattern: str) -> re.Pattern[str]:
    """SQL LIKE (case-sensitive, as MLflow's SQL stores treat names): % any run, _ one."""
    return re.compile(
        "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    )


def _status_message(status: domain.ModelVersionStatus) -> str:
    failed = status is domain.ModelVersionStatus.FAILED_REGISTRATION
    return "copying the model failed" if failed else ""


def _in_view(stage: domain.LifecycleStage, view: domain.ViewType) -> bool:
    if view is domain.ViewType.ALL:
        return True
    deleted = stage is domain.LifecycleStage.DELETED
    return deleted if view is domain.ViewType.DELETED_ONLY else not deleted


def _named_value(entity: domain.Experiment | domain.RegisteredModel, attr: str) -> str | None:
    if attr.startswith("tags."):
        return entity.tags.get(attr.removeprefix("tags."))
    if attr == "name":
        return entity.name
    raise InvalidArgumentError("filter", f"cannot filter by {attr!r}")


def _run_value(stored: _StoredRun, attr: str) -> str | None:
    if attr.startswith("tags."):
        return stored.tags.get(attr.removeprefix("tags."))
    if attr.startswith("params."):
        return stored.params.get(attr.removeprefix("params."))
    if attr in ("run_name", "attributes.run_name"):
        return stored.info.run_name
    if attr in ("run_id", "attributes.run_id"):
        return stored.info.run_id
    raise InvalidArgumentError("filter", f"cannot filter runs by {attr!r}")


def _logged_model_value(model: LoggedModel, attr: str) -> str | None:
    if attr.startswith("tags."):
        return model.tags.get(attr.removeprefix("tags."))
    if attr.startswith("params."):
        return model.params.get(attr.removeprefix("params."))
    if attr in ("name", "model_id", "model_type", "source_run_id"):
        return str(getattr(model, attr))
    raise InvalidArgumentError("filter", f"cannot filter logged models by {attr!r}")


def _logged_model_column(column: str, model: LoggedModel) -> Any:
    if column == "creation_timestamp":
        return model.creation_time_ms
    if column == "last_updated_timestamp":
        return model.last_updated_time_ms
    return getattr(model, column)


def _version_value(version: domain.ModelVersion, attr: str) -> str | None:
    if attr.startswith("tags."):
        return version.tags.get(attr.removeprefix("tags."))
    if attr in ("name", "run_id", "source"):
        return str(getattr(version, attr))
    raise InvalidArgumentError("filter", f"cannot filter model versions by {attr!r}")


def _listing(files: Mapping[str, bytes], path: str) -> list[domain.FileInfo]:
    """The files and directories directly under `path` (empty: the root), in path order."""
    prefix = f"{path.rstrip('/')}/" if path else ""
    entries: dict[str, domain.FileInfo] = {}
    for stored, data in files.items():
        if not stored.startswith(prefix):
            continue
        head, slash, _ = stored[len(prefix) :].partition("/")
        child = prefix + head
        entries[child] = (
            domain.FileInfo(child, is_dir=True)
            if slash
            else domain.FileInfo(child, size_bytes=len(data))
        )
    return sorted(entries.values(), key=lambda e: e.path)


def _under(stored: str, path: str) -> bool:
    path = path.strip("/")
    return not path or stored == path or stored.startswith(f"{path}/")


def _write_tree(files: Mapping[str, bytes], path: str, destination: Path, owner: str) -> Path:
    """Write the file `path`, or every file under the directory `path`, to `destination`."""
    path = path.strip("/")
    if path in files:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_bytes(files[path])
        return destination
    chosen = {p: data for p, data in files.items() if _under(p, path)}
    if not chosen:
        raise NotFoundError(
            f"{owner} has no artifact {path!r}", reason=ErrorReason.ARTIFACT_NOT_FOUND
        )
    for stored, data in chosen.items():
        target = destination / stored[len(path) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return destination


# The fake is a complete MlflowPort, and its logged models a LoggedModelsPort; mypy checks
# it here.
_: type[MlflowPort] = FakeMlflow
_logged: type[LoggedModelsPort] = FakeLoggedModels
