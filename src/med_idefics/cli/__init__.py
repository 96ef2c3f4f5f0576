"""Command-line interface: parses arguments and calls the stage modules; holds no logic of its own."""

from med_idefics.cli import (  # noqa: F401
    data,
    data_import,
    estimate,
    evaluate,
    model,
    profile,
    registry,
    report,
    repro,
    score,
    seeds,
    tracking,
    train,
)
from med_idefics.cli.app import main, run_main

__all__ = ["main", "run_main"]
