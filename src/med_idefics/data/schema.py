"""The one record schema every dataset is stored in, and atomic parquet I/O for ``data/<dataset>/<split>.parquet``."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CLOSED, OPEN = "closed", "open"
ANSWER_TYPES = (CLOSED, OPEN)

#: id, image (PNG bytes; null only for text-only sources such as Med-HALT), question, answer, answer_type, dataset, split.
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

YES_NO = frozenset({"yes", "no"})


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message names the file or record and what to do."""


def infer_answer_type(answer: str) -> str:
    """closed for yes/no answers, open otherwise — the convention when a source carries no type."""
    return CLOSED if answer.strip().lower() in YES_NO else OPEN


def split_path(root: str | Path, dataset: str, split: str) -> Path:
    return Path(root) / dataset / f"{split}.parquet"


def records_to_table(records: Iterable[Mapping]) -> pa.Table:
    rows = list(records)
    for row in rows:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise DatasetError(f"record {row.get('id', '?')}: missing field(s) {missing}")
        if row["answer_type"] not in ANSWER_TYPES:
            raise DatasetError(f"record {row['id']}: answer_type must be closed or open, got {row['answer_type']!r}")
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=RECORD_SCHEMA)


def write_splits(root: str | Path, dataset: str, splits: Mapping[str, Iterable[Mapping]]) -> dict[str, Path]:
    """Write every split of ``dataset`` at once: into a temp dir first, then renamed into place.

    A failure leaves ``root/dataset`` as it was; files are written deterministically (byte-identical for
    identical records) so DVC hashes are reproducible.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / dataset
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{dataset}.tmp-"))
    try:
        if final.exists():
            for existing in final.glob("*.parquet"):
                shutil.copy2(existing, staging / existing.name)
        written = {}
        for split, records in splits.items():
            table = records_to_table(records)
            pq.write_table(table, staging / f"{split}.parquet", compression="zstd", use_dictionary=False)
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


def read_split(root: str | Path, dataset: str, split: str) -> pa.Table:
    path = split_path(root, dataset, split)
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: import it first (`med-idefics data demo` for the demo profile, "
            f"`med-idefics data {dataset} …` otherwise), or fix data.* in params.yaml"
        )
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; re-import it with `med-idefics data`")
    return table.select(list(COLUMNS))


def read_records(root: str | Path, dataset: str, split: str, limit: int | None = None) -> list[dict]:
    table = read_split(root, dataset, split)
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


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
