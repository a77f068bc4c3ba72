"""The trainer's whole flow through `ClientContainer().experiment_tracking()`."""

from __future__ import annotations

import pytest

from mlflow_sidecar.client import ClientContainer, Metric, RunStatus
from mlflow_sidecar.core.errors import FailedPreconditionError, NotFoundError


def test_trainer_sequence_through_the_container(sidecar, unique):
    container = ClientContainer()
    container.config.from_dict({"target": sidecar.target})
    tracking = container.experiment_tracking()
    try:
        exp = tracking.create_experiment(
            f"trainer-{unique}", tags={"desk": "fx"}, get_if_exists=True
        )
        assert tracking.create_experiment(f"trainer-{unique}", get_if_exists=True) == exp
        run = tracking.start_run(exp.experiment_id, run_name="ppo-1", tags={"algo": "ppo"})
        tracking.log_params(run.run_id, {"lr": "0.0003", "gamma": "0.99"})
        accepted = tracking.log_metrics(
            run.run_id, [Metric("reward", float(step), step=step) for step in range(50)]
        )
        assert accepted == 50
        fetched = tracking.get_run(run.run_id)
        assert fetched.params == {"lr": "0.0003", "gamma": "0.99"}
        assert fetched.metrics["reward"].value == 49.0
        assert fetched.tags["algo"] == "ppo"
        ended = tracking.end_run(run.run_id, RunStatus.FINISHED)
        assert ended.info.status is RunStatus.FINISHED
        found = tracking.search_runs([exp.experiment_id], filter_string="params.lr = '0.0003'")
        assert [r.run_id for r in found.items] == [run.run_id]
        assert (
            tracking.get_experiment_by_name(f"trainer-{unique}").experiment_id == exp.experiment_id
        )

        with pytest.raises(FailedPreconditionError):
            tracking.log_params(run.run_id, {"lr": "1"})
        with pytest.raises(NotFoundError):
            tracking.get_run("f" * 32)
    finally:
        container.shutdown_resources()
