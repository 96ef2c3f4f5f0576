"""Blind human grading (``med-idefics review export --blind`` / ``review import --key``): several variants' answers
to the same suite mixed into one shuffled sheet that names no variant, so that a grader cannot favour one.

The sheet (``reports/review/blind-<suite>/sheet.csv`` and ``.html``: the folder to hand to graders) has the paper's
columns and a blind ``id`` per row (``b0001``, …); which variant and question each id stands for is in the key
(``reports/review/blind-<suite>.key.json``), written outside that folder and never shown to a grader. Import reads
the key back, checks every graded row against the predictions of its variant
(:func:`med_idefics.reporting.review.match_grades`) and logs each variant's human accuracy to its own evaluation run,
as an unblinded import of its rows would.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from med_idefics.config import Params
from med_idefics.data.suites import SWAP
from med_idefics.files import write_atomic
from med_idefics.reporting.results import METRICS_DIR, PREDICTIONS_DIR, predictions_path
from med_idefics.reporting.review import (
    REVIEW_DIR,
    SWAP_NOTE,
    GradingError,
    gradable_rows,
    match_grades,
    read_grades,
    record_grades,
    resolve_run,
    sheet_csv,
    sheet_html,
    suite_images,
)
from med_idefics.scoring.predictions import read_predictions

SHEET_NAME = "sheet.csv"
KEY_SUFFIX = ".key.json"
SHUFFLE_STREAM = 19  # the blind sheet's own random stream beside eval.seed


def default_sheet(suite: str) -> Path:
    return Path(REVIEW_DIR) / f"blind-{suite}" / SHEET_NAME


def key_beside(sheet: Path) -> Path:
    """Where a sheet's key goes by default: beside the sheet's folder, never in it (``blind-vqa-rad.key.json``)."""
    folder = sheet.resolve().parent
    return folder.with_name(folder.name + KEY_SUFFIX)


def export_blind(
    params: Params,
    variants: list[str],
    suite: str,
    out: str | Path | None = None,
    key: str | Path | None = None,
    all_types: bool = False,
    predictions_dir: str | Path = PREDICTIONS_DIR,
) -> tuple[Path, Path, Path, int]:
    """Write the blind sheet (CSV + HTML) and its key; return their paths and the number of rows. Rows are shuffled
    with ``eval.seed``: the same predictions give the same sheet."""
    variants = list(dict.fromkeys(variants))
    if len(variants) < 2:
        raise GradingError(f"--blind mixes several variants' answers; got {variants}: pass --variant at least twice")
    items = []
    for variant in variants:
        source = predictions_path(predictions_dir, variant, suite)
        rows = gradable_rows(source, all_types)
        items += [
            (variant, row, image) for row, image in zip(rows, suite_images(params, suite, rows, source), strict=True)
        ]
    random.Random(f"{params.eval.seed}-{SHUFFLE_STREAM}").shuffle(items)
    blind = [{**row, "id": f"b{number:04d}"} for number, (_, row, _) in enumerate(items, start=1)]
    csv_path = Path(out).with_suffix(".csv") if out else default_sheet(suite)
    key_path = Path(key) if key else key_beside(csv_path)
    html_path = csv_path.with_suffix(".html")
    command = f"med-idefics review import {csv_path.name} --key {key_path}"
    note = SWAP_NOTE if suite == SWAP else ""
    write_atomic(csv_path, sheet_csv(blind))
    write_atomic(
        html_path, sheet_html(blind, [image for *_, image in items], f"blind, {suite}", csv_path.name, command, note)
    )
    entries = [
        {"id": row["id"], "variant": variant, "question_id": original.get("id")}
        for row, (variant, original, _) in zip(blind, items, strict=True)
    ]
    record = {"suite": suite, "variants": variants, "selection": "all" if all_types else "open", "items": entries}
    write_atomic(key_path, json.dumps(record | {"sheet": str(csv_path)}, indent=2) + "\n")
    return csv_path, html_path, key_path, len(blind)


def import_blind(
    params: Params,
    graded: str | Path,
    key: str | Path,
    predictions_dir: str | Path = PREDICTIONS_DIR,
    metrics_dir: str | Path = METRICS_DIR,
) -> dict[str, dict]:
    """Unblind a graded sheet with its key; log each variant's human accuracy to its evaluation run. Returns
    variant → summary (:func:`med_idefics.reporting.review.record_grades`)."""
    graded, key = Path(graded), Path(key)
    try:
        record = json.loads(key.read_text(encoding="utf-8"))
        items = {item["id"]: item for item in record["items"]}
        suite, variants = record["suite"], record["variants"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GradingError(
            f"{key}: not a blind sheet's key ({err}); pass the .key.json `review export --blind` wrote"
        ) from err
    by_variant: dict[str, list] = {variant: [] for variant in variants}
    seen: set[str] = set()
    for grade in read_grades(graded):
        item = items.get(grade.id)
        if item is None or grade.id in seen:
            problem = "appears twice" if grade.id in seen else f"is not in the key {key}"
            raise GradingError(f"{graded}: line {grade.line}: id {grade.id!r} {problem}; grade the sheet as exported")
        seen.add(grade.id)
        by_variant[item["variant"]].append(replace(grade, id=str(item["question_id"])))
    missing = sorted(set(items) - seen)
    if missing:
        raise GradingError(f"{graded}: {len(missing)} rows of the sheet are not graded (ids {', '.join(missing[:5])})")
    summaries = {}
    for variant, grades in by_variant.items():
        source = predictions_path(predictions_dir, variant, suite)
        selection = match_grades(grades, read_predictions(source), graded, source)
        run_id = resolve_run(params, Path(metrics_dir), variant, suite, None)
        extra = {"blind": True, "key_file": str(key), "variants_mixed": variants}
        summaries[variant] = record_grades(
            params, variant, suite, grades, selection, run_id, graded, metrics_dir, extra
        )
    return summaries
