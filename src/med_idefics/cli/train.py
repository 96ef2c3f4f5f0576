from pathlib import Path

import click

from med_idefics.cli.app import main, params_options


@main.command("train")
@click.argument("stage", type=click.Choice(["stage1", "stage2", "single-stage"]))
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
@click.option("--variant", default=None, help="MLflow run name; default: stage1 / two-stage / single-stage (-n<N>).")
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the run).")
def train_command(stage, params, out_dir, init_adapter, train_size, variant, dvc_stage) -> None:
    """LoRA-train STAGE (stage1: captioning; stage2: VQA continuing stage 1; single-stage: VQA from the base)."""
    from med_idefics.train import TrainRequest, train, variant_name

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


@main.command("sweep")
@click.argument("train_size", type=int)
@params_options
@click.option(
    "--predictions-dir",
    type=click.Path(file_okay=False),
    default="outputs/predictions",
    help="Predictions go to <dir>/two-stage-n<N>/vqa-rad.jsonl.",
)
@click.option(
    "--metrics-dir", type=click.Path(file_okay=False), default="metrics", help="Metrics: <dir>/two-stage-n<N>/."
)
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the runs).")
def sweep_command(train_size, params, predictions_dir, metrics_dir, dvc_stage) -> None:
    """One point of the stage-1 size sweep (Figure 3): stage 1 on the first TRAIN_SIZE captions, stage 2 from it,
    then the vqa-rad suite (and validation, where promotion looks) — three tracked runs in one process
    (outputs/stage1-n<N>, outputs/two-stage-n<N>)."""
    from med_idefics.data.suites import VALIDATION, VQA_RAD, has_validation
    from med_idefics.evaluate import EvalRequest, evaluate
    from med_idefics.train import TrainRequest, train, variant_name

    stage1, stage2 = variant_name("stage1", train_size), variant_name("stage2", train_size)
    train(params, TrainRequest("stage1", Path(f"outputs/{stage1}"), train_size=train_size, dvc_stage=dvc_stage))
    init = f"outputs/{stage1}/adapter"
    train(params, TrainRequest("stage2", Path(f"outputs/{stage2}"), init, variant=stage2, dvc_stage=dvc_stage))
    suites = [VQA_RAD, *([VALIDATION] if has_validation(params) else [])]
    request = EvalRequest(stage2, suites, None, Path(predictions_dir), Path(metrics_dir), dvc_stage)
    metrics = evaluate(params, request)[VQA_RAD].metrics
    click.echo(f"{stage2}: closed accuracy {metrics['closed_accuracy']:.3f}, exact match {metrics['exact_match']:.3f}")
