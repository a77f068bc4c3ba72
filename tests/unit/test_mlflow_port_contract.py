"""The MlflowPort contract, held against the in-memory fake the unit tests use.

The same tests run against MLflow itself in tests/integration/test_mlflow_port_contract.py."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.domain import RunStatus
from mlflow_sidecar.core.errors import UnavailableError
from tests.contract.mlflow_port import MlflowPortContract
from tests.fakes.mlflow_port import FakeMlflow


class TestFakeMlflow(MlflowPortContract):
    @pytest.fixture()
    def port(self) -> FakeMlflow:
        return FakeMlflow()


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
