"""Command-line interface: parses arguments and calls the stage modules; holds no logic of its own."""

from med_idefics.cli import data, data_import, evaluate, model, profile, registry, report, score, train  # noqa: F401
from med_idefics.cli.app import main, run_main

__all__ = ["main", "run_main"]
