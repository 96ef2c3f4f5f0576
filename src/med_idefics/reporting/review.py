"""Stage: the human-evaluation round trip, in the paper's format.

``export`` writes a grading sheet for one variant on one suite — a CSV with the paper's columns
``question,true_answer,predicted_answer,correctness,justification`` (then ``id``) and a self-contained HTML page
showing each image with its question, ground truth and prediction; open questions only unless asked for all.
``import`` checks a graded sheet against the same predictions (by id when the sheet has them, else by position and
text: the paper's own sheets have no id), and logs ``human_accuracy`` with its 95 % bootstrap interval to the
evaluation's MLflow run and to ``metrics/<variant>/<suite>-human.json``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path

from med_idefics.config import Params
from med_idefics.data.images import mime_type
from med_idefics.data.schema import OPEN
from med_idefics.data.suites import SWAP, VQA_RAD
from med_idefics.files import write_atomic
from med_idefics.reporting.results import (
    METRICS_DIR,
    PREDICTIONS_DIR,
    ResultsError,
    eval_run_id,
    metrics_path,
    predictions_path,
)
from med_idefics.scoring.predictions import answer_type_of, read_predictions

PAPER_COLUMNS = ("question", "true_answer", "predicted_answer", "correctness", "justification")
SHEET_COLUMNS = (*PAPER_COLUMNS, "id")  # id after the paper's columns: the paper's own sheets (no id) still import
REVIEW_DIR = "reports/review"
RIGHT, WRONG = frozenset({"right", "correct"}), frozenset({"wrong", "incorrect"})  # the paper wrote correct/wrong
SHEET_TEXT = {"question": "question", "true_answer": "answer", "predicted_answer": "prediction"}  # sheet → row
SWAP_NOTE = (
    "Swap suite: each image is the one the model was shown, another question's image; the ground truth belongs to the "
    "question's own image."
)


class GradingError(ResultsError):
    """A grading sheet cannot be exported or imported; the message names the file, the CSV line and what to do."""


@dataclass(frozen=True)
class Grade:
    line: int  # where the row starts in the CSV (1 = the header)
    question: str
    true_answer: str
    predicted_answer: str
    right: bool
    id: str


# --------------------------------------------------------------------------------------------------------------------
# Export


def export_sheet(
    params: Params,
    variant: str,
    suite: str = VQA_RAD,
    out: str | Path | None = None,
    all_types: bool = False,
    predictions_dir: str | Path = PREDICTIONS_DIR,
) -> tuple[Path, Path, int]:
    """Write ``<out>.csv`` and ``<out>.html`` (default ``reports/review/<variant>-<suite>``); return both, and the
    number of questions. The images are the ones the model was shown: the suite's, rebuilt from params."""
    source = predictions_path(predictions_dir, variant, suite)
    chosen = gradable_rows(source, all_types)
    images = suite_images(params, suite, chosen, source)
    csv_path = Path(out).with_suffix(".csv") if out else Path(REVIEW_DIR) / f"{variant}-{suite}.csv"
    html_path = csv_path.with_suffix(".html")
    write_atomic(csv_path, sheet_csv(chosen))
    note = SWAP_NOTE if suite == SWAP else ""
    command = f"med-idefics review import {csv_path.name} --variant {variant} --suite {suite}"
    write_atomic(html_path, sheet_html(chosen, images, f"{variant} on {suite}", csv_path.name, command, note))
    return csv_path, html_path, len(chosen)


def gradable_rows(source: Path, all_types: bool) -> list[dict]:
    """The predictions a sheet grades: the open ones, or all with ``all_types``."""
    rows = read_predictions(source)
    chosen = rows if all_types else [row for row in rows if answer_type_of(row) == OPEN]
    if not chosen:
        raise GradingError(f"{source}: no open questions to grade; pass --all-types to grade every question")
    return chosen


def suite_images(params: Params, suite: str, rows: list[dict], source: Path) -> list[bytes]:
    """The image each row's question was shown with (the suite's, rebuilt from params)."""
    from med_idefics.data.suites import load_suite

    records = {record["id"]: record for record in load_suite(params, suite).records}
    images = []
    for index, row in enumerate(rows):
        record = records.get(row.get("id"))
        if record is None:
            raise GradingError(
                f"{source}: row {index + 1} (id {row.get('id')!r}) is not a question of suite {suite} in "
                f"{params.data.root}: the data changed since the evaluation, or data.* points elsewhere; "
                "re-run the evaluation"
            )
        images.append(record["image"])
    return images


