from pathlib import Path

import click

from med_idefics.cli.app import main, params_options


@main.command("train")
@click.argument("stage", type=click.Choice(["stage1", "stage2", "single-stage", "blind"]))
@params_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (adapter/, train_summary.json); default outputs/<variant>.",
)
@click.option(
    "--init-adapter",
    default=None,
    help="stage2: the stage-1 adapter to continue — a folder, runs:/<run_id>/adapter or "
    "models:/<name>@<alias>. Default: outputs/stage1/adapter.",
)
@click.option(
    "--train-size",
    type=int,
    default=None,
    help="Train on the first N records (the sweep); default: params data.<source>.train_size.",
)
@click.option(
    "--variant", default=None, help="MLflow run name; default: stage1 / two-stage / single-stage / blind (-n<N>)."
)
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the run).")
def train_command(stage, params, out_dir, init_adapter, train_size, variant, dvc_stage) -> None:
    """LoRA-train STAGE (stage1: captioning; stage2: VQA continuing stage 1; single-stage: VQA from the base; blind:
    single-stage on blank images, a variant that cannot see)."""
    from med_idefics.stages.train import TrainRequest, train, variant_name
    from med_idefics.workflow.launch import relaunch_if_asked

    relaunch_if_asked()  # $MED_IDEFICS_LAUNCHER (a multi-GPU Slurm job): torchrun, one process per GPU

    request = TrainRequest(
        stage=stage,
        out_dir=Path(out_dir or f"outputs/{variant or variant_name(stage, train_size)}"),
        init_adapter=init_adapter or None,
        train_size=train_size,
        variant=variant,
        dvc_stage=dvc_stage,
    )
    summary = train(params, request)
    if summary:
        click.echo(
            f"{request.variant or variant_name(stage, train_size)}: {summary['optimizer_steps']} steps, loss "
            f"{summary['first_loss']:.4f} → {summary['last_loss']:.4f}, eval loss {summary['eval_loss']}, "
            f"{summary['train_seconds']} s → {request.out_dir / 'adapter'}"
        )
