import json

import click

from med_idefics.cli.app import main, params_options


@main.command("estimate")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON (keys stages, total_hours).")
@click.option(
    "--rates",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A rate table written by benchmarks/gpu_check.py; default: the repository's benchmarks/results/"
    "gpu_check.json when it exists, else the reference rates of issue 17 (one H200) and assumptions.",
)
@click.option(
    "--gpu-gib",
    type=click.FloatRange(min=1),
    default=None,
    help="The GPU's memory in GiB, for the peak-memory check; default: the card gpu_check measured on.",
)
@params_options
def estimate_command(as_json: bool, rates: str | None, gpu_gib: float | None, params) -> None:
    """What `dvc repro` costs under the current params: per stage its training samples, evaluation forward passes,
    answers, model loads, GPU-hours and peak memory, the total, and every figure used with what it rests on
    (measured where and when, or assumed)."""
    from med_idefics.workflow.estimate import estimate, load_rates, render

    result = estimate(params, load_rates(rates), gpu_gib)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