def sheet_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SHEET_COLUMNS)
    for row in rows:
        writer.writerow([row["question"], row["answer"], row["prediction"], "", "", row.get("id") or ""])
    return buffer.getvalue()


def sheet_html(rows: list[dict], images: list[bytes], title: str, sheet_name: str, command: str, note: str = "") -> str:
    """One card per row: the image as a base64 data URI (no files beside the page), question, truth, prediction."""
    esc = html.escape
    cards = []
    for number, (row, image) in enumerate(zip(rows, images, strict=True), start=1):
        data = base64.b64encode(image).decode("ascii")
        picture = f'<img alt="image {number}" src="data:{mime_type(image)};base64,{data}">'
        cards.append(
            f'<section class="card">{picture}<dl>'
            f"<dt>Sheet row</dt><dd>{number} (id {esc(str(row.get('id')))}, {esc(answer_type_of(row))})</dd>"
            f"<dt>Question</dt><dd>{esc(row['question'])}</dd>"
            f"<dt>Ground truth</dt><dd>{esc(row['answer'])}</dd>"
            f"<dt>Prediction</dt><dd><b>{esc(row['prediction'])}</b></dd></dl></section>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review: {esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.card {{ display: flex; gap: 1.5em; border-top: 1px solid #ccc; padding: 1em 0; }}
.card img {{ width: 256px; image-rendering: pixelated; }}
dt {{ font-weight: bold; }} dd {{ margin: 0 0 .5em 0; }}
</style></head><body>
<h1>Human evaluation: {esc(title)}</h1>
<p>{len(rows)} questions. In <code>{esc(sheet_name)}</code>, set <code>correctness</code> to <code>right</code> or
<code>wrong</code> on every line (a short <code>justification</code> helps), then run
<code>{esc(command)}</code>.</p>
<p>{esc(note)}</p>
{chr(10).join(cards)}
</body></html>
"""


# --------------------------------------------------------------------------------------------------------------------
# Import


def read_grades(path: str | Path) -> list[Grade]:
    """Parse a graded sheet; every problem names its CSV line. Rows that are entirely empty are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise GradingError(f"{path}: cannot read it as UTF-8 text ({err}); save the sheet as UTF-8 CSV") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [name for name in PAPER_COLUMNS if name not in header]
    if missing:
        raise GradingError(f"{path}: line 1: missing column(s) {', '.join(missing)}; the header must start with "
                           f"{','.join(PAPER_COLUMNS)}")  # fmt: skip
    grades, problems = [], []
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) > len(header):
            problems.append(f"line {line}: {len(cells)} fields, the header has {len(header)}; quote text with commas")
            continue
        row = dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True))
        verdict = row["correctness"].strip().lower()
        if verdict not in RIGHT | WRONG:
            problems.append(f"line {line}: correctness {row['correctness']!r} is not right or wrong"
                            if verdict else f"line {line}: correctness is empty")  # fmt: skip
            continue
        texts = {name: row[name] for name in SHEET_TEXT}
        grades.append(Grade(line, **texts, right=verdict in RIGHT, id=row.get("id", "").strip()))
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise GradingError(f"{path}: {'; '.join(problems[:10])}{more}. Grade every row right (or correct) or wrong")
    if not grades:
        raise GradingError(f"{path}: no graded rows below the header")
    return grades


def _same(text: str) -> str:
    """Spreadsheets re-space and re-case text; compare what the grader saw, not its bytes."""
    return " ".join(str(text).split()).casefold()


def match_grades(grades: list[Grade], rows: list[dict], sheet: Path, source: Path) -> str:
    """Check that ``grades`` are of ``rows`` (all of them, or the open ones); return which: "all" or "open"."""
    selections = {"all": rows, "open": [row for row in rows if answer_type_of(row) == OPEN]}
    chosen = next((name for name, subset in selections.items() if len(subset) == len(grades)), None)
    if chosen is None:
        raise GradingError(
            f"{sheet}: {len(grades)} graded rows, but {source} has {len(rows)} predictions "
            f"({len(selections['open'])} open); grade a sheet exported from them (`med-idefics review export`)"
        )
    expected = list(enumerate(selections[chosen], start=1))
    if all(grade.id for grade in grades) and all(row.get("id") is not None for row in rows):
        by_id = {str(row["id"]): (number, row) for number, row in expected}
        seen: set[str] = set()
        for grade in grades:
            if grade.id not in by_id or grade.id in seen:
                problem = "appears twice" if grade.id in seen else f"is not among the {chosen} predictions of {source}"
                raise GradingError(f"{sheet}: line {grade.line}: id {grade.id!r} {problem}")
            seen.add(grade.id)
        expected = [by_id[grade.id] for grade in grades]
    for grade, (number, row) in zip(grades, expected, strict=True):
        for column, field in SHEET_TEXT.items():
            if _same(getattr(grade, column)) != _same(row[field]):
                raise GradingError(
                    f"{sheet}: line {grade.line}: {column} {getattr(grade, column)!r} does not match row {number} of "
                    f"the {chosen} predictions in {source} ({row[field]!r}); grade a sheet exported from these "
                    "predictions (`med-idefics review export`)"
                )
    return chosen


