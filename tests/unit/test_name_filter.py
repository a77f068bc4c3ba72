"""Model name filters MLflow's parser takes, for every name MLflow accepts."""

from __future__ import annotations

import fnmatch

import pytest
from mlflow.utils.search_utils import SearchModelVersionUtils

from mlflow_sidecar.server.mlflow_gateway.sources import name_filter


@pytest.mark.parametrize("name", ["plain", "it's", 'say "hi"', 'it\'s "v2"', 'a\\b\'s "c%_"'])
def test_name_filter_parses_and_matches_the_name(name: str) -> None:
    (clause,) = SearchModelVersionUtils.parse_search_filter(name_filter(name))
    assert clause["key"] == "name"
    if clause["comparator"] == "=":
        assert clause["value"] == name
    else:
        assert clause["comparator"] == "LIKE"
        pattern = clause["value"].replace("%", "*").replace("_", "?")
        assert fnmatch.fnmatchcase(name, pattern)
