from pathlib import Path

import click

from med_idefics.cli.app import main, slurm_options


@main.command("seeds")
@click.argument("seeds", nargs=-1, type=int, required=True)
@click.option("--slurm", is_flag=True, help="Each seed's experiment is a Slurm job (cluster.slurm.seed's resources).")
@slurm_options
@click.option("--dry-run", is_flag=True, help="Print the batch scripts (--slurm) or the dvc commands; run nothing.")
@click.option(
    "-S",
    "--set-param",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="A params override of every seed's experiment, as `dvc exp run -S` (repeatable).",
)
@click.option(
    "--log-dir", type=click.Path(file_okay=False), default="outputs/logs", help="--slurm: <dir>/seed-<N>.log."
)
def seeds_command(seeds, slurm, wait, dry_run, sets, overrides, log_dir) -> None:
    """The pipeline again at each of SEEDS (params `seed`), each a DVC experiment `seed-<N>` in a copy of its own,
    logging to this checkout's tracking store; then `dvc exp show` lists them and `med-idefics compare --from-mlflow`
    reads them. With --slurm each is a Slurm job; without, they are queued for `dvc queue start`."""
    from med_idefics.workflow.cluster import cluster_params
    from med_idefics.workflow.seeds import run_seeds
    from med_idefics.workflow.slurm import SlurmError

    if not slurm and (wait or overrides):
        raise click.UsageError("--wait and --set go with --slurm")
    try:
        run_seeds(
            list(seeds), cluster_params(list(overrides)), list(sets), slurm, wait, dry_run, Path(log_dir), click.echo
        )
    except SlurmError as err:
        raise click.ClickException(str(err)) from err
