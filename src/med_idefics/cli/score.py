import json

import click

from med_idefics.cli.app import main, params_options

SCORING_MODES = (
    "strict",
    "paper",
    "llava-med",
)  # = med_idefics.scoring.metrics.MODES (import-free for a fast --help; tested)


@main.command("score")
@click.argument("predictions", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--mode",
    type=click.Choice(SCORING_MODES),
    default="paper",
    help="paper: exactly as the paper did (exact match and closed accuracy are substring tests); strict: punctuation "
    "and articles dropped, exact match on whole tokens, closed accuracy by the answer's single yes/no word; "
    "llava-med: as LLaVA-Med's published evaluation code. Every mode also reports closed_accuracy_strict.",
)
@click.option("--seed", type=int, default=None, help="Bootstrap seed [default: params eval.seed].")
@click.option(
    "--resamples",
    type=click.IntRange(min=1000),
    default=None,
    help="Bootstrap resamples [default: params eval.bootstrap_resamples].",
)
@params_options
def score_command(predictions: str, mode: str, seed: int | None, resamples: int | None, params) -> None:
    """Score a predictions FILE and print one JSON object: n, n_closed, n_open and closed_accuracy_strict,
    exact_match, f1, bleu, closed_accuracy, open_recall, each with its 95 % bootstrap interval (<metric>_ci_low,
    <metric>_ci_high).

    FILE is JSONL rows {question, answer, prediction[, answer_type]} or the paper's JSON list of
    {question, true_answer, predicted_answer}.
    """
    from med_idefics.scoring.metrics import summarize
    from med_idefics.scoring.predictions import read_predictions

    rows = read_predictions(predictions)
    seed = params.eval.seed if seed is None else seed
    resamples = params.eval.bootstrap_resamples if resamples is None else resamples
    click.echo(json.dumps(summarize(rows, seed=seed, resamples=resamples, mode=mode), indent=2))
