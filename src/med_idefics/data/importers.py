"""Import the real datasets (VQA-RAD, SLAKE, PathVQA, ROCO, Med-HALT) into the one record schema under
``data/<dataset>/``, from the hub, a local copy in the hub's schema, or the authors' release format
(:mod:`med_idefics.data.releases`).

Bad input never stops an import half-way and never leaves a partial dataset: every split is opened and its columns
checked before any record is read; a bad record (corrupt or unusable image, empty question or answer, duplicate id,
unknown answer type) is rejected by id and counted by reason. Records stream into :func:`schema.write_splits` (temp
dir, then rename) batch by batch; a split with nothing left, or a read error, raises :class:`DatasetError` and the
temp dir is dropped, so ``data/`` stays as it was.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from med_idefics.data.images import IMPORT_COMPRESS_LEVEL, ImageCache, ImageRejected
from med_idefics.data.releases import detect_release
from med_idefics.data.schema import ANSWER_TYPES, OPEN, DatasetError, infer_answer_type, write_splits
from med_idefics.data.sources import CAPTION, SOURCES, TEXT, VQA, SourceSpec, SourceSplit, is_local_file, open_split
from med_idefics.data.token_lengths import TokenCounter
from med_idefics.data.token_lengths import describe as describe_lengths

log = logging.getLogger(__name__)

DO_NOT_KNOW = re.compile(r"\bi\s+do(?:\s+not|n['\"’]?t)\s+know\b", re.IGNORECASE)  # "I don"t know." occurs
OPTION_LABEL = re.compile(r"^\s*[A-Ea-e1-9][.)]\s*")  # "E. I do not know"
ID_COLUMNS = ("id", "qid", "image_id")  # Med-HALT / OctoMed VQA-RAD / ROCO; rows without one get a positional id
EXAMPLE_IDS = 5  # record ids named per rejection reason in the summary
RELEASE_HINTS = {
    "vqa-rad": "a folder with 'VQA_RAD Dataset Public.json', or MEVF's trainset.json/testset.json",
    "path-vqa": "a folder with {train,val,test}_vqa.pkl",
    "slake": "a folder with train.json/test.json and imgs/",
}


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
    tokens: dict | None = None  # training-sequence length statistics, when counted (data.token_lengths)

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
        if self.tokens:
            lines.append(f"  {describe_lengths(self.tokens)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RowContext:
    caption_prompt: str
    base_dir: Path | None  # relative image paths resolve here
    images: ImageCache


def import_dataset(
    name: str,
    root: str | Path,
    *,
    caption_prompt: str,
    source: str | None = None,
    splits: tuple[str, ...] | None = None,
    config: str | None = None,
    limits: Mapping[str, int] | None = None,
    images: str | None = None,
    lang: str = "en",
    counter: TokenCounter | None = None,
) -> dict[str, SplitReport]:
    """Import dataset ``name`` (a key of :data:`SOURCES`) from ``source`` (default: its hub id) into ``root/name``.

    ``source`` may also be a release in its authors' format (:mod:`~med_idefics.data.releases`; ``images``: its
    image folder when not beside it; ``lang``: SLAKE's question language). ``limits``: stored split → keep only the
    first N good records (deterministic: source order). Records stream into the parquet files batch by batch, and
    each image is converted once however many questions share it (:class:`ImageCache`). ``counter``: the training
    sequence length of each record is counted on the way and kept in its split's file
    (:mod:`~med_idefics.data.token_lengths`; text-only datasets are not trained on and not counted).
    """
    spec = _spec(name)
    source = source or spec.hub_id
    if source is None:
        raise DatasetError(f"{name} is imported from its authors' release: pass the folder with --source")
    release = detect_release(name, source, images, lang)
    plan = _plan(spec, release, splits, config)
    if is_local_file(source) and len(plan) > 1 and release is None:
        raise DatasetError(f"{source}: a single file holds one split; choose which with --split (one of {list(plan)})")
    unknown = sorted(set(limits or {}) - set(plan))
    if unknown:
        raise DatasetError(f"limit for split(s) {unknown} that are not imported; importing {list(plan)}")
    opened = {}
    for stored, source_split in plan.items():  # open every split and check its columns before reading any record
        if release is not None:
            opened[stored] = release.open(source_split)
            continue
        image_column = "image" if spec.kind != TEXT else None
        split_source = open_split(source, source_split, config or spec.config, image_column)
        missing = [c for c in spec.required if c not in split_source.columns]
        if missing:
            formats = f"; or at its authors' release ({RELEASE_HINTS[name]})" if name in RELEASE_HINTS else ""
            raise DatasetError(
                f"{split_source.where}: missing column(s) {missing} needed for {name} (found {split_source.columns}); "
                f"point --source at data in the schema of {spec.hub_id}{formats}"
            )
        opened[stored] = split_source
    cache = ImageCache(compress_level=IMPORT_COMPRESS_LEVEL)
    for split_source in opened.values():
        cache.expect(split_source.image_uses or {})
    reports = {stored: SplitReport(spec.name, stored, split_source.where) for stored, split_source in opened.items()}
    records = {
        stored: import_split(spec, split_source, reports[stored], caption_prompt, (limits or {}).get(stored), cache)
        for stored, split_source in opened.items()
    }
    lengths = {}
    if counter is not None and spec.kind != TEXT:
        for stored in records:
            records[stored], lengths[stored] = counter.counting(records[stored], spec.kind)
    for stored, path in write_splits(root, name, records, {s: c.metadata for s, c in lengths.items()}).items():
        reports[stored].path = path
        reports[stored].tokens = lengths[stored].stats() if stored in lengths else None
    log.info("%s: %d image conversions, %d reused", name, cache.misses, cache.hits)
    return reports


def _plan(spec: SourceSpec, release, splits: tuple[str, ...] | None, config: str | None) -> dict[str, str]:
    """Stored split → source split; a release offers the splits it holds (all of them by default)."""
    if release is None:
        return spec.plan(splits, config)
    missing = [split for split in splits or () if split not in release.splits]
    if missing:
        raise DatasetError(f"{release.format}: no split(s) {missing} here; it holds {list(release.splits)}")
    return {split: split for split in (splits or release.splits)}


def import_split(
    spec: SourceSpec,
    split_source: SourceSplit,
    report: SplitReport,
    caption_prompt: str,
    limit: int | None = None,
    cache: ImageCache | None = None,
) -> Iterator[dict]:
    """Turn one opened split into records, lazily; bad rows are rejected and counted in ``report``, never raised.

    Raises :class:`DatasetError` at the end when nothing was kept (the write is then abandoned: nothing changes).
    """
    context = RowContext(
        caption_prompt, split_source.base_dir, cache or ImageCache(compress_level=IMPORT_COMPRESS_LEVEL)
    )
    convert = CONVERTERS[spec.kind]
    seen: set[str] = set()
    rows = tqdm(split_source.rows, desc=f"{spec.name}/{report.split}", unit="row", disable=None)
    for index, row in enumerate(rows):
        record_id = _record_id(row, spec.name, report.split, index)
        try:
            if record_id in seen:
                raise RecordRejected("duplicate id", "an earlier record of this split has the same id")
            record = {"id": record_id, **convert(row, context), "dataset": spec.name, "split": report.split}
        except (RecordRejected, ImageRejected) as err:
            report.reject(record_id, err.reason, err.detail)
            continue
        seen.add(record_id)
        report.kept += 1
        yield record | {column: _clean(row.get(column)) or None for column in split_source.extra_columns}
        if limit is not None and report.kept >= limit:
            break
    if report.kept == 0:
        raise DatasetError(f"no usable records, nothing written for {spec.name}:\n{report.summary()}")


# --------------------------------------------------------------------------------------------------------------------
# One source row → the record's question, answer, answer_type and image


def vqa_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """VQA-RAD / PathVQA: a source ``answer_type`` (OctoMed/VQA-RAD: CLOSED/OPEN) is kept, else yes/no → closed."""
    question, answer = _text(row, "question"), _text(row, "answer")
    answer_type = _clean(row.get("answer_type")).lower() or infer_answer_type(answer)
    if answer_type not in ANSWER_TYPES:
        raise RecordRejected("unknown answer_type", f"{row.get('answer_type')!r} is neither closed nor open")
    image = _image(row.get("image"), context)
    return {"image": image, "question": question, "answer": answer, "answer_type": answer_type}


def caption_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """ROCO: the fixed caption prompt asks, the caption answers."""
    caption = _text(row, "caption")
    image = _image(row.get("image"), context)
    return {"image": image, "question": context.caption_prompt, "answer": caption, "answer_type": OPEN}


def text_fields(row: Mapping[str, Any], context: RowContext) -> dict[str, Any]:
    """Med-HALT: text only (paired with an evaluation image later). The answer is ``correct_answer``, or failing
    that the option ``correct_index`` points at; the released reasoning_fake has neither (every question is
    nonsense): its expected response is then the "I do not know" option of ``options``."""
    question = _text(row, "question")
    answer = _clean(row.get("correct_answer")) or _indexed_option(row)
    if answer:
        return {"image": None, "question": question, "answer": answer, "answer_type": OPEN}
    if "correct_answer" in row or "correct_index" in row:
        raise RecordRejected("empty answer", "correct_answer is empty and no option matches correct_index")
    return {"image": None, "question": question, "answer": abstention_option(row.get("options")), "answer_type": OPEN}


def abstention_option(value: Any) -> str:
    """The "I do not know" option of a Med-HALT ``options`` cell: the option that says just that (letter label and
    punctuation aside), else the one option that contains it; :class:`RecordRejected` when that is not one option."""
    options = parse_options(value)
    if len(options) < 2:
        raise RecordRejected("unreadable options", f"{len(options)} option(s) parsed; a choice needs at least 2")
    containing = {text for text in options.values() if DO_NOT_KNOW.search(text)}
    exact = {text for text in containing if DO_NOT_KNOW.sub("", OPTION_LABEL.sub("", text)).strip(" .!,;:") == ""}
    for found in (exact, containing):
        if len(found) == 1:
            return found.pop()
    if containing:
        raise RecordRejected("several 'I do not know' options", str(sorted(containing)))
    raise RecordRejected("no 'I do not know' option", f"options {sorted(options.values())[:3]}…")


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


def _image(value: Any, context: RowContext) -> bytes:
    return context.images.stored(value, context.base_dir)


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
