"""The MlflowPort and LoggedModelsPort contracts, held against the in-memory fake the unit
tests use.

The same tests run against MLflow itself in tests/integration/test_mlflow_port_contract.py."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.domain import RunStatus
from mlflow_sidecar.core.errors import UnavailableError
from tests.contract.logged_models_port import LoggedModelsPortContract
from tests.contract.mlflow_port import MlflowPortContract
from tests.fakes.mlflow_port import FakeLoggedModels, FakeMlflow


class TestFakeMlflow(MlflowPortContract):
    @pytest.fixture()
    def port(self) -> FakeMlflow:
        return FakeMlflow()


class TestFakeLoggedModels(LoggedModelsPortContract):
    @pytest.fixture()
    def port(self) -> FakeMlflow:
        return FakeMlflow()

    @pytest.fixture()
    def models(self, port: FakeMlflow) -> FakeLoggedModels:
        return port.logged_models


def test_the_fakes_fault_knobs_do_what_they_say():
    fake = FakeMlflow()
    run_id = fake.new_run()
    fake.outage()
    with pytest.raises(UnavailableError):
        fake.get_run(run_id)
    fake.recover()
    # A lost answer: the call takes effect, then fails.
    fake.fail("set_terminated", UnavailableError("lost"), after_effect=True)
    with pytest.raises(UnavailableError):
        fake.set_terminated(run_id, RunStatus.FAILED, 1)
    assert fake.get_run(run_id).info.status is RunStatus.FAILED
    # Failing before the effect, twice, then working again.
    fake.fail("log_batch", UnavailableError("down"), times=2)
    for _ in range(2):
        with pytest.raises(UnavailableError):
            fake.log_batch(run_id, params={"a": "1"})
    assert fake.get_run(run_id).params == {}
    fake.log_batch(run_id, params={"a": "1"})
    assert fake.get_run(run_id).params == {"a": "1"}
    assert fake.calls["log_batch"] == 3
    assert [e["params"] for e in fake.effects("log_batch")] == [{"a": "1"}]


def test_the_logged_models_calls_have_names_of_their_own_in_the_knobs():
    fake = FakeMlflow()
    run_id = fake.new_run()
    experiment_id = fake.get_run(run_id).info.experiment_id
    models = fake.logged_models
    model = models.create(
        experiment_id, name="", model_type="", source_run_id="", params={}, tags={"k": "v"}
    )
    fake.fail("logged_models.delete_tag", UnavailableError("down"))
    with pytest.raises(UnavailableError):
        models.delete_tag(model.model_id, "k")
    models.delete_tag(model.model_id, "k")
    assert fake.calls["logged_models.delete_tag"] == 2
    assert fake.calls["delete_tag"] == 0
    models.log_outputs(run_id, [(model.model_id, 1)])
    assert fake.runs[run_id].model_outputs == [(model.model_id, 1)]
    assert fake.effects("logged_models.log_outputs") == [
        {"run_id": run_id, "outputs": [(model.model_id, 1)]}
    ]
