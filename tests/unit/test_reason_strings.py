"""Error reasons read as their plain values on every supported Python (3.10 has no
`enum.StrEnum`; log lines, f-strings and comparisons must not change there)."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.errors import ClientErrorReason, ErrorReason


@pytest.mark.parametrize("reason", [ErrorReason.RUN_NOT_FOUND, ClientErrorReason.CLIENT_CLOSED])
def test_a_reason_is_its_value_as_text(reason: ErrorReason | ClientErrorReason) -> None:
    assert str(reason) == reason.value
    assert f"{reason}" == reason.value
    assert f"{reason:>20}" == reason.value.rjust(20)
    assert reason == reason.value
    assert ErrorReason(ErrorReason.RUN_NOT_FOUND.value) is ErrorReason.RUN_NOT_FOUND
