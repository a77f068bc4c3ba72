"""The README's Limits table states the figures `core.limits` enforces: each row names its
constant and shows its value."""

from __future__ import annotations

import re
from pathlib import Path

from mlflow_sidecar.core import limits

README = Path(__file__).resolve().parents[2] / "README.md"


def limits_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Limits\n")
    return text[start : text.index("\n## ", start + 1)]


def test_every_figure_in_the_limits_table_is_the_constant_it_names() -> None:
    named = re.findall(r"(\d+)(?: bytes)? \(`(MAX_[A-Z_]+)`", limits_section())
    assert len(named) >= 15
    for figure, constant in named:
        assert getattr(limits, constant) == int(figure), constant


def test_every_request_limit_is_in_the_table() -> None:
    section = limits_section()
    stated = {
        "MAX_KEY_LENGTH",
        "MAX_PARAM_VALUE_LENGTH",
        "MAX_TAG_VALUE_LENGTH",
        "MAX_EXPERIMENT_TAG_VALUE_LENGTH",
        "MAX_REGISTERED_MODEL_TAG_VALUE_LENGTH",
        "MAX_MODEL_VERSION_TAG_VALUE_LENGTH",
        "MAX_NAME_LENGTH",
        "MAX_MODEL_TYPE_LENGTH",
        "MAX_RUN_USER_LENGTH",
        "MAX_ALIAS_LENGTH",
        "MAX_DESCRIPTION_LENGTH",
        "MAX_CREATED_NAME_LENGTH",
        "MAX_ARTIFACT_LOCATION_LENGTH",
        "MAX_SOURCE_LENGTH",
        "MAX_FILTER_LENGTH",
        "MAX_ORDER_BY_TERMS",
        "MAX_SEARCH_JOINS",
        "MAX_ORDER_BY_LENGTH",
        "MAX_ID_LENGTH",
        "MAX_REQUEST_ID_LENGTH",
        "MAX_PAGE_TOKEN_LENGTH",
        "MAX_PAGE_SIZE",
        "MAX_METRIC_PAGE_SIZE",
        "MAX_PATH_BYTES",
        "MAX_SEGMENT_BYTES",
        "MAX_WATCH_ALIASES",
        "MAX_PARAMS_TAGS_PER_BATCH",
        "MAX_METRICS_PER_BATCH",
    }
    for constant in stated:
        assert f"`{constant}`" in section, constant


def test_the_smallest_download_chunk_asked_for_is_the_constant_the_table_names() -> None:
    assert f"{limits.MIN_REQUESTED_CHUNK_BYTES} (`MIN_REQUESTED_CHUNK_BYTES`)" in limits_section()
