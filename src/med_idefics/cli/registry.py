import json
from pathlib import Path

import click

from med_idefics.cli.app import main, optional_params_options, params_options


@main.command("register")
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help="A trained VQA variant (single-stage, two-stage, two-stage-n<N>: outputs/<variant>/adapter); repeatable. "
    "Default: every one in --outputs-dir.",
)
@click.option("--outputs-dir", type=click.Path(file_okay=False), default="outputs", help="Holds <variant>/adapter.")
@click.option("--metrics-dir", type=click.Path(file_okay=False), default="metrics", help="Has <variant>/<suite>.json.")
@click.option(
    "--records-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write <dir>/<variant>.json: the registered version, its tags and metrics (a DVC output).",
)
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the runs).")
@params_options
def register_command(variants, outputs_dir, metrics_dir, records_dir, dvc_stage, params) -> None:
    """Register trained VQA variants as versions of params registry.model_name (an unchanged one is not repeated)."""
    from dataclasses import asdict

    from med_idefics.stages.register import register

    registrations = register(params, list(variants), Path(outputs_dir), Path(metrics_dir), dvc_stage)
    for r in registrations:
        state = "new" if r.created else "same package: scores, tags and description refreshed"
        click.echo(f"{r.variant} → {params.registry.model_name} version {r.version} ({state})")
        if records_dir:
            path = Path(records_dir) / f"{r.variant}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"model_name": params.registry.model_name, **asdict(r)}, indent=2) + "\n")


@main.command("promote")
@click.option(
    "--predictions-dir",
    type=click.Path(file_okay=False),
    default="outputs/predictions",
    help="Local predictions (<dir>/<variant>/<suite>.jsonl), used only for versions whose evaluation run is unknown.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the decision to this JSON file.")
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the run).")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what promotion would decide (e.g. with --set registry.metric=closed_accuracy); move and tag nothing.",
)
@click.option(
    "--allow-uncommitted",
    is_flag=True,
    help="Let versions made in a DVC experiment or from a dirty tree be promoted (params registry.allow_uncommitted).",
)
@params_options
def promote_command(predictions_dir, out, dvc_stage, dry_run, allow_uncommitted, params) -> None:
    """Move the alias registry.alias on evidence: to the best evaluated version (params registry.suite /
    registry.metric) when there is no champion, or when the paired test says it beats the champion (p < 0.05)."""
    from med_idefics.stages.promote import describe, promote

    if allow_uncommitted:
        params.registry.allow_uncommitted = True
    decision = promote(params, Path(predictions_dir), dvc_stage, dry_run=dry_run)
    prefix = "dry run, nothing moved: " if dry_run else ""
    first, *evidence = describe(decision)
    click.echo(f"{prefix}{first} ({params.registry.alias} → {decision['champion_after']})")
    for line in evidence:
        click.echo(line)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(decision, indent=2) + "\n")


@main.command("predict")
@click.option(
    "--model",
    "model_uri",
    default=None,
    help="models:/<name>@<alias>, models:/<name>/<version>, runs:/… or a folder. Default: "
    "models:/<registry.model_name>@<registry.alias> from params (needs a checkout; --model does not).",
)
@click.option("--image", required=True, type=click.Path(exists=True, dir_okay=False), help="PNG, JPEG or DICOM file.")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=int, default=None, help="Default: the packaged model's (params eval).")
@optional_params_options
def predict_command(model_uri, image, question, max_new_tokens, params) -> None:
    """Answer one question about an image with a registered model; prints the answer. A registered model carries
    its own config: outside a checkout, --model and $MLFLOW_TRACKING_URI are all it needs."""
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    from med_idefics.modeling.serving import answer
    from med_idefics.tracking.store import resolve_tracking_uri

    if params is not None:  # models:/ and runs:/ resolve in the project's tracking store
        mlflow.set_tracking_uri(resolve_tracking_uri(params))
        model_uri = model_uri or f"models:/{params.registry.model_name}@{params.registry.alias}"
    elif not model_uri:
        raise click.UsageError(
            "no params.yaml here to name the model: pass --model, e.g. models:/med-idefics-vqa@champion"
        )
    elif model_uri.startswith(("models:/", "runs:/")) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise click.UsageError(
            f"{model_uri}: outside a checkout, set MLFLOW_TRACKING_URI to the store that holds it (the team's server, "
            "or sqlite:////<checkout>/mlflow.db), or run from the checkout"
        )
    try:
        click.echo(answer(model_uri, image, question, max_new_tokens))
    except MlflowException as err:  # an unknown model/alias, or input the model refuses
        raise click.ClickException(f"{model_uri}: {err.message}") from err
