"""Ctrl-C before serve's own signal handler is in place ends the command in one line."""

from __future__ import annotations

import argparse

from mlflow_sidecar.server import cli


def test_an_interrupt_before_serving_is_one_line_and_exit_130(monkeypatch, capsys):
    def loading(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_serve", loading)
    assert cli.main(["serve"]) == 130
    err = capsys.readouterr().err
    assert err == "mlflow-sidecar: interrupted\n"
