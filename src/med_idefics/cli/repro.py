from pathlib import Path

import click

from med_idefics.cli.app import main


@main.command("repro")
@click.option("--jobs", "-j", type=int, default=1, help="Stages run at once (1: one after another, as `dvc repro`).")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default="outputs/logs",
    help="Where each stage's output goes (<dir>/<stage>.log).",
)
def repro_command(jobs: int, log_dir: str) -> None:
    """Reproduce the DVC pipeline as `dvc repro` does, up to JOBS stages at a time: each stage runs through
    `dvc repro --single-item` once the stages it depends on are done; then `dvc repro` checks that all is up to date."""
    from med_idefics.workflow.pipeline import PipelineError, repro

    try:
        repro(jobs, Path(log_dir), echo=click.echo)
    except PipelineError as err:
        raise click.ClickException(str(err)) from err
