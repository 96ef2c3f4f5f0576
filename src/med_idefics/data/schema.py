"""The one record schema every dataset is stored in, and atomic parquet I/O for ``data/<dataset>/<split>.parquet``.

Records may carry extra string columns (SLAKE's modality, VQA-RAD's question_type, …) after the required ones; they are
stored as written and ignored by :func:`read_split`, which returns the required columns only. One of them has a meaning
across sources: ``question_type`` (:data:`QUESTION_TYPE`) — VQA-RAD's and PathVQA's own, SLAKE's ``content_type``, the
demo's template — which the report breaks accuracy down by (:func:`question_types`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CLOSED, OPEN = "closed", "open"
ANSWER_TYPES = (CLOSED, OPEN)

#: id, image (an RGB PNG, or an RGB JPEG as its source had it; null only for text-only sources such as Med-HALT),
#: question, answer, answer_type, dataset, split.
RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary()),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("answer_type", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
COLUMNS = tuple(RECORD_SCHEMA.names)
QUESTION_TYPE = "question_type"  # optional: what the question asks about (modality, organ, presence, …)

YES_NO = frozenset({"yes", "no"})
# A split is written in row groups of at most this many image bytes or records, so an import never holds more than
# one batch of records in memory; splits under both limits are one row group (byte-identical to a one-shot write).
BATCH_BYTES = 64 * 1024 * 1024
BATCH_RECORDS = 8192


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file or record and what to do."""


def infer_answer_type(answer: str) -> str:
    """closed for yes/no answers, open otherwise — the convention when a source carries no type."""
    return CLOSED if answer.strip().lower() in YES_NO else OPEN


def split_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / dataset / f"{split}.parquet"


def records_to_table(records: Iterable[Mapping], extra_columns: Sequence[str] = ()) -> pa.Table:
    """Records → a table of the required columns, then ``extra_columns`` (nullable strings) in that order."""
    rows = list(records)
    for row in rows:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise DatasetError(f"record {row.get('id', '?')}: missing field(s) {missing}")
        if row["answer_type"] not in ANSWER_TYPES:
            raise DatasetError(f"record {row['id']}: answer_type must be closed or open, got {row['answer_type']!r}")
    schema = RECORD_SCHEMA
    for column in extra_columns:
        schema = schema.append(pa.field(column, pa.string()))
    return pa.Table.from_pylist([{c: row.get(c) for c in schema.names} for row in rows], schema=schema)


def extra_columns_of(record: Mapping) -> list[str]:
    """The record's columns beyond the required ones, in its own order."""
    return [c for c in record if c not in COLUMNS]


def write_splits(
    root: str | Path,
    dataset: str,
    splits: Mapping[str, Iterable[Mapping]],
    metadata: Mapping[str, Callable[[], Mapping[str, str]]] | None = None,
) -> dict[str, Path]:
    """Write every split of ``dataset`` at once: into a temp dir first, then renamed into place. ``metadata``:
    split → what to store in its file's key-value metadata, asked once its records are consumed (statistics counted
    as they streamed past: :mod:`med_idefics.data.token_lengths`).

    Each split may be a list or a lazy iterable (an import streams its records): it is consumed in batches
    (:data:`BATCH_BYTES`, :data:`BATCH_RECORDS`), so memory holds one batch, never the whole split. An exception
    raised while a split is consumed leaves ``root/dataset`` as it was; files are written deterministically
    (byte-identical for identical records) so DVC hashes are reproducible.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / dataset
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{dataset}.tmp-"))
    try:
        # the splits not written now stay as they are: linked (DVC's cache may link them), not copied
        if final.exists():
            for existing in final.glob("*.parquet"):
                if existing.stem not in splits:
                    _link_or_copy(existing, staging / existing.name)
        written = {}
        for split, records in splits.items():
            write_parquet(staging / f"{split}.parquet", records, (metadata or {}).get(split))
            written[split] = final / f"{split}.parquet"
        backup = None
        if final.exists():
            backup = root / f".{dataset}.old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
        os.replace(staging, final)
        if backup is not None:
            shutil.rmtree(backup)
        return written
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def write_parquet(
    path: Path, records: Iterable[Mapping], metadata: Callable[[], Mapping[str, str]] | None = None
) -> int:
    """Write ``records`` to ``path`` batch by batch (extra columns: those of the first record), then ``metadata()``
    into the file's key-value metadata; returns the count."""
    writer, extras, batch, batch_bytes, count = None, None, [], 0, 0

    def flush() -> None:
        nonlocal writer
        table = records_to_table(batch, extras or ())
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd", use_dictionary=False)
        writer.write_table(table)

    try:
        for record in records:
            if extras is None:
                extras = extra_columns_of(record)
            batch.append(record)
            batch_bytes += len(record.get("image") or b"")
            count += 1
            if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_RECORDS:
                flush()
                batch, batch_bytes = [], 0
        if batch or writer is None:
            flush()
        pairs = metadata() if metadata is not None else None
        if pairs:
            writer.add_key_value_metadata(dict(pairs))
    finally:
        if writer is not None:
            writer.close()
    return count


