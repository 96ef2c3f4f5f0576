from pathlib import Path

import click

from med_idefics.cli.app import main, params_options

# = med_idefics.data.suites.SUITES and ALL (kept import-free for a fast --help; tested)
SUITE_NAMES = ("vqa-rad", "path-vqa", "swap", "blank", "expert-prompt", "med-halt")
# = med_idefics.data.suites.KNOWN_SUITES: every suite a variant can be evaluated on (and so compared on)
KNOWN_SUITE_NAMES = (*SUITE_NAMES, "validation", "validation-blank", "slake")


@main.command("evaluate")
@click.option(
    "--variant",
    "variants",
    required=True,
    multiple=True,
    help="base, a trained variant (single-stage, two-stage, two-stage-n500: outputs/<variant>/adapter), "
    "or an adapter reference: a folder path containing '/', runs:/<run_id>/adapter or "
    "models:/<name>@<alias>. Repeat it to evaluate several variants on one load of the base (adapters swapped).",
)
@click.option(
    "--suite",
    "suite",
    default="all",
    help=f"all, or one or more (comma-separated) of: {', '.join(SUITE_NAMES)}, validation and validation-blank (in "
    "all when data.vqa.validation_fraction > 0); or slake (by name, once imported). A blank suite asked for with the "
    "suite it blanks (vqa-rad, validation) is scored against it: image reliance.",
)
@click.option(
    "--name",
    default=None,
    help="The variant's name in outputs, metrics and run names; default: the variant, or for a reference "
    "the reference with unsafe characters replaced by '-'.",
)
@click.option(
    "--predictions-dir",
    type=click.Path(file_okay=False),
    default="outputs/predictions",
    help="Predictions go to <dir>/<name>/<suite>.jsonl.",
)
@click.option(
    "--metrics-dir",
    type=click.Path(file_okay=False),
    default="metrics",
    help="Metrics go to <dir>/<name>/<suite>.json.",
)
@click.option(
    "--outputs-dir",
    type=click.Path(file_okay=False),
    default="outputs",
    help="Where a trained variant's adapter is: <dir>/<variant>/adapter.",
)
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (a tag on the runs).")
@params_options
def evaluate_command(variants, suite, name, predictions_dir, metrics_dir, outputs_dir, dvc_stage, params) -> None:
    """Answer the evaluation suites with VARIANT (greedy, batched) and score them: one MLflow run per suite."""
    from med_idefics.config import ConfigError
    from med_idefics.data.suites import has_validation, parse_suites
    from med_idefics.stages.evaluate import EvalRequest, evaluate_variants

    if name and len(variants) > 1:
        raise ConfigError("--name names one variant; leave it out when --variant is given more than once")
    requests = [
        EvalRequest(
            variant=variant,
            suites=parse_suites(suite, has_validation(params)),
            name=name or None,  # MLproject passes "" for "not given"
            predictions_dir=Path(predictions_dir),
            metrics_dir=Path(metrics_dir),
            dvc_stage=dvc_stage,
            outputs_dir=Path(outputs_dir),
        )
        for variant in variants
    ]
    outcomes = [item for results in evaluate_variants(params, requests) for item in results.items()]
    for suite_name, result in outcomes:
        metrics = result.metrics
        if "abstention_rate" in metrics:
            headline = f"abstention {metrics['abstention_rate']:.3f}"
        else:
            headline = f"exact match {metrics['exact_match']:.3f}, F1 {metrics['f1']:.3f}"
        if metrics.get("image_reliance") is not None:
            p = metrics["image_reliance_p"]
            headline += f", image reliance {metrics['image_reliance']:+.3f} (one-sided p={p:.2g})"
        if metrics.get("consistency") is not None:
            headline += f", consistency {metrics['consistency']:.3f} ({metrics['n_pairs']} pairs)"
        where = result.metrics_path
        click.echo(f"{where.parent.name}/{suite_name}: n={metrics['n']}, {headline} → {where}")
