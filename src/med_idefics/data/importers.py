"""Import the real datasets (VQA-RAD, PathVQA, ROCO, Med-HALT) into the one record schema under ``data/<dataset>/``.

Bad input never stops an import half-way and never leaves a partial dataset: every split is opened and its columns
checked before any record is read; a bad record (corrupt or unusable image, empty question or answer, duplicate id,
unknown answer type) is rejected by id and counted by reason; a split with nothing left, or a read error, raises
:class:`DatasetError` before anything is written; the kept records of all splits are then written at once with
:func:`schema.write_splits` (temp dir, then rename).
"""

from __future__ import annotations

import ast
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from med_idefics.data.images import ImageRejected, normalize_image, to_png_bytes
from med_idefics.data.schema import ANSWER_TYPES, OPEN, DatasetError, infer_answer_type, write_splits
from med_idefics.data.sources import CAPTION, SOURCES, TEXT, VQA, SourceSpec, SourceSplit, is_local_file, open_split

log = logging.getLogger(__name__)

ID_COLUMNS = ("id", "qid", "image_id")  # Med-HALT / OctoMed VQA-RAD / ROCO; rows without one get a positional id
EXAMPLE_IDS = 5  # record ids named per rejection reason in the summary


class RecordRejected(ValueError):
    """A source row that cannot become a record; ``reason`` is a short category for the import summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class SplitReport:
    """What an import kept and rejected in one split, and why."""

    dataset: str
    split: str
    where: str
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason → count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason → first few record ids
    first_detail: dict[str, str] = field(default_factory=dict)  # reason → what exactly was wrong, first time
    path: Path | None = None  # the written parquet file

    def reject(self, record_id: str, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < EXAMPLE_IDS:
            ids.append(record_id)
        self.first_detail.setdefault(reason, detail)
        log.debug("%s/%s: rejected %s: %s", self.dataset, self.split, record_id, detail)

    def summary(self) -> str:
        n_rejected = sum(self.rejected.values())
        lines = [f"{self.dataset}/{self.split}: kept {self.kept}, rejected {n_rejected} (from {self.where})"]
        for reason, count in self.rejected.most_common():
            ids = ", ".join(self.examples[reason]) + (", …" if count > len(self.examples[reason]) else "")
            detail = f"; first: {self.first_detail[reason]}" if self.first_detail[reason] else ""
            lines.append(f"  {reason}: {count} ({ids}){detail}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RowContext:
    caption_prompt: str
    base_dir: Path | None  # relative image paths resolve here


def import_dataset(
    name: str,
    root: str | Path,
    *,
    caption_prompt: str,
    source: str | None = None,
    splits: tuple[str, ...] | None = None,
    config: str | None = None,
    limits: Mapping[str, int] | None = None,
) -> dict[str, SplitReport]:
    """Import dataset ``name`` (a key of :data:`SOURCES`) from ``source`` (default: its hub id) into ``root/name``.

    ``limits``: stored split → keep only the first N good records (deterministic: source order).
    """
    spec = _spec(name)
    source = source or spec.hub_id
    plan = spec.plan(splits, config)
    if is_local_file(source) and len(plan) > 1:
        raise DatasetError(f"{source}: a single file holds one split; choose which with --split (one of {list(plan)})")
    unknown = sorted(set(limits or {}) - set(plan))
    if unknown:
        raise DatasetError(f"limit for split(s) {unknown} that are not imported; importing {list(plan)}")
    opened = {}
    for stored, source_split in plan.items():  # open every split and check its columns before reading any record
        split_source = open_split(source, source_split, config or spec.config, "image" if spec.kind != TEXT else None)
        missing = [c for c in spec.required if c not in split_source.columns]
        if missing:
            raise DatasetError(
                f"{split_source.where}: missing column(s) {missing} needed for {name} (found {split_source.columns}); "
                f"point --source at data in the schema of {spec.hub_id}"
            )
        opened[stored] = split_source
    records, reports = {}, {}
    for stored, split_source in opened.items():
        records[stored], reports[stored] = import_split(
            spec, split_source, stored, caption_prompt, (limits or {}).get(stored)
        )
    empty = [report for report in reports.values() if report.kept == 0]
    if empty:
        details = "\n".join(report.summary() for report in empty)
        raise DatasetError(f"no usable records, nothing written for {name}:\n{details}")
    for stored, path in write_splits(root, name, records).items():
        reports[stored].path = path
    return reports


def import_split(
    spec: SourceSpec, split_source: SourceSplit, split: str, caption_prompt: str, limit: int | None = None
) -> tuple[list[dict], SplitReport]:
    """Turn one opened split into records; bad rows are rejected and counted, never raised."""
    report = SplitReport(spec.name, split, split_source.where)
    context = RowContext(caption_prompt, split_source.base_dir)
    convert = CONVERTERS[spec.kind]
    records: list[dict] = []
    seen: set[str] = set()
    rows = tqdm(split_source.rows, desc=f"{spec.name}/{split}", unit="row", disable=None)
    for index, row in enumerate(rows):
        record_id = _record_id(row, spec.name, split, index)
        try:
            if record_id in seen:
                raise RecordRejected("duplicate id", "an earlier record of this split has the same id")
            record = {"id": record_id, **convert(row, context), "dataset": spec.name, "split": split}
        except (RecordRejected, ImageRejected) as err:
            report.reject(record_id, err.reason, err.detail)
            continue
        seen.add(record_id)
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    report.kept = len(records)
    return records, report


# --------------------------------------------------------------------------------------------------------------------
# One source row → the record's question, answer, answer_type and image


def vqa_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """VQA-RAD / PathVQA: a source ``answer_type`` (OctoMed/VQA-RAD: CLOSED/OPEN) is kept, else yes/no → closed."""
    question, answer = _text(row, "question"), _text(row, "answer")
    answer_type = _clean(row.get("answer_type")).lower() or infer_answer_type(answer)
    if answer_type not in ANSWER_TYPES:
        raise RecordRejected("unknown answer_type", f"{row.get('answer_type')!r} is neither closed nor open")
    image = _png(row.get("image"), context)
    return {"image": image, "question": question, "answer": answer, "answer_type": answer_type}


def caption_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """ROCO: the fixed caption prompt asks, the caption answers."""
    caption = _text(row, "caption")
    image = _png(row.get("image"), context)
    return {"image": image, "question": context.caption_prompt, "answer": caption, "answer_type": OPEN}


def text_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """Med-HALT: text only (paired with an evaluation image later); the answer is ``correct_answer``, or failing
    that the option that ``correct_index`` points at."""
    question = _text(row, "question")
    answer = _clean(row.get("correct_answer")) or _indexed_option(row)
    if not answer:
        raise RecordRejected("empty answer", "correct_answer is empty and no option matches correct_index")
    return {"image": None, "question": question, "answer": answer, "answer_type": OPEN}


CONVERTERS: dict[str, Callable[[Mapping[str, Any], RowContext], dict[str, Any]]] = {
    VQA: vqa_fields,
    CAPTION: caption_fields,
    TEXT: text_fields,
}


def parse_options(value: Any) -> dict[str, str]:
    """Med-HALT ``options``: a mapping, or its JSON text, or its Python ``repr`` (the hub CSV stores that)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip():
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, Mapping):
                return {str(k): _clean(v) for k, v in parsed.items()}
    return {}


def _indexed_option(row: Mapping[str, Any]) -> str:
    index = row.get("correct_index")
    if index is None or (isinstance(index, float) and math.isnan(index)):
        return ""
    try:
        key = str(int(index))
    except (TypeError, ValueError):
        return ""
    return parse_options(row.get("options")).get(key, "")


def _spec(name: str) -> SourceSpec:
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def _record_id(row: Mapping[str, Any], dataset: str, split: str, index: int) -> str:
    for column in ID_COLUMNS:
        value = _clean(row.get(column))
        if value:
            return value
    return f"{dataset}-{split}-{index:05d}"


def _png(value: Any, context: RowContext) -> bytes:
    return to_png_bytes(normalize_image(value, context.base_dir))


def _text(row: Mapping[str, Any], column: str) -> str:
    value = _clean(row.get(column))
    if not value:
        raise RecordRejected(f"empty {column}")
    return value


def _clean(value: Any) -> str:
    """A cell as stripped text; None and NaN (pandas' missing cell) → ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()
