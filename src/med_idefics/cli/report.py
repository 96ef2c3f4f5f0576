"""``med-idefics report`` (med_idefics.stages.report), ``med-idefics review export | import``
(med_idefics.reporting.review, med_idefics.reporting.blind_review) and ``med-idefics compare``
(med_idefics.reporting.compare)."""

from __future__ import annotations

import click

from med_idefics.cli.app import main, optional_params_options, params_options
from med_idefics.cli.evaluate import KNOWN_SUITE_NAMES, SUITE_NAMES
from med_idefics.config import PARAMS_FILE, ConfigError, Params

# Defaults repeat med_idefics.stages.report's METRICS_DIR, PREDICTIONS_DIR, REPORT_FILE (kept import-free for a fast
# --help)
metrics_dir_option = click.option(
    "--metrics-dir", default="metrics", type=click.Path(file_okay=False), help="Where <variant>/<suite>.json are."
)
predictions_dir_option = click.option(
    "--predictions-dir",
    default="outputs/predictions",
    type=click.Path(file_okay=False),
    help="Where <variant>/<suite>.jsonl are.",
)
suite_option = click.option("--suite", type=click.Choice(SUITE_NAMES), default="vqa-rad", help="The evaluation suite.")


@main.command("report")
@metrics_dir_option
@predictions_dir_option
@click.option(
    "--out",
    default="reports/results.md",
    type=click.Path(dir_okay=False),
    help="The Markdown report; figure2.png and figure3.png go beside it.",
)
@click.option("--dvc-stage", default=None, help="The DVC stage running this command (an MLflow tag).")
@params_options
def report_command(metrics_dir: str, predictions_dir: str, out: str, dvc_stage: str | None, params) -> None:
    """Write the results report: the Figure-2 table with 95 % intervals, the paired tests of the paper's claims,
    and the Figure-2/Figure-3 plots; log them as the MLflow run `report`."""
    from med_idefics.stages.report import build_report

    written = build_report(params, metrics_dir, predictions_dir, out, dvc_stage=dvc_stage)
    for path in written.values():
        click.echo(str(path))


@main.group("review")
def review_group() -> None:
    """Human evaluation in the paper's format: export a grading sheet, grade it, import the grades."""


@review_group.command("export")
@click.option(
    "--variant",
    "variants",
    required=True,
    multiple=True,
    help="The evaluated variant, e.g. two-stage; with --blind, at least two (repeat the option).",
)
@suite_option
@click.option("--all-types", is_flag=True, help="Grade closed (yes/no) questions too, not only open ones.")
@click.option(
    "--blind",
    is_flag=True,
    help="Mix the variants' answers in one shuffled sheet that names no variant; which is which goes to a key file.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="The sheet's path; the HTML page goes beside it  [default: reports/review/<variant>-<suite>.csv; "
    "blind: reports/review/blind-<suite>/sheet.csv]",
)
@click.option(
    "--key",
    default=None,
    type=click.Path(dir_okay=False),
    help="With --blind: the key's path  [default: beside the sheet's folder, <folder>.key.json]",
)
@predictions_dir_option
@params_options
def review_export_command(
    variants: tuple[str, ...], suite: str, all_types: bool, blind: bool, out: str | None, key: str | None,
    predictions_dir: str, params,
) -> None:  # fmt: skip
    """Write the grading sheet (CSV in the paper's columns) and an HTML page with the images."""
    if blind:
        from med_idefics.reporting.blind_review import export_blind

        csv_path, html_path, key_path, count = export_blind(
            params, list(variants), suite, out, key, all_types, predictions_dir
        )
        click.echo(f"{csv_path}: {count} answers of {len(set(variants))} variants, shuffled, no variant named; "
                   f"images in {html_path}. The key (keep it from the graders): {key_path}")  # fmt: skip
        click.echo(f"Once graded: med-idefics review import {csv_path} --key {key_path}")
        return
    if len(variants) != 1 or key:
        raise click.UsageError("one --variant per sheet (and no --key) unless --blind")
    from med_idefics.reporting.review import export_sheet

    csv_path, html_path, count = export_sheet(params, variants[0], suite, out, all_types, predictions_dir)
    click.echo(f"{csv_path}: {count} questions to grade (right or wrong); images in {html_path}")
    click.echo(f"Once graded: med-idefics review import {csv_path} --variant {variants[0]} --suite {suite}")


