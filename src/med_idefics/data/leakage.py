"""Leakage between the splits of a dataset: images shared by content, repeated (image, question, answer) triples,
and questions without their image — what ``med-idefics data check`` prints.

Images are compared by the SHA-1 of their stored bytes (importers store every image as a deterministic PNG of its
pixels, or as its source's JPEG less its metadata: one picture under two file names is still one image); questions and
answers by their lower-cased, stripped text. Splits are read column by column in batches, so checking a large dataset
never holds its images in memory.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import pyarrow.parquet as pq

from med_idefics.data.schema import DatasetError
from med_idefics.data.splits import image_key

TRAIN = "train"
HELD_OUT = ("test", "validation", "val")  # splits that must not share an image with train (--strict)


@dataclass
class SplitCheck:
    name: str
    questions: int = 0
    images: Counter = field(default_factory=Counter)  # image → questions on it
    triples: set[tuple[str, str, str]] = field(default_factory=set)
    duplicate_triples: int = 0  # records whose (image, question, answer) an earlier record of the split has
    missing_image: list[str] = field(default_factory=list)  # record ids

    def add(self, record_id: str, image: str | None, question: str, answer: str) -> None:
        self.questions += 1
        if image is None:
            self.missing_image.append(record_id)
        else:
            self.images[image] += 1
        triple = (image or f"no-image:{record_id}", _norm(question), _norm(answer))
        if triple in self.triples:
            self.duplicate_triples += 1
        self.triples.add(triple)


@dataclass(frozen=True)
class PairCheck:
    first: str
    second: str
    shared_images: int
    second_questions_on_shared: int  # questions of the second split whose image is also in the first
    shared_triples: int

    @property
    def train_held_out(self) -> bool:
        return {self.first, self.second} & {TRAIN} != set() and {self.first, self.second} & set(HELD_OUT) != set()


@dataclass(frozen=True)
class LeakageReport:
    dataset: str
    split_scheme: str
    splits: list[SplitCheck]
    pairs: list[PairCheck]

    @property
    def train_shares_held_out_images(self) -> bool:
        return any(pair.train_held_out and pair.shared_images for pair in self.pairs)

    def summary(self) -> str:
        lines = [f"{self.dataset} (split: {self.split_scheme})"]
        for s in self.splits:
            missing = f" ({', '.join(s.missing_image[:3])}{', …' if len(s.missing_image) > 3 else ''})"
            lines.append(
                f"  {s.name}: {s.questions} questions on {len(s.images)} images; "
                f"{s.duplicate_triples} duplicate (image, question, answer); "
                f"{len(s.missing_image)} without an image{missing if s.missing_image else ''}"
            )
        for p in self.pairs:
            lines.append(
                f"  {p.first} ↔ {p.second}: {p.shared_images} shared images "
                f"({p.second_questions_on_shared} {p.second} questions on them); "
                f"{p.shared_triples} shared (image, question, answer)"
            )
        return "\n".join(lines)


def check_splits(dataset: str, split_scheme: str, splits: Mapping[str, Iterable[Mapping]]) -> LeakageReport:
    """``splits``: name → records with ``id``, ``question``, ``answer`` and ``image_key`` (or ``image`` bytes)."""
    checks = []
    for name, records in splits.items():
        check = SplitCheck(name)
        for r in records:
            key = r["image_key"] if "image_key" in r else (image_key(r) if r.get("image") is not None else None)
            check.add(str(r["id"]), key, r["question"], r["answer"])
        checks.append(check)
    ordered = sorted(checks, key=_split_order)
    pairs = []
    for first, second in combinations(ordered, 2):
        shared = first.images.keys() & second.images.keys()
        on_shared = sum(second.images[image] for image in shared)
        pairs.append(PairCheck(first.name, second.name, len(shared), on_shared, len(first.triples & second.triples)))
    return LeakageReport(dataset, split_scheme, ordered, pairs)


def stored_rows(path: Path, batch_size: int = 256) -> Iterator[dict]:
    """``id, question, answer, image_key`` of every record of one stored split, read in batches."""
    try:
        parquet = pq.ParquetFile(path)
    except OSError as err:
        raise DatasetError(f"{path}: not a readable parquet file: {err}") from err
    for batch in parquet.iter_batches(batch_size=batch_size, columns=["id", "image", "question", "answer"]):
        for row in batch.to_pylist():
            image = row.pop("image")
            yield {**row, "image_key": hashlib.sha1(image).hexdigest() if image is not None else None}


def check_stored(root: str | Path, dataset: str) -> LeakageReport:
    """Every split stored under ``root/dataset`` as it is."""
    folder = Path(root) / dataset
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise DatasetError(f"{folder}: no splits stored; import the dataset first (`med-idefics data {dataset} …`)")
    return check_splits(dataset, "as stored", {file.stem: stored_rows(file) for file in files})


def _split_order(check: SplitCheck) -> tuple[int, str]:
    order = {TRAIN: 0, "validation": 1, "val": 1, "test": 2}
    return order.get(check.name, 3), check.name


def _norm(text: object) -> str:
    return " ".join(str(text).lower().split())
