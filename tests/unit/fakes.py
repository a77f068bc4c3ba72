"""Fakes of our own interfaces, for unit tests only."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace

from mlflow_sidecar.core import domain
from mlflow_sidecar.core.errors import AlreadyExistsError, NotFoundError, SidecarError
from mlflow_sidecar.server.idempotency import REQUEST_ID_TAG


class FakeGateway:
    """An in-memory stand-in for MlflowGateway's tracking methods."""

    def __init__(self) -> None:
        self.experiments: dict[str, domain.Experiment] = {}
        self.runs: dict[str, domain.Run] = {}
        self.batches: list[tuple[str, int, int, int]] = []  # run, metrics, params, tags
        self.metrics: dict[str, list[domain.Metric]] = {}
        self.creates = 0
        self.fail_next: SidecarError | None = None
        self.deliveries_open = threading.Event()
        self.deliveries_open.set()
        self._ids = itertools.count(1)

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def create_experiment(
        self, name: str, *, artifact_location: str, tags: Mapping[str, str], request_id: str
    ) -> str:
        self._maybe_fail()
        for experiment_id, found in self.experiments.items():
            if found.tags.get(REQUEST_ID_TAG) == request_id:
                return experiment_id
        if any(e.name == name for e in self.experiments.values()):
            raise AlreadyExistsError(f"experiment {name!r} exists")
        experiment_id = str(next(self._ids))
        all_tags = {**tags, REQUEST_ID_TAG: request_id}
        self.experiments[experiment_id] = domain.Experiment(experiment_id, name, tags=all_tags)
        return experiment_id

    def get_experiment(self, experiment_id: str) -> domain.Experiment:
        if experiment_id not in self.experiments:
            raise NotFoundError(f"no experiment {experiment_id}")
        return self.experiments[experiment_id]

    def get_experiment_by_name(self, name: str) -> domain.Experiment:
        for exp in self.experiments.values():
            if exp.name == name:
                return exp
        raise NotFoundError(f"no experiment {name!r}")

    def delete_experiment(self, experiment_id: str) -> None:
        exp = self.get_experiment(experiment_id)
        self.experiments[experiment_id] = replace(
            exp, lifecycle_stage=domain.LifecycleStage.DELETED
        )

    def restore_experiment(self, experiment_id: str) -> domain.Experiment:
        exp = self.get_experiment(experiment_id)
        self.experiments[experiment_id] = replace(exp, lifecycle_stage=domain.LifecycleStage.ACTIVE)
        return self.experiments[experiment_id]

    def delete_run(self, run_id: str) -> None:
        run = self.get_run(run_id)
        info = replace(run.info, lifecycle_stage=domain.LifecycleStage.DELETED)
        self.runs[run_id] = replace(run, info=info)

    def restore_run(self, run_id: str) -> domain.Run:
        run = self.get_run(run_id)
        info = replace(run.info, lifecycle_stage=domain.LifecycleStage.ACTIVE)
        self.runs[run_id] = replace(run, info=info)
        return self.runs[run_id]

    def create_run(self, experiment_id, *, run_name, tags, start_time_ms) -> domain.Run:
        self.creates += 1
        run_id = f"run{next(self._ids)}"
        run = domain.Run(domain.RunInfo(run_id, experiment_id, run_name), tags=dict(tags))
        self.runs[run_id] = run
        return run

    def find_or_create_run(
        self, experiment_id, *, run_name, tags, start_time_ms, key_tag
    ) -> domain.Run:
        for run in self.runs.values():
            if run.tags.get(key_tag) == tags[key_tag]:
                return run
        run = self.create_run(
            experiment_id, run_name=run_name, tags=tags, start_time_ms=start_time_ms
        )
        # A lost answer: the run exists, but the caller sees a failure.
        self._maybe_fail()
        return run

    def get_run(self, run_id: str) -> domain.Run:
        if run_id not in self.runs:
            raise NotFoundError(f"no run {run_id}")
        return self.runs[run_id]

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[domain.Metric] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        run = self.get_run(run_id)
        self.batches.append((run_id, len(metrics), len(params or {}), len(tags or {})))
        self.metrics.setdefault(run_id, []).extend(metrics)
        self.runs[run_id] = domain.Run(
            run.info,
            params={**run.params, **(params or {})},
            metrics=run.metrics,
            tags={**run.tags, **(tags or {})},
        )

    def log_metrics(self, run_id: str, metrics: Sequence[domain.Metric]) -> None:
        # Delivery from the spool waits while a test holds it back.
        assert self.deliveries_open.wait(30), "deliveries held back too long"
        self.log_batch(run_id, metrics=metrics)

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        self.set_terminated(run_id, domain.RunStatus(status), end_time_ms)

    def set_terminated(self, run_id: str, status: domain.RunStatus, end_time_ms: int) -> None:
        run = self.get_run(run_id)
        info = domain.RunInfo(
            run.info.run_id,
            run.info.experiment_id,
            run.info.run_name,
            status,
            end_time_ms=end_time_ms,
        )
        self.runs[run_id] = domain.Run(info, run.params, run.metrics, run.tags)
