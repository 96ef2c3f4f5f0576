import click

from med_idefics.cli.app import main, params_options


@main.command("base")
@params_options
@click.option(
    "--out",
    "out_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where to save the base (default: params model.base_dir).",
)
def base_command(params, out_dir: str | None) -> None:
    """Resolve params `model.base` into model.base_dir: build + pretrain the tiny base offline, or point at a
    local folder / hub model; tracked as the MLflow run `base`."""
    from med_idefics.stages.base import build_tracked_base

    result = build_tracked_base(params, out_dir)
    where = out_dir or params.model.base_dir
    if params.model.base == "tiny":
        click.echo(
            f"{where}: tiny base, {result['parameters']:,} parameters, {result['steps']} steps in "
            f"{result['seconds']} s; general-domain eval loss {result['eval_loss_before']:.3f} → "
            f"{result['eval_loss_after']:.3f}"
        )
    elif result["source"] not in ("hub", "local"):
        click.echo(f"{where}: {result['source']} base (random weights), {result['parameters']:,} parameters")
    else:
        click.echo(
            f"{where}: points to {result['source']} model {result.get('id') or result.get('path')}"
            + (f" @ {result['revision']}" if result.get("revision") else "")
        )
