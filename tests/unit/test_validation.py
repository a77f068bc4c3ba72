"""The shared request checks: keys as MLflow takes them, and nothing it would refuse later."""

from __future__ import annotations

import pytest

from mlflow_sidecar.core.errors import InvalidArgumentError
from mlflow_sidecar.server import validation


@pytest.mark.parametrize(
    "key",
    [
        "loss\n",  # a trailing newline: the spool would store a key it cannot read back
        "loss\nreward",
        "a//b",  # MLflow refuses these paths, which another spelling would name too
        "a/./b",
        "a/",
        "./a",
        "a/.",
        ".",
        "/a",
        "../a",
        "a/../b",
        "bad@key",
        "",
    ],
)
def test_keys_mlflow_would_refuse_are_refused_here(key):
    with pytest.raises(InvalidArgumentError) as err:
        validation.key("metrics[0].key", key)
    assert err.value.field == "metrics[0].key"


@pytest.mark.parametrize("key", ["loss", "eval/reward", "a.b", "a..b", "x-y z:1", "ünïcode"])
def test_keys_mlflow_takes_pass(key):
    assert validation.key("key", key) == key


@pytest.mark.parametrize("request_id", ["abc\n", "abc\ndef"])
def test_a_trailing_newline_makes_no_identifier_valid(request_id):
    from mlflow_sidecar.server.idempotency import check_request_id

    with pytest.raises(InvalidArgumentError):
        check_request_id("request_id", request_id)
    with pytest.raises(InvalidArgumentError):
        validation.page_token("YWJj\n")


@pytest.mark.parametrize(
    ("value", "problem"), [("", "must not be empty"), ("  ", "only whitespace")]
)
def test_an_empty_or_blank_key_says_which(value, problem):
    with pytest.raises(InvalidArgumentError) as err:
        validation.tag_key("tags.key", value)
    assert err.value.field == "tags.key"
    assert problem in err.value.message
