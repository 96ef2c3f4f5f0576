from pathlib import Path

import click

from med_idefics.cli.app import main, slurm_options


@main.command("repro")
@click.option("--jobs", "-j", type=int, default=1, help="Stages run at once (1: one after another, as `dvc repro`).")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False),
    default="outputs/logs",
    help="Where each stage's output goes (<dir>/<stage>.log).",
)
@click.option("--slurm", is_flag=True, help="Submit each stage that is not up to date as a Slurm job (--jobs unused).")
@slurm_options
@click.option("--dry-run", is_flag=True, help="--slurm: print every batch script; submit nothing.")
def repro_command(jobs: int, log_dir: str, slurm: bool, wait: bool, dry_run: bool, overrides: tuple[str, ...]) -> None:
    """Reproduce the DVC pipeline as `dvc repro` does, up to JOBS stages at a time: each stage runs through
    `dvc repro --single-item` once the stages it depends on are done; then `dvc repro` checks that all is up to date.
    With --slurm, each stage that is not up to date is a Slurm job instead, after the jobs of the stages it depends
    on, its resources from params cluster.slurm (docs/cluster.md)."""
    from med_idefics.workflow.pipeline import PipelineError, repro
    from med_idefics.workflow.slurm import SlurmError

    if not slurm and (wait or dry_run or overrides):
        raise click.UsageError("--wait, --dry-run and --set go with --slurm")
    try:
        if slurm:
            from med_idefics.workflow.cluster import cluster_params, repro_slurm

            repro_slurm(
                cluster_params(list(overrides)), wait=wait, dry_run=dry_run, log_dir=Path(log_dir), echo=click.echo
            )
        else:
            repro(jobs, Path(log_dir), echo=click.echo)
    except (PipelineError, SlurmError) as err:
        raise click.ClickException(str(err)) from err
