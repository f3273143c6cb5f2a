"""``tessera init`` writes a project that validates; commands without definitions say so."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from features.spec_loader import load_features
from tessera.cli import cli


def test_init_writes_a_starter_that_validates(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["init", str(tmp_path / "proj")])
    assert res.exit_code == 0, res.output
    fs = load_features(tmp_path / "proj" / "features.yaml")
    assert fs.declared_source("ratings") is not None
    assert {f.source for f in fs.features} == {"ratings"}
    assert "tessera import events" in (tmp_path / "proj" / "NEXT.md").read_text()
    again = runner.invoke(cli, ["init", str(tmp_path / "proj")])
    assert again.exit_code == 1 and "already exist; pass --force" in again.output
    assert runner.invoke(cli, ["init", str(tmp_path / "proj"), "--force"]).exit_code == 0


def test_a_command_without_definitions_names_init(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(cli, ["worker", "blocks", "--bounded",
                                       "--bootstrap", "127.0.0.1:1"])
    finally:
        os.chdir(cwd)
    assert res.exit_code != 0
    assert "file not found; run `tessera init`" in res.output


def test_up_checks_its_inputs_before_starting_anything(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = CliRunner().invoke(cli, ["up", "--short"])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 1
    assert "reads features.yaml from the current directory" in res.output
    assert not (tmp_path / ".tessera").exists()  # nothing was started


def test_a_failed_child_is_one_line_with_its_log(tmp_path: Path) -> None:
    from tessera.up import ChildFailed

    log = tmp_path / "blocks.log"
    log.write_text("starting\nError: features.yaml: file not found\n\n")
    exc = ChildFailed("blocks", 1, log)
    assert str(exc) == f"blocks exited with 1: Error: features.yaml: file not found (log {log})"
