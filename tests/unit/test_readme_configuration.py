"""The README's configuration table renders as one table, with a row for every setting."""

from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt
from pydantic import BaseModel

from mlflow_sidecar.server.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def table_cells() -> list[list[list[str]]]:
    """Every table of the README as it renders: rows of cell texts, the header first."""
    tokens = MarkdownIt("commonmark").enable("table").parse(ROOT.joinpath("README.md").read_text())
    found: list[list[list[str]]] = []
    inside = False
    for token in tokens:
        if token.type == "table_open":
            found.append([])
            inside = True
        elif token.type == "table_close":
            inside = False
        elif inside and token.type == "tr_open":
            found[-1].append([])
        elif inside and token.type == "inline":
            found[-1][-1].append(token.content)
    return found


def settings(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf setting of the configuration, dotted as the README names them."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings(annotation, f"{prefix}{name}.")
        else:
            names.add(f"{prefix}{name}")
    return names


def documented_keys(first_cell: str) -> set[str]:
    """`section.a` / `b` / `c` names section.a, section.b and section.c."""
    names = re.findall(r"`([\w.]+)`", first_cell)
    section = names[0].rpartition(".")[0] if names else ""
    return {name if "." in name or not section else f"{section}.{name}" for name in names}


def test_the_configuration_table_is_one_table_with_every_setting():
    (table,) = [rows for rows in table_cells() if rows and rows[0] == ["key", "default", "meaning"]]
    assert all(len(row) == 3 for row in table), "a row that does not render as one"
    documented: set[str] = set()
    for row in table[1:]:
        documented |= documented_keys(row[0])
    assert documented == settings(AppConfig)
