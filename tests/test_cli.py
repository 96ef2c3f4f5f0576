"""The `med-idefics` command line: every command answers --help, and user errors are one line with exit status 2."""

import click
import pytest
from click.testing import CliRunner

from med_idefics.cli import main


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


ALL_COMMANDS = sorted(_commands(main))


def test_the_top_level_help_lists_the_pipeline_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("data", "base", "train", "evaluate", "score", "report", "review", "register", "promote", "predict",
                 "profile", "estimate"):  # fmt: skip
        assert f"  {name} " in result.output, name


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 3


def test_a_bad_params_key_is_one_line_naming_it(tmp_path, monkeypatch, repo_root):
    import shutil
    import subprocess
    import sys

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "med_idefics.cli", "train", "stage1", "--set", "stage1.lr=-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: params.yaml: stage1.lr must be > 0, got -1.0"]


def test_evaluate_refuses_one_name_for_several_variants(tmp_path, monkeypatch, repo_root):
    import shutil

    from med_idefics.config import ConfigError

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "--variant", "base", "--variant", "two-stage", "--name", "x"])
    assert isinstance(result.exception, ConfigError) and "--name names one variant" in str(result.exception)
