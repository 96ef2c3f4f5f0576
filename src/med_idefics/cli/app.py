"""The ``med-idefics`` click group and the options every command shares. Commands import their module lazily so
that ``--help`` and argument errors are instant."""

from __future__ import annotations

import functools
import sys

import click

from med_idefics.config import PARAMS_FILE, ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """med-idefics: two-stage LoRA fine-tuning of Idefics2 for medical VQA, tracked with DVC and MLflow."""


def params_options(func):
    """``--params FILE`` and repeatable ``--set section.key=value`` overrides (default: take params.yaml as is)."""

    @click.option(
        "--params",
        "params_file",
        default=PARAMS_FILE,
        type=click.Path(dir_okay=False),
        help="The params file: the single source of hyperparameters.",
    )
    @click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one params key for this run, e.g. --set stage2.lr=2e-4 (repeatable).",
    )
    @functools.wraps(func)
    def wrapper(*args, params_file: str, overrides: tuple[str, ...], **kwargs):
        from med_idefics.config import load_params

        params = load_params(params_file, list(overrides))
        return func(*args, params=params, **kwargs)

    return wrapper


def optional_params_options(func):
    """As :func:`params_options`, for a command that can do without a checkout: ``params`` is None when there is no
    params.yaml here and no ``--params`` was given (``--set`` then has nothing to override: an error)."""

    @click.option(
        "--params",
        "params_file",
        default=None,
        type=click.Path(dir_okay=False),
        help=f"The params file (default: {PARAMS_FILE} when there is one here; none is needed).",
    )
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one params key.")
    @functools.wraps(func)
    def wrapper(*args, params_file: str | None, overrides: tuple[str, ...], **kwargs):
        from pathlib import Path

        from med_idefics.config import load_params

        if params_file is None and not Path(PARAMS_FILE).is_file():
            if overrides:
                raise ConfigError(f"--set {overrides[0]}: there is no {PARAMS_FILE} here to override; pass --params")
            return func(*args, params=None, **kwargs)
        return func(*args, params=load_params(params_file or PARAMS_FILE, list(overrides)), **kwargs)

    return wrapper


def slurm_options(func):
    """What ``--slurm`` commands share: ``--wait`` (follow the jobs) and repeatable ``--set cluster.slurm.KEY=VALUE``
    (``overrides``), both for --slurm only."""
    overrides = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="cluster.slurm.KEY=VALUE",
        help="--slurm: override a cluster.slurm key for these jobs, e.g. --set cluster.slurm.partition=gpu "
        "(repeatable).",
    )
    wait = click.option("--wait", is_flag=True, help="--slurm: follow the jobs to their end; Ctrl-C cancels them.")
    return wait(overrides(func))


def run_main() -> None:
    """Entry point: turn the project's own user errors into a one-line message and exit status 2. (A training stage
    stopped by a preemption signal exits 75 itself: med_idefics.tracking.preemption.EXIT_REQUEUE.)"""
    from med_idefics.data.schema import DatasetError
    from med_idefics.files import DiskSpaceError
    from med_idefics.reporting.results import ResultsError  # also med_idefics.reporting.review.GradingError, a subclass
    from med_idefics.scoring.predictions import PredictionsError
    from med_idefics.tracking.outbox import TrackingUnavailable

    try:
        main(standalone_mode=True)
    except (ConfigError, DatasetError, PredictionsError, ResultsError, DiskSpaceError, TrackingUnavailable) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
