"""What a reviewer asks of a result beyond its headline numbers, for the report (:mod:`med_idefics.stages.report`):
accuracy by question type (the records' optional ``question_type``: VQA-RAD's and PathVQA's own, SLAKE's content_type,
the demo's template; :func:`med_idefics.data.schema.question_types`) and the yes-rate of closed answers (does a variant
answer "yes" to everything?). Both read the predictions the evaluation wrote; every figure has its n beside it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from med_idefics.config import ConfigError, Params
from med_idefics.data.schema import CLOSED, YES_NO, question_types
from med_idefics.data.suites import SLAKE, SLAKE_DATASET, suite_splits
from med_idefics.reporting.results import MISSING, fmt, markdown_table, predictions_path
from med_idefics.scoring.metrics import PAPER, score_rows, yes_no_verdict
from med_idefics.scoring.predictions import PredictionsError, answer_type_of, read_predictions
from med_idefics.scoring.stats import bootstrap_ci

UNTYPED = "(no type)"


def questions_dataset(params: Params, suite: str) -> str | None:
    """The dataset whose records a suite asks (where their question types are), or None for an unknown suite."""
    if suite == SLAKE:
        return SLAKE_DATASET
    try:
        return suite_splits(params, suite)[0][0]
    except ConfigError:
        return None


def _predictions(predictions_dir: str | Path, variants: list[str], suite: str) -> dict[str, list[dict]]:
    found = {}
    for variant in variants:
        path = predictions_path(predictions_dir, variant, suite)
        if path.is_file():
            try:
                found[variant] = read_predictions(path)
            except PredictionsError:
                continue  # the Figure-2 table and the paired tests say what is wrong with it
    return found


def type_table(params: Params, predictions_dir: str | Path, variants: list[str], suite: str) -> list[str]:
    """Exact match (the paper's, as in the claims) by question type: a row per type with its n (closed/open), a
    column per variant with the 95 % bootstrap interval."""
    predictions = _predictions(predictions_dir, variants, suite)
    dataset = questions_dataset(params, suite)
    types = question_types(params.data.root, dataset) if dataset and Path(params.data.root, dataset).is_dir() else {}
    if not predictions:
        return [f"{MISSING} no predictions of `{suite}` yet."]
    if not types:
        return [
            f"{MISSING} the records of `{dataset}` carry no `question_type` (the hub's VQA-RAD has none; the "
            "authors' releases do: `med-idefics data vqa-rad --source <release folder>`)."
        ]
    reference = next(iter(predictions.values()))
    kinds = sorted({types.get(str(row.get("id")), UNTYPED) for row in reference})
    counts = {kind: [0, 0] for kind in kinds}
    for row in reference:
        counts[types.get(str(row.get("id")), UNTYPED)][answer_type_of(row) != CLOSED] += 1
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    for variant, rows in predictions.items():
        by_kind: dict[str, list[float]] = defaultdict(list)
        for row, score in zip(rows, score_rows(rows, PAPER), strict=True):
            by_kind[types.get(str(row.get("id")), UNTYPED)].append(score.exact_match)
        for kind, values in by_kind.items():
            interval = bootstrap_ci(values, params.eval.seed, params.eval.bootstrap_resamples)
            cells[kind][variant] = fmt(float(np.mean(values)), *(interval or (None, None)))
    rows = [
        [kind, f"{sum(counts.get(kind, [0, 0]))} ({'/'.join(map(str, counts.get(kind, [0, 0])))})"]
        + [cells[kind].get(variant, MISSING) for variant in predictions]
        for kind in kinds
    ]
    return markdown_table(["Question type", "n (closed/open)", *predictions], rows)


def yes_rate_table(predictions_dir: str | Path, variants: list[str], suite: str) -> list[str]:
    """Per variant, over the closed questions whose answer is yes or no: how often it answers yes, no, or neither
    (:func:`med_idefics.scoring.metrics.yes_no_verdict`), beside how often the truth is yes."""
    rows = []
    for variant, predictions in _predictions(predictions_dir, variants, suite).items():
        closed = [
            row for row in predictions if answer_type_of(row) == CLOSED and str(row["answer"]).strip().lower() in YES_NO
        ]
        if not closed:
            continue
        verdicts = [yes_no_verdict(str(row["prediction"])) for row in closed]
        truth_yes = sum(str(row["answer"]).strip().lower() == "yes" for row in closed)
        shares = [verdicts.count("yes"), verdicts.count("no"), verdicts.count(None), truth_yes]
        rows.append([variant, str(len(closed)), *(f"{count / len(closed):.3f}" for count in shares)])
    if not rows:
        return [f"{MISSING} no closed yes/no questions of `{suite}` predicted yet."]
    return markdown_table(
        ["Variant", "n (yes/no questions)", "Answers yes", "Answers no", "Neither", "Truth yes"], rows
    )
