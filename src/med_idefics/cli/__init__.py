"""Command-line interface: parses arguments and calls the stage modules; holds no logic of its own."""

from med_idefics.cli import data, data_import, profile, score, train  # noqa: F401  (registers commands)
from med_idefics.cli.app import main, run_main

__all__ = ["main", "run_main"]
