"""The sidecar's page tokens: what MLflow hands out is wrapped, what comes back is checked."""

from __future__ import annotations

import base64
import json

import pytest

from mlflow_sidecar.core.errors import InternalError, InvalidArgumentError
from mlflow_sidecar.server.mlflow_gateway import page_tokens


def _b64(value: object, *, urlsafe: bool = True) -> str:
    raw = json.dumps(value).encode()
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()


def _mlflow_offset(token: str | None) -> int:
    assert token is not None
    return int(json.loads(base64.b64decode(token))["offset"])


def test_a_token_round_trips_to_mlflow_offset():
    ours = page_tokens.from_mlflow("runs", base64.b64encode(b'{"offset": 200}'))
    assert _mlflow_offset(page_tokens.to_mlflow("runs", ours)) == 200
    assert page_tokens.to_mlflow("runs", "") is None
    assert page_tokens.from_mlflow("runs", None) == ""


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!",
        _b64({"offset": 5}),  # MLflow's own form, not ours
        _b64({"kind": "experiments", "offset": 5}),  # another list's
        _b64({"kind": "runs", "offset": 1e20}),
        _b64({"kind": "runs", "offset": 10**20}),
        _b64({"kind": "runs", "offset": -1}),
        _b64({"kind": "runs", "offset": 0}),
        _b64({"kind": "runs", "offset": "5"}),
        _b64({"kind": "runs", "offset": True}),
        _b64({"kind": "runs"}),
        _b64(["runs", 5]),
        _b64("runs"),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"[" * 100_000).decode(),
    ],
)
def test_tampered_tokens_are_refused_on_page_token(token):
    with pytest.raises(InvalidArgumentError) as err:
        page_tokens.to_mlflow("runs", token)
    assert (err.value.field, err.value.reason) == ("page_token", "INVALID_PAGE_TOKEN")


@pytest.mark.parametrize("mlflow_token", ["garbage", _b64({"offset": -3}, urlsafe=False), "e30="])
def test_an_unknown_mlflow_token_is_internal(mlflow_token):
    with pytest.raises(InternalError):
        page_tokens.from_mlflow("runs", mlflow_token)


def test_the_services_own_token_checks_give_the_same_reason():
    from mlflow_sidecar.server import validation
    from mlflow_sidecar.server.services.artifacts import decode_listing_token

    for refuse in (
        lambda: validation.page_token("not base64!"),
        lambda: decode_listing_token(_b64({"owner": "r", "path": "x", "after": "a"}), "r", "y"),
    ):
        with pytest.raises(InvalidArgumentError) as err:
            refuse()
        assert (err.value.field, err.value.reason) == ("page_token", "INVALID_PAGE_TOKEN")
