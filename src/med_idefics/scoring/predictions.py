"""Prediction files: one row per question with the model's (extracted) answer.

Two formats are read:

* JSONL, one object per line: ``{question, answer, prediction[, answer_type]}`` plus any extra fields (``id``,
  ``raw_generation``, …) — what :func:`write_predictions` writes;
* the paper's JSON list of ``{question, true_answer, predicted_answer, …}`` (csbrendan/CS231N ``RESULTS/``).

Either way a row comes back with the canonical names ``question``, ``answer``, ``prediction`` and its other fields
untouched. Errors name the file and the line (JSONL) or the row index (JSON list).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from med_idefics.data.schema import ANSWER_TYPES, infer_answer_type
from med_idefics.files import write_atomic

REQUIRED_FIELDS = ("question", "answer", "prediction")
PAPER_FIELD_NAMES = {"true_answer": "answer", "predicted_answer": "prediction"}
WRITTEN_FIELDS = ("id", "question", "answer", "answer_type", "prediction", "raw_generation")

_EXPECTED = "each row needs question, answer, prediction (JSONL) or the paper's question, true_answer, predicted_answer"


class PredictionsError(ValueError):
    """A predictions file is unreadable or malformed, or two prediction sets do not cover the same questions."""


def read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PredictionsError(f"{path}: cannot read it ({err.strerror}); pass an existing predictions file") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise PredictionsError(f"{path}: line {line}: not UTF-8 text ({err.reason}); save the file as UTF-8") from err
    if not text.strip():
        raise PredictionsError(f"{path}: the file is empty; {_EXPECTED}")
    rows = _read_json_list(path, text) if text.lstrip().startswith("[") else _read_jsonl(path, text)
    if not rows:
        raise PredictionsError(f"{path}: no prediction rows; {_EXPECTED}")
    return rows


def _read_json_list(path: Path, text: str) -> list[dict]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise PredictionsError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from err
    return [canonical_row(item, f"{path}: row index {index}") for index, item in enumerate(items)]


def _read_jsonl(path: Path, text: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PredictionsError(
                f"{path}: line {lineno}: invalid JSON ({err.msg}); one JSON object per line"
            ) from err
        rows.append(canonical_row(item, f"{path}: line {lineno}"))
    return rows


def canonical_row(item: object, where: str) -> dict:
    """Check one row and rename the paper's ``true_answer``/``predicted_answer`` to ``answer``/``prediction``."""
    if not isinstance(item, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(item).__name__}; {_EXPECTED}")
    row = dict(item)
    for paper_name, name in PAPER_FIELD_NAMES.items():
        if name not in row and paper_name in row:
            row[name] = row.pop(paper_name)
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise PredictionsError(f"{where}: missing field(s) {', '.join(missing)}; {_EXPECTED}")
    for name in REQUIRED_FIELDS:
        if not isinstance(row[name], str):
            raise PredictionsError(f"{where}: field {name!r} must be a string, got {row[name]!r}")
    if row.get("answer_type") is not None and row["answer_type"] not in ANSWER_TYPES:
        raise PredictionsError(f"{where}: answer_type must be closed, open or absent, got {row['answer_type']!r}")
    return row


def write_predictions(path: str | Path, rows: Iterable[Mapping]) -> Path:
    """Write JSONL rows with :data:`WRITTEN_FIELDS`, atomically: a temp file in the same folder, then renamed."""
    path = Path(path)
    lines = []
    for index, row in enumerate(rows):
        missing = [name for name in WRITTEN_FIELDS if name not in row]
        if missing:
            raise PredictionsError(f"prediction row {index} (id {row.get('id', '?')}): missing field(s) {missing}")
        lines.append(json.dumps({name: row[name] for name in WRITTEN_FIELDS}, ensure_ascii=False) + "\n")
    return write_atomic(path, "".join(lines))


def align_predictions(rows_a: Sequence[Mapping], rows_b: Sequence[Mapping]) -> list[Mapping]:
    """``rows_b`` in the order of ``rows_a``: matched by ``id`` when every row has one, else by position.

    Matched rows must ask the same question with the same ground truth; anything else raises PredictionsError.
    """
    if len(rows_a) != len(rows_b):
        raise PredictionsError(
            f"the prediction sets differ in size ({len(rows_a)} vs {len(rows_b)} rows); "
            "compare variants evaluated on the same questions"
        )
    if all(row.get("id") is not None for row in (*rows_a, *rows_b)):
        by_id = _index_by_id(rows_b, "second")
        _index_by_id(rows_a, "first")
        absent = [row["id"] for row in rows_a if row["id"] not in by_id]
        if absent:
            raise PredictionsError(f"id(s) {absent[:5]} of the first prediction set are missing from the second")
        aligned = [by_id[row["id"]] for row in rows_a]
    else:
        aligned = list(rows_b)
    for position, (a, b) in enumerate(zip(rows_a, aligned, strict=True)):
        where = f"id {a['id']!r}" if a.get("id") is not None else f"row {position}"
        for name, value_a, value_b in (
            ("question", a["question"], b["question"]),
            ("answer", a["answer"], b["answer"]),
            ("answer_type", answer_type_of(a), answer_type_of(b)),
        ):
            if value_a != value_b:
                raise PredictionsError(
                    f"{where}: the two prediction sets differ in {name} ({value_a!r} vs {value_b!r}); "
                    "compare variants evaluated on the same questions"
                )
    return aligned


def answer_type_of(row: Mapping) -> str:
    """The row's answer_type, or the one inferred from its answer (yes/no = closed) when it has none."""
    return row.get("answer_type") or infer_answer_type(row["answer"])


def _index_by_id(rows: Sequence[Mapping], which: str) -> dict:
    index: dict = {}
    for row in rows:
        if row["id"] in index:
            raise PredictionsError(f"id {row['id']!r} appears twice in the {which} prediction set")
        index[row["id"]] = row
    return index