def read_split(root: str | Path, dataset: str, split: str) -> pa.Table:
    path = split_path(root, dataset, split)
    read_split_schema(path, dataset)
    return pq.read_table(path, columns=list(COLUMNS))


def read_records(root: str | Path, dataset: str, split: str, limit: int | None = None) -> list[dict]:
    """The split's records (the required columns); with ``limit``, the first ``limit`` only, read batch by batch so
    that only their row groups are read (a 7,000-caption sweep point of a tens-of-GB ROCO split)."""
    if limit is None:
        return read_split(root, dataset, split).to_pylist()
    path = split_path(root, dataset, split)
    read_split_schema(path, dataset)
    records: list[dict] = []
    file = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads every row group up front
    for batch in file.iter_batches(batch_size=max(1, min(limit, 1024)), columns=list(COLUMNS)):
        records += batch.slice(0, limit - len(records)).to_pylist()
        if len(records) >= limit:
            break
    return records


def read_split_schema(path: Path, dataset: str) -> None:
    """Check that ``path`` exists and holds the required columns (from its footer)."""
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: import it first (`med-idefics data demo` for the demo profile, "
            f"`med-idefics data {dataset} …` otherwise), or fix data.* in params.yaml"
        )
    missing = [c for c in COLUMNS if c not in pq.read_schema(path).names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; re-import it with `med-idefics data`")


def question_types(root: str | Path, dataset: str) -> dict[str, str]:
    """record id → :data:`QUESTION_TYPE` over every split of ``dataset`` that has the column (``{}`` when none does):
    only those two columns are read. Values are stripped and upper-cased, so "Pres " and "PRES" are one type."""
    types: dict[str, str] = {}
    for path in sorted(Path(root, dataset).glob("*.parquet")):
        if QUESTION_TYPE not in pq.read_schema(path).names:
            continue
        table = pq.read_table(path, columns=["id", QUESTION_TYPE])
        for record_id, kind in zip(table["id"].to_pylist(), table[QUESTION_TYPE].to_pylist(), strict=True):
            if kind is not None and str(kind).strip():
                types[record_id] = str(kind).strip().upper()
    return types


def count_records(root: str | Path, dataset: str, split: str) -> int:
    """How many records a split holds, from the parquet footer (no data read)."""
    path = split_path(root, dataset, split)
    if not path.is_file():
        raise DatasetError(f"{path} not found: import it first, or fix data.* in params.yaml")
    return pq.ParquetFile(path).metadata.num_rows


def records_digest(records: Iterable[Mapping]) -> str:
    """A blake2b digest of records' contents in order (every schema column, images included): what a run read."""
    digest = hashlib.blake2b(digest_size=16)
    for record in records:
        for column in COLUMNS:
            value = record.get(column)
            digest.update(value if isinstance(value, bytes) else repr(value).encode())
            digest.update(b"\0")
    return digest.hexdigest()