def resolve_run(params: Params, metrics_dir: Path, variant: str, suite: str, run_id: str | None) -> str:
    """The evaluation's MLflow run (recorded in ``<metrics_dir>/<variant>/run_info.json``, unless given), checked
    to exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from med_idefics.tracking.store import resolve_tracking_uri, setup_tracking

    if run_id is None:
        metrics_file = metrics_path(metrics_dir, variant, suite)
        if not metrics_file.is_file():
            raise GradingError(f"{metrics_file} not found: evaluate the variant on the suite first, or pass --run-id")
        try:
            run_id = eval_run_id(metrics_dir, variant, suite)
        except ResultsError as err:
            raise GradingError(str(err)) from err
        if not run_id:
            raise GradingError(f"{metrics_file.parent}/run_info.json names no evaluation run of {suite}; pass "
                               "--run-id to name the evaluation's MLflow run")  # fmt: skip
    setup_tracking(params)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise GradingError(
            f"MLflow run {run_id} not found in {resolve_tracking_uri(params)}; check mlflow.tracking_uri / "
            "$MLFLOW_TRACKING_URI, or pass --run-id"
        ) from err
    if run.info.lifecycle_stage == "deleted":
        raise GradingError(f"MLflow run {run_id} is deleted; restore it (`mlflow runs restore`) or pass --run-id")
    return run_id


def import_grades(
    params: Params,
    graded: str | Path,
    variant: str,
    suite: str = VQA_RAD,
    run_id: str | None = None,
    predictions_dir: str | Path = PREDICTIONS_DIR,
    metrics_dir: str | Path = METRICS_DIR,
) -> dict:
    """Validate ``graded``, then log human_accuracy (+ 95 % interval) to the evaluation run and the -human.json."""
    graded = Path(graded)
    source = predictions_path(predictions_dir, variant, suite)
    grades = read_grades(graded)
    selection = match_grades(grades, read_predictions(source), graded, source)
    run_id = resolve_run(params, Path(metrics_dir), variant, suite, run_id)
    return record_grades(params, variant, suite, grades, selection, run_id, graded, metrics_dir)


def record_grades(
    params: Params,
    variant: str,
    suite: str,
    grades: list[Grade],
    selection: str,
    run_id: str,
    graded: Path,
    metrics_dir: str | Path,
    extra: dict | None = None,
) -> dict:
    """human_accuracy of ``grades`` (+ 95 % interval) on the evaluation run ``run_id`` (the graded sheet as its
    artifact) and in ``metrics/<variant>/<suite>-human.json``; returns that summary."""
    import json

    from mlflow import MlflowClient

    from med_idefics.scoring.stats import bootstrap_ci

    right = [float(grade.right) for grade in grades]
    low, high = bootstrap_ci(right, params.eval.seed, params.eval.bootstrap_resamples)
    summary = {
        "variant": variant,
        "suite": suite,
        "eval_run_id": run_id,
        "selection": selection,
        "n": len(right),
        "n_right": int(sum(right)),
        "human_accuracy": sum(right) / len(right),
        "human_accuracy_ci_low": low,
        "human_accuracy_ci_high": high,
        "graded_file": str(graded),
        **(extra or {}),
    }
    client = MlflowClient()
    for key in ("human_accuracy", "human_accuracy_ci_low", "human_accuracy_ci_high"):
        client.log_metric(run_id, key, summary[key])
    client.set_tag(run_id, "human_eval_selection", selection)
    client.log_artifact(run_id, str(graded), artifact_path="human_eval")
    write_atomic(metrics_path(metrics_dir, variant, suite, human=True), json.dumps(summary, indent=2) + "\n")
    return summary
