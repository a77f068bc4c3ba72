"""The README's configuration table renders as one table, with a row for every setting."""

from __future__ import annotations

import os
import re
from pathlib import Path

from markdown_it import MarkdownIt
from pydantic import BaseModel, SecretStr

from mlflow_sidecar.server.config import AppConfig, load_config

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


UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# No fixed default: each follows other settings, by a rule the table states before the
# value it makes of their defaults, in brackets ("`0`: half of `server.workers` (32)").
DERIVED = {"server.max_streaming_rpcs", "server.max_waiting_streams", "spool.drain_on_stop_s"}


def documented_value(key: str, text: str) -> object:
    """A default as the table writes it (`8 MiB`, `true`, empty), as the config holds it."""
    if key in DERIVED:
        found = re.search(r"\(`?([\d.]+)`?\)", text)
        assert found, f"{key}: no value in brackets in {text!r}"
        return float(found.group(1))
    text = text.strip("`")
    if text == "empty":
        return None
    if text in ("true", "false"):
        return text == "true"
    number, _, unit = text.partition(" ")
    if unit in UNITS:
        return float(int(number) * UNITS[unit])
    if text.startswith("~/"):
        return str(Path(text).expanduser())
    try:
        return float(text)
    except ValueError:
        return text


def loaded_value(config: BaseModel, key: str) -> object:
    """A setting of the loaded config, written as `documented_value` reads the table."""
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value in ("", [], None):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def documented_defaults() -> dict[str, object]:
    """Each setting's default as the table gives it; a row of several settings gives one
    default for all (`empty`) or one each (`0` / `127.0.0.1`)."""
    (table,) = [rows for rows in table_cells() if rows and rows[0] == ["key", "default", "meaning"]]
    defaults: dict[str, object] = {}
    for key_cell, default_cell, _ in table[1:]:
        names = re.findall(r"`([\w.]+)`", key_cell)
        section = names[0].rpartition(".")[0]
        keys = [name if "." in name or not section else f"{section}.{name}" for name in names]
        texts = default_cell.split(" / ")
        if len(texts) == 1:
            texts *= len(keys)
        assert len(texts) == len(keys), f"{key_cell}: {len(keys)} keys, defaults {default_cell}"
        for key, text in zip(keys, texts, strict=True):
            defaults[key] = documented_value(key, text)
    return defaults


def test_the_configuration_tables_defaults_are_the_configs(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("MLFLOW"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no config file of the working directory either
    config = load_config()
    documented = documented_defaults()
    assert set(documented) == settings(AppConfig)
    wrong = {
        key: (value, loaded_value(config, key))
        for key, value in documented.items()
        if value != loaded_value(config, key)
    }
    assert wrong == {}, "README default != config default"


def test_every_default_the_prose_states_is_the_settings_default(tmp_path):
    # "`server.workers` threads (64 by default)": a default restated outside the table.
    stated = re.findall(
        r"`([a-z_]+\.[a-z_]+)`[^`()]*?\((\d+) by default", ROOT.joinpath("README.md").read_text()
    )
    assert stated
    config = load_config(data_dir=tmp_path)
    for key, figure in stated:
        section, _, name = key.partition(".")
        assert getattr(getattr(config, section), name) == int(figure), key
