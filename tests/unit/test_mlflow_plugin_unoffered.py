"""Every store method MLflow has is either implemented by the `sidecar://` stores or raises
MlflowException NOT_IMPLEMENTED naming it: none escapes as NotImplementedError,
AttributeError or a silently dropped call, whatever methods the installed MLflow adds."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.abstract_store import AbstractStore as MlflowRegistryStore
from mlflow.store.model_registry.rest_store import RestStore as MlflowRestRegistryStore
from mlflow.store.tracking.abstract_store import AbstractStore as MlflowTrackingStore
from mlflow.store.tracking.rest_store import RestStore as MlflowRestTrackingStore

from mlflow_sidecar.mlflow_plugin.errors import UNOFFERED_MARK
from mlflow_sidecar.mlflow_plugin.registry_store import SidecarRegistryStore
from mlflow_sidecar.mlflow_plugin.tracking_store import SidecarTrackingStore

# MLflow's own implementations the stores run as they are: each is built on methods the
# store implements (or refuses), and was read to be so. A method MLflow adds that is
# neither implemented by the store nor refused by it fails this test until it is
# implemented, refused, or read and added here.
MLFLOWS_OWN = {
    SidecarTrackingStore: {
        "_evenly_spaced_indices",  # arithmetic
        "search_runs",  # on _search_runs
        "filter_active_experiment_ids",  # on get_experiment
        "get_metric_history_bulk_interval",  # on get_metric_history
        "get_metric_history_bulk_interval_from_steps",  # on get_metric_history
        "set_model_versions_tags",  # on get_logged_model and set_logged_model_tags
        "resolve_trace_archival_config",  # a value; archiving traces is refused
        "supports_workspaces",  # answers False
        "delete_traces",  # checks its arguments, then on _delete_traces (refused)
        "list_scorers_across_experiments",  # on list_scorers (refused)
        "log_spans_async",  # on log_spans (refused)
    },
    SidecarRegistryStore: {
        "_parse_experiment_id_filter",  # string handling
        "_await_model_version_creation",  # on get_model_version
        "_await_model_version_creation_impl",
        "supports_workspaces",  # answers False
        # Prompts: registered models and versions with MLflow's prompt tags.
        "create_prompt",
        "create_prompt_version",
        "delete_prompt",
        "delete_prompt_alias",
        "delete_prompt_tag",
        "delete_prompt_version",
        "delete_prompt_version_tag",
        "get_prompt",
        "get_prompt_version",
        "get_prompt_version_by_alias",
        "search_prompt_versions",
        "search_prompts",
        "set_prompt_alias",
        "set_prompt_tag",
        "set_prompt_version_tag",
        "link_prompt_version_to_model",
        "link_prompt_version_to_run",
        "link_prompts_to_trace",  # on the tracing store's get_trace_info (refused)
    },
}

STORES = [
    (SidecarTrackingStore, MlflowTrackingStore, MlflowRestTrackingStore),
    (SidecarRegistryStore, MlflowRegistryStore, MlflowRestRegistryStore),
]


def _methods(mlflow_store: type, *, private: bool) -> list[str]:
    return sorted(
        name
        for name in dir(mlflow_store)
        if not name.startswith("__")
        and (private or not name.startswith("_"))
        and inspect.isfunction(inspect.getattr_static(mlflow_store, name))
    )


def _call_with_placeholders(method: Any) -> Any:
    """Call `method` with None for each argument it requires."""
    signature = inspect.signature(method)
    args, kwargs = [], {}
    for parameter in signature.parameters.values():
        if parameter.default is not inspect.Parameter.empty:
            continue
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            kwargs[parameter.name] = None
        elif parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            args.append(None)
    outcome = method(*args, **kwargs)
    if inspect.isawaitable(outcome):
        return asyncio.run(outcome)  # type: ignore[arg-type]
    return outcome


@pytest.mark.parametrize(("store", "abstract", "rest"), STORES, ids=["tracking", "registry"])
def test_each_store_method_of_mlflow_is_implemented_or_not_implemented_by_name(
    store: type, abstract: type, rest: type
) -> None:
    # No connection: a method that reaches for the sidecar fails here, which only a
    # method that should be refused would do.
    instance = object.__new__(store)
    names = set(_methods(abstract, private=True)) | set(_methods(rest, private=False))
    assert {"search_traces", "create_dataset"} <= names or store is SidecarRegistryStore
    unexplained: dict[str, str] = {}
    for name in sorted(names):
        defined = store.__dict__.get(name)
        if defined is None:
            unexplained[name] = "missing"
            continue
        if not getattr(defined, UNOFFERED_MARK, False):
            continue  # implemented by the store (or refused by it in its own words)
        if name in MLFLOWS_OWN[store]:
            continue
        try:
            _call_with_placeholders(getattr(instance, name))
        except MlflowException as exc:
            if exc.error_code == "NOT_IMPLEMENTED" and f"`{name}`" in exc.message:
                continue
            unexplained[name] = f"{exc.error_code}: {exc.message[:120]}"
        except Exception as exc:  # what escapes is the finding
            unexplained[name] = f"{type(exc).__name__}: {exc}"
        else:
            unexplained[name] = "returned"
    assert unexplained == {}


def test_what_the_readme_names_is_refused_as_not_implemented() -> None:
    tracking = object.__new__(SidecarTrackingStore)
    for call in (
        lambda: tracking.log_logged_model_params("m-1", []),  # type: ignore[attr-defined]
        tracking.search_traces,
        lambda: tracking.get_trace("tr-1"),
        lambda: tracking.create_dataset("d"),
        lambda: tracking.link_traces_to_run(["tr-1"], "r"),  # abstract, with an empty body
    ):
        with pytest.raises(MlflowException) as refused:
            call()
        assert refused.value.error_code == "NOT_IMPLEMENTED"
        assert "not supported through the sidecar" in refused.value.message
    with pytest.raises(MlflowException) as webhook:
        object.__new__(SidecarRegistryStore).list_webhooks()
    assert webhook.value.error_code == "NOT_IMPLEMENTED"
    assert "`list_webhooks`" in webhook.value.message