@review_group.command("import")
@click.argument("graded", type=click.Path(exists=True, dir_okay=False))
@click.option("--variant", default=None, help="The variant the sheet grades (not with --key).")
@suite_option
@click.option(
    "--key",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A blind sheet's key (review export --blind): unblinds it and logs each variant's human accuracy.",
)
@click.option("--run-id", default=None, help="The evaluation's MLflow run  [default: eval_run_id of its metrics]")
@predictions_dir_option
@metrics_dir_option
@params_options
def review_import_command(
    graded: str, variant: str | None, suite: str, key: str | None, run_id: str | None, predictions_dir: str,
    metrics_dir: str, params,
) -> None:  # fmt: skip
    """Check a GRADED sheet against the predictions and log human_accuracy (95 % interval) to the evaluation run."""
    if key:
        if variant or run_id:
            raise click.UsageError("--key names the variants and their runs itself: drop --variant and --run-id")
        from med_idefics.reporting.blind_review import import_blind

        summaries = list(import_blind(params, graded, key, predictions_dir, metrics_dir).values())
    elif variant:
        from med_idefics.reporting.review import import_grades

        summaries = [import_grades(params, graded, variant, suite, run_id, predictions_dir, metrics_dir)]
    else:
        raise click.UsageError("pass --variant (the variant the sheet grades), or --key for a blind sheet")
    for summary in summaries:
        click.echo(
            f"{summary['variant']}: human_accuracy {summary['human_accuracy']:.3f} "
            f"[{summary['human_accuracy_ci_low']:.2f}, {summary['human_accuracy_ci_high']:.2f}] "
            f"({summary['n_right']}/{summary['n']} right, {summary['selection']} questions) "
            f"→ run {summary['eval_run_id']}"
        )


@main.command("compare")
@metrics_dir_option
@click.option(
    "--suite",
    "suites",
    multiple=True,
    type=click.Choice(KNOWN_SUITE_NAMES),
    help="A suite to show (repeatable)  [default: every suite evaluated]",
)
@click.option("--all-metrics", is_flag=True, help="Also a table of the other metrics (F1, BLEU, paper closed acc.).")
@click.option(
    "--from-mlflow",
    is_flag=True,
    help="Read the tracking store, not metrics/: each variant's headline metrics as mean ± sd over its seeds.",
)
@click.option("--any-config", is_flag=True, help="With --from-mlflow: also runs whose params (besides seed) differ.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@optional_params_options
def compare_command(
    metrics_dir: str, suites: tuple[str, ...], all_metrics: bool, from_mlflow: bool, any_config: bool, as_json: bool,
    params: Params | None,
) -> None:  # fmt: skip
    """Print the evaluated variants side by side, per suite, in 80 columns: each headline metric with its 95 %
    interval and the n it rests on; or, --from-mlflow, over the training seeds in the tracking store."""
    import json

    from rich.console import Console

    from med_idefics.reporting.compare import comparison_json, comparison_tables, seed_tables

    if from_mlflow:
        if params is None:  # the configuration whose seeds are grouped
            raise ConfigError(f"compare --from-mlflow reads {PARAMS_FILE}: run it in the checkout, or pass --params")
        tables, data = seed_tables(params, list(suites), any_config)
    elif as_json:
        tables, data = [], comparison_json(metrics_dir, list(suites))
    else:
        tables, data = comparison_tables(metrics_dir, list(suites), all_metrics), {}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    for table in tables:
        console.print(table)
    if data.get("left_out_note"):
        click.echo(data["left_out_note"])
